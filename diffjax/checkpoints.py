"""Orbax checkpoints of a training run: the train state, the input iterator's position and the config.

Each step is saved as one orbax composite checkpoint with three items:

    state   the TrainState pytree (sharded arrays are written by every process, in parallel)
    data    the input iterator's state (JSON), so that a resumed run continues with the next batch
    config  the experiment's ConfigDict (JSON), so that a checkpoint alone can rebuild the models

Saving is asynchronous (training continues while the arrays are written) and atomic: orbax writes into a
temporary directory and renames it when complete, so an interrupted save never replaces the last good
checkpoint. ``restore`` takes an abstract target whose leaves carry shardings: that is how a checkpoint
written on one mesh or device count is read back onto another.

Damage (a truncated, zeroed or missing file) is told apart from other failures (a config that no longer matches
the checkpoint) by :func:`damage`; :func:`restore_latest` resumes from the newest readable checkpoint and sets the
damaged ones aside. :func:`read_model_params` knows where a saved TrainState keeps each network's parameters, and
reads only those (sampling needs no optimizer state).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def _encode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, bytes):  # grain's DataLoader iterators serialise their state as bytes
        return {"__bytes__": base64.b64encode(data_state).decode("ascii")}
    return data_state


def _decode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return base64.b64decode(data_state["__bytes__"])
    return data_state


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message is one line naming the step, the file and what is left."""


class Checkpointer:
    """Save and restore (state, data iterator state, config) under ``directory`` (keeps the last N)."""

    def __init__(self, directory: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=create, read_only=not create)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    @classmethod
    def existing(cls, directory: str) -> Optional["Checkpointer"]:
        """A read-only Checkpointer of ``directory`` if it holds at least one checkpoint, else None."""
        if not os.path.isdir(directory):
            return None
        ckpt = cls(directory, create=False)
        if ckpt.latest_step() is None:
            ckpt.close()
            return None
        return ckpt

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_config(self, step: Optional[int] = None) -> dict:
        """The config saved with ``step`` (default: the latest), without reading the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out.config or {})

    def save(self, step: int, state: Any, data_state: Any = None, config: Any = None, force: bool = False) -> bool:
        """Start saving (asynchronously); returns whether a save was started."""
        cfg = config.to_dict() if hasattr(config, "to_dict") else (config or {})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(_encode_data_state(data_state) or {}),
                                  config=ocp.args.JsonSave(json.loads(json.dumps(cfg, default=str))))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, dict]:
        """(state, data_state, config dict) at ``step`` (default: the latest). ``abstract_state`` is a pytree of
        ``jax.ShapeDtypeStruct`` with the target shardings (``jax.eval_shape`` plus shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 data=ocp.args.JsonRestore(),
                                                                 config=ocp.args.JsonRestore()))
        data = out.data if out.data else None
        return out.state, _decode_data_state(data), dict(out.config or {})

    def restore_subtree(self, abstract_subtree: dict, step: Optional[int] = None) -> dict:
        """Only the parts of the saved state named in ``abstract_subtree`` (e.g. ``{"ema_params": ...,
        "frozen": ...}``, leaves ``jax.ShapeDtypeStruct`` with target shardings), read with orbax's partial
        restore: the other arrays (optimizer moments, raw parameters) are neither read nor allocated."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
        args = ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args, partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args)).state

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` from disk."""
        self.manager.delete(int(step))

    def reload(self) -> None:
        """Read the list of steps on disk again (after a step directory was moved)."""
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True when the platform announced a preemption (TPU maintenance, SIGTERM sync point): save now."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# The saved TrainState's fields (diffjax.train.TrainState) that hold model parameters: the trained ones, their
# exponential moving average, and the frozen ones.
TRAINED, EMA, FROZEN = "params", "ema_params", "frozen"


def split_trained(model_params: dict, text_trainable: bool) -> tuple[dict, dict]:
    """(trained, frozen): a model's parameter trees (``{component, "text"[, "vae"][, "alignment"]}``, e.g.
    ``Models.abstract_params()``) split as a TrainState keeps them: the denoiser, the alignment heads and a trained
    text encoder under ``params`` / ``ema_params``, a frozen text encoder and the autoencoder under ``frozen``."""
    is_frozen = {"vae": True, "text": not text_trainable}
    trained = {k: v for k, v in model_params.items() if not is_frozen.get(k, False)}
    return trained, {k: v for k, v in model_params.items() if k not in trained}


