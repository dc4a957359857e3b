"""Orbax checkpoints of a training run: the train state, the input iterator's position and the config.

Each step is saved as one orbax composite checkpoint with three items:

    state   the TrainState pytree (sharded arrays are written by every process, in parallel)
    data    the input iterator's state (JSON), so that a resumed run continues with the next batch
    config  the experiment's ConfigDict (JSON), so that a checkpoint alone can rebuild the models

Saving is asynchronous (training continues while the arrays are written) and atomic: orbax writes into a
temporary directory and renames it when complete, so an interrupted save never replaces the last good
checkpoint. ``restore`` takes an abstract target whose leaves carry shardings: that is how a checkpoint
written on one mesh or device count is read back onto another.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _encode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, bytes):  # grain's DataLoader iterators serialise their state as bytes
        return {"__bytes__": base64.b64encode(data_state).decode("ascii")}
    return data_state


def _decode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return base64.b64decode(data_state["__bytes__"])
    return data_state


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


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying the given shardings, as a restore target."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