def read_model_params(ckpt: "Checkpointer", step: int, trained: Optional[dict], frozen: dict,
                      use_ema: bool = True) -> dict:
    """The model parameter trees named in ``trained`` (from the EMA parameters, or the raw ones unless ``use_ema``;
    None: none of them) and ``frozen`` (:func:`split_trained`; leaves ``jax.ShapeDtypeStruct`` with the target
    shardings) of the TrainState saved at ``step``, as one dict. Only those arrays are read (no optimizer state)."""
    which = EMA if use_ema else TRAINED
    target = {name: tree for name, tree in ((which, trained), (FROZEN, frozen)) if tree}
    restored = ckpt.restore_subtree(target, step) if target else {}
    return {**restored.get(which, {}), **restored.get(FROZEN, {})}


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying the given shardings, as a restore target."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ------------------------------------------------------------------------------------------------------
# Damaged checkpoints.
# ------------------------------------------------------------------------------------------------------


_REQUIRED_FILES = ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA"), os.path.join("state", "manifest.ocdbt"))
_TS_PATH = re.compile(r"'path': '([^']*)'")


def damage(error: BaseException, step_dir: str) -> Optional[str]:
    """Where a checkpoint's files are damaged: a missing or empty file of ``step_dir``, or the array that
    tensorstore failed to read (ocdbt packs many arrays per data file). None when the files look whole and the
    error is something else (a config that no longer matches the checkpoint, memory, storage)."""
    for name in _REQUIRED_FILES:
        if not os.path.isfile(os.path.join(step_dir, name)):
            return f"{os.path.join(step_dir, name)} is missing"
    for root, _, files in os.walk(step_dir):
        for f in sorted(files):
            if os.path.getsize(os.path.join(root, f)) == 0 and f != "commit_success.txt":
                return f"{os.path.join(root, f)} is empty"
    paths = _TS_PATH.findall(str(error))
    if len(paths) >= 2:
        return f"{paths[0]} cannot give the array {paths[-1].rstrip('/')} ({type(error).__name__})"
    return None


def restore_latest(ckpt: Checkpointer, target, workdir: str, policy: str):
    """(state, data state) of the newest readable checkpoint, or None when the run has none (a fresh start).

    A newest checkpoint whose files are damaged raises CheckpointError naming the step and the file (``policy="fail"``),
    or (``"fallback"``) is moved to WORKDIR/corrupt_checkpoints once an older one was read, and the run resumes
    from that one. Nothing is moved when no checkpoint can be read, and a checkpoint that fails for another reason
    (a config that no longer matches it) stops the run: neither case may end in a fresh start over old work.
    Directories of an interrupted save are reported and ignored."""
    partial = sorted(d for d in os.listdir(ckpt.directory) if ".orbax-checkpoint-tmp" in d)
    if partial:
        logging.warning("ignoring %d partial checkpoint(s) of an interrupted save in %s: %s", len(partial),
                        ckpt.directory, ", ".join(partial))
    corrupt_dir = os.path.join(workdir, "corrupt_checkpoints")
    if not ckpt.steps():
        if os.path.isdir(corrupt_dir) and os.listdir(corrupt_dir):
            raise CheckpointError(f"{ckpt.directory} has no checkpoint but {corrupt_dir} has unreadable ones: not "
                           f"starting afresh over them; move them away to start a new run in this workdir")
        return None
    damaged = []  # (step, step_dir, where), newest first
    for step in reversed(ckpt.steps()):
        step_dir = os.path.join(ckpt.directory, str(step))
        try:
            state, data_state, _ = ckpt.restore(target, step)
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            where = damage(e, step_dir)
            if where is None:
                raise CheckpointError(f"checkpoint step {step} in {ckpt.directory} cannot be restored into this run's "
                               f"state ({type(e).__name__}: {' '.join(str(e).split())[:200]}); its files look "
                               f"whole: was the config changed?") from None
            if policy != "fallback":
                raise CheckpointError(f"checkpoint step {step} cannot be read: {where} (with "
                               f"--config.training.on_corrupt_checkpoint=fallback the run resumes from the newest "
                               f"readable checkpoint)") from None
            logging.warning("checkpoint step %d cannot be read (%s); trying the previous one", step, where)
            damaged.append((step, step_dir, where))
            continue
        if damaged:
            move_aside(ckpt, {bad: where for bad, _, where in damaged}, corrupt_dir, "unreadable")
        return state, data_state
    first = damaged[0]
    raise CheckpointError(f"no checkpoint in {ckpt.directory} can be read (the newest, step {first[0]}: {first[2]}); "
                          f"nothing was moved")


def move_aside(ckpt: Checkpointer, steps: dict, directory: str, what: str) -> None:
    """Move the checkpoints of ``steps`` ({step: why}) out of ``ckpt`` into ``directory`` (``step_N_TIME``), kept
    for inspection, never deleted; process 0 moves, every process waits for it and reloads the list of steps."""
    ckpt.wait()
    if jax.process_index() == 0:
        for step, why in steps.items():
            aside = os.path.join(directory, f"step_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(directory, exist_ok=True)
            shutil.move(os.path.join(ckpt.directory, str(step)), aside)
            logging.warning("moved the %s checkpoint step %d to %s (%s)", what, step, aside, why)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"diffjax: {what} checkpoints moved")
    ckpt.reload()
