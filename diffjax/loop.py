"""The training run: data, resume, periodic metrics / sample grids / held-out loss / checkpoints.

The only module that imports both training (``diffjax.train``: the compiled, sharded steps) and generation
(``diffjax.pipeline``: the sample grids). Periodic work is written once, as :class:`Periodic` actions
(the shape of clu's periodic actions in Flax's examples) rather than a chain of ``if step % n`` blocks::

    trainer = Trainer(config)
    state = loop.train(trainer, workdir)          # resumes from workdir's latest checkpoint if any

What the run guarantees (tests/test_reliability.py):

* SIGTERM (a preempted VM, a scheduler) or Ctrl-C: the step in flight finishes, a checkpoint is written with
  the data-iterator position, and ``train`` returns; the next run resumes bitwise where it stopped. A second
  Ctrl-C interrupts at once. With several processes, SIGTERM goes through JAX's preemption sync (all
  processes stop at the same step) and Ctrl-C keeps its default.
* Updates with a non-finite loss or gradient are skipped inside the compiled step (``train.update_guard``);
  the parameters never turn non-finite, so no checkpoint, sample or export holds NaNs. The host looks at the
  counters when it fetches metrics anyway (every ``log_every`` steps, and before each checkpoint):
  ``training.on_nonfinite="stop"`` or ``max_consecutive_skips`` skipped updates in a row stop the run with
  :class:`RunError`, the checkpoints intact. A state whose latest updates were skipped is never saved, a
  checkpoint whose next update was the first of a skipped run (a diverging update: finite, useless parameters) is
  moved to ``WORKDIR/suspect_checkpoints/``, and ``keep_checkpoints`` never rotates out the last good ones for
  such: a diverged run keeps its last good model, and one that ends diverged exits with :class:`RunError`.
* A checkpoint whose files are damaged (truncated, zeroed, missing) is named with its step and file; with
  ``training.on_corrupt_checkpoint="fallback"`` (the default: an automatically restarted run must not
  crash-loop on one bad save) it is moved to ``WORKDIR/corrupt_checkpoints/`` for inspection once an older one
  was read, and the run resumes from that. When none can be read, or one fails for another reason (a changed
  config), the run stops and moves nothing: it never starts afresh over old work. Partial checkpoints of an
  interrupted save are never restored.
* One run per workdir: a second one fails at once (an ``flock`` on ``WORKDIR/.lock``, released by the
  kernel when the holder dies, so a crashed run leaves no stale lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from tensorboardX import SummaryWriter
from tqdm import tqdm

from diffjax import checkpoints, pipeline, pixels, posthoc_ema
from diffjax.checkpoints import Checkpointer
from diffjax.data import describe_dataset, make_dataset
from diffjax.config import sampling_defaults
from diffjax.train import Trainer, TrainState


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line saying why and what is left on disk."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold an exclusive ``flock`` on ``WORKDIR/.lock`` for the block (process 0 only; others share its
    workdir). RunError when another live process holds it; the kernel drops the lock of a dead process."""
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"workdir {workdir} is in use by another run ({holder}); wait for it to finish or use "
                       f"another --workdir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class StopRequest:
    """SIGTERM / SIGINT handlers for the block: the first signal sets ``requested`` (the loop checkpoints and
    returns after the step in flight); a second SIGINT raises KeyboardInterrupt at once. Installed only in the
    main thread of a single-process run: with several processes a stop must be agreed by all of them, which
    JAX's preemption sync does for SIGTERM (``reached_preemption``), and SIGINT keeps its default."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name  # no logging here: the handler may interrupt a write to the same stream

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fetch_guard(guard: dict) -> dict:
    """``TrainState.guard`` on the host, as Python numbers (one transfer): the skipped-update counters and the
    running loss statistics."""
    return {k: v.item() for k, v in jax.device_get(guard).items()}


def check_guard(g: dict, step: int, policy: str, max_consecutive: int, last_checkpoint: Optional[int],
                seen: dict) -> dict:
    """On the host, with the counters fetched anyway (:func:`fetch_guard`): RunError when the run must stop (a
    non-finite update with ``policy="stop"``, or ``max_consecutive`` skipped updates in a row); a warning for new
    skipped updates. Returns the counters (``consecutive``: the updates skipped in a row up to now)."""
    kept = (f"the last checkpoint (step {last_checkpoint}) is intact" if last_checkpoint
            else "no good checkpoint is on disk")
    if policy == "stop" and g["nonfinite"] > 0:
        raise RunError(f"the loss or gradient was not finite at step {g['last_skipped']} "
                       f"(training.on_nonfinite=stop); stopped at step {step}, {kept}")
    if max_consecutive and g["consecutive"] >= max_consecutive:
        raise RunError(f"{g['consecutive']} updates in a row were skipped (non-finite or spiking loss, the last at "
                       f"step {g['last_skipped']}): the run diverged; {kept}; lower optim.learning_rate or "
                       f"raise training.max_consecutive_skips")
    if g["skipped"] > seen.get("skipped", 0):
        logging.warning("%d update(s) skipped so far (non-finite or spiking loss), the last at step %d",
                        g["skipped"], g["last_skipped"])
    seen["skipped"] = g["skipped"]
    return g


class MetricWriter:
    """TensorBoard event files through tensorboardX (no TensorFlow needed); a no-op on processes other
    than 0, so that every process can call it."""

    def __init__(self, logdir: str):
        self._w = None
        if jax.process_index() == 0:
            self._w = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: dict, prefix: str = "") -> None:
        if self._w is not None:
            for key, value in scalars.items():
                self._w.add_scalar(prefix + key, value, step)

    def write_image(self, step: int, tag: str, image) -> None:
        """``image``: uint8 (H, W, C)."""
        if self._w is not None:
            self._w.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


@dataclasses.dataclass
class Periodic:
    """Calls ``fn(step)`` every ``every`` steps (0: never) and, with ``at_end``, at the last step; ``due`` alone
    when the caller acts itself."""

    every: int
    fn: Optional[Callable[[int], None]]
    last_step: int
    at_end: bool = True

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or (self.at_end and step == self.last_step))

    def __call__(self, step: int) -> bool:
        if self.due(step):
            self.fn(step)
            return True
        return False


def check_data(config):
    """The ``DatasetInfo`` of ``config.data``'s train split, after the checks that need the dataset (the config's
    own are ``diffjax.config.validate``'s): a one-line ValueError for too few examples for one batch, or alignment
    positives by label on a dataset without labels."""
    info = describe_dataset(config.data, config.data.train_split)
    if config.alignment.weight > 0 and config.alignment.positives == "label" and not info.class_names:
        raise ValueError(f"config.alignment.positives='label' needs a labelled dataset; {info.name!r} has no "
                         f"labels (use 'prompt')")
    if info.steps_per_epoch(config.training.batch_size) == 0:
        raise ValueError(f"split {info.split!r} of {info.name!r} has {info.num_examples} examples, fewer than "
                         f"one batch (training.batch_size={config.training.batch_size})")
    return info


def train(trainer: Trainer, workdir: str, stop_at: Optional[int] = None) -> TrainState:
    """The whole run: resume from ``workdir``'s latest checkpoint if any, train to ``training.num_steps`` with
    metrics (TensorBoard + progress bar or log lines), sample grids, held-out loss and checkpoints.
    ``stop_at`` ends the run early after that step, with a checkpoint (as a preemption would)."""
    cfg, tc = trainer.config, trainer.config.training
    os.makedirs(workdir, exist_ok=True)
    info = describe_dataset(cfg.data, cfg.data.train_split)
    if tuple(info.image_shape) != tuple(trainer.image_shape):
        raise ValueError(f"data gives images of shape {info.image_shape}, the model is built for "
                         f"{trainer.image_shape} (config.data.image_size / channels)")
    with workdir_lock(workdir), StopRequest() as stop_request:
        # One more than training.keep_checkpoints: the newest does not count until a later update confirms it
        # (_run's settle), so a diverging run never rotates out the last good ones.
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints + 1)
        # Snapshots for the post-hoc EMA (diffjax.posthoc_ema): all kept, written asynchronously as checkpoints are.
        snaps = (Checkpointer(os.path.join(workdir, posthoc_ema.SNAPSHOT_DIR), max_to_keep=None)
                 if cfg.ema.get("snapshot_every", 0) else None)
        managers = [m for m in (ckpt, snaps) if m is not None]
        writer = MetricWriter(os.path.join(workdir, "tensorboard"))
        try:
            state = _run(trainer, workdir, info, ckpt, writer, stop_request, stop_at, snaps)
        except BaseException:
            for m in managers:
                try:  # the original error is the one to report
                    m.close()
                except Exception as e:
                    logging.error("%s", _save_failed(e, m))
            writer.close()
            raise
        try:
            errors = []
            for m in managers:  # close them all, then report the first failure
                try:
                    m.close()  # waits for the last asynchronous save
                except Exception as e:
                    errors.append(_save_failed(e, m))
            if errors:
                raise RunError(errors[0])
        finally:
            writer.close()
        return state


def _save_failed(error: BaseException, ckpt: Checkpointer) -> str:
    """One line for a failed (asynchronous) save: the cause, and the newest complete checkpoint on disk."""
    done = sorted(int(d) for d in os.listdir(ckpt.directory) if d.isdigit()) if os.path.isdir(ckpt.directory) else []
    kept = f"the last complete checkpoint (step {done[-1]}) is intact" if done else "no checkpoint is complete"
    return (f"saving a checkpoint in {ckpt.directory} failed ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:240]}); {kept}")


def _grid_prompts(cfg, info, encoder) -> list[str]:
    """The sample grids' prompts: ``sampling.prompts``, else one per class of a labelled dataset, else the first
    (up to 8) distinct captions of the eval split, read whole by every process so that all agree."""
    if cfg.sampling.prompts:
        return [p for p in cfg.sampling.prompts.split("|") if p]
    if info.captioner is not None:
        return info.prompts()
    it = make_dataset(cfg.data, encoder, split=cfg.data.eval_split, seed=cfg.seed, shuffle=False, keep_captions=True,
                      global_batch_size=cfg.training.batch_size, process_index=0, process_count=1)
    return list(dict.fromkeys(str(c) for c in next(it)["caption"]))[:8]


def _run(trainer, workdir, info, ckpt, writer, stop_request, stop_at, snaps=None):
    # One piece: the periodic actions are closures over the run's state (train state, last metrics, timer), defined
    # beside the loop that calls them, as Flax's examples do with clu's periodic actions.
    cfg, tc, sc = trainer.config, trainer.config.training, trainer.config.sampling
    lead = jax.process_index() == 0
    enc = trainer.models.text_encoder
    data_kw = dict(global_batch_size=tc.batch_size, process_index=jax.process_index(),
                   process_count=jax.process_count(), latent_encoder=trainer.latent_encoder())
    train_it = make_dataset(cfg.data, enc, split=cfg.data.train_split, seed=cfg.seed, **data_kw)
    try:
        restored = checkpoints.restore_latest(ckpt, trainer.restore_target(), workdir, tc.on_corrupt_checkpoint)
    except checkpoints.CheckpointError as e:
        raise RunError(str(e)) from None
    if restored is not None:
        state, data_state = restored
        if data_state:
            train_it.set_state(data_state)
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    else:
        state = trainer.init()
    start, last = int(state.step), int(tc.num_steps)
    if snaps is not None:  # snapshots past the resumed step belong to the trajectory this run replaces
        for s in snaps.steps():
            if s > start:
                snaps.delete(s)

    prompts = _grid_prompts(cfg, info, enc) if tc.sample_every else []
    # The run's sampling settings; alignment guidance follows the run's heads (a config.alignment.clip_model is
    # for sampling and evaluation after training, not loaded here).
    heads = trainer.models.alignment is not None
    grid_pipe = pipeline.Text2Image(trainer.models, None, None, trainer.image_shape, mesh=trainer.mesh,
                                    **sampling_defaults(sc, cfg.alignment.guidance_scale if heads else 0.0))
    bar = None
    if lead and tc.progress_bar:
        bar = tqdm(total=last, initial=start, desc="train", dynamic_ncols=True)
    timer = {"time": time.perf_counter(), "step": start}
    metrics, seen = None, {}

    pending = []  # the newest checkpoint's step until a later update confirms it (settle)

    def settle(step, g):
        """The newest checkpoint is confirmed once a later check shows the update after it was not the first of the
        skipped run now going on; if it was, its parameters are those of a diverging update (finite, useless):
        it is moved to WORKDIR/suspect_checkpoints, and the one before it is again the newest."""
        if not pending or step <= pending[0]:
            return
        if g["consecutive"] and g["last_skipped"] - g["consecutive"] + 1 == pending[0] + 1:
            checkpoints.move_aside(ckpt, {pending[0]: f"the update after it, step {pending[0] + 1}, diverged"},
                                   os.path.join(workdir, "suspect_checkpoints"), "suspect")
        pending.clear()

    def check(step):
        g = fetch_guard(state.guard)
        settle(step, g)  # before check_guard, whose message names the newest checkpoint
        return check_guard(g, step, tc.on_nonfinite, tc.max_consecutive_skips, ckpt.latest_step(), seen)

    def log_metrics(step):
        check(step)
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - timer["time"]) / max(step - timer["step"], 1)
        timer.update(time=now, step=step)
        m.update(step_time=dt, images_per_second=tc.batch_size / dt)
        writer.write_scalars(step, m, prefix="train/")
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_second']:.0f}")
        elif lead:
            extra = f" (alignment term {m['alignment_loss']:.4f})" if "alignment_loss" in m else ""
            logging.info("step %d: loss %.4f%s, %.2f s/step, %.0f images/s", step, m["loss"], extra, m["step_time"],
                         m["images_per_second"])

    def write_eval_loss(step):
        it = make_dataset(cfg.data, enc, split=cfg.data.eval_split, seed=cfg.seed, shuffle=False, **data_kw)
        key = jax.random.PRNGKey(cfg.seed + 2)
        vals = [trainer.eval_step(state, trainer.shard_batch(next(it)), key) for _ in range(tc.eval_batches)]
        writer.write_scalars(step, {"eval/loss": float(jnp.mean(jnp.stack(vals)))})

    def write_samples(step):
        pipe = grid_pipe.with_params(state.ema_params[trainer.models.component], state.text_params(ema=True),
                                   state.frozen.get("vae"), state.ema_params.get("alignment"))
        images = pipe.generate([p for p in prompts for _ in range(sc.images_per_prompt)], seed=cfg.seed + 1)
        if lead:
            grid = pixels.image_grid(images, rows=len(prompts))
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            pixels.save_image(grid, os.path.join(workdir, "samples", f"step_{step:06d}.png"), scale=2)
            writer.write_image(step, "samples", grid)

    actions = [Periodic(tc.log_every, log_metrics, last), Periodic(tc.eval_every, write_eval_loss, last, at_end=False),
               Periodic(tc.sample_every, write_samples, last)]
    checkpoint = Periodic(tc.checkpoint_every, None, last)
    snapshot = Periodic(int(cfg.ema.get("snapshot_every", 0)), None, last)  # 0 (never) exactly when snaps is None
    try:
        for step in range(start + 1, last + 1):
            state, metrics = trainer.step(state, trainer.shard_batch(next(train_it)))
            if bar is not None:
                bar.update(1)
            for action in actions:
                action(step)
            stop = step == stop_at or stop_request.requested or ckpt.reached_preemption(step)
            if snapshot.due(step):
                try:
                    snaps.save(step, posthoc_ema.snapshot_state(state), None, cfg, force=True)
                except Exception as e:
                    raise RunError(_save_failed(e, snaps)) from None
            # A state whose latest updates were skipped (a non-finite or spiking loss) is suspect: after a diverging
            # update its parameters are finite but useless, and saving it would rotate good checkpoints out
            # (training.keep_checkpoints). It is not saved; the newest good checkpoint stays the one to resume from.
            saving = checkpoint.due(step) or stop
            skipped = check(step)["consecutive"] if saving else 0
            suspect = skipped > 0
            if suspect:
                logging.warning("not saving step %d: its latest updates were skipped; the newest good checkpoint "
                                "(step %s) stays", step, ckpt.latest_step())
            elif saving:
                try:  # also raises the error of the previous asynchronous save, if it failed
                    ckpt.save(step, state, train_it.get_state(), cfg, force=bool(stop))
                except Exception as e:
                    raise RunError(_save_failed(e, ckpt)) from None
                pending[:] = [step]
            if suspect and step == last:
                raise RunError(f"the run ended at step {step} with its last {skipped} update(s) skipped (non-finite or "
                               f"spiking loss): the run diverged and its state was not saved; "
                               + (f"the last good checkpoint (step {ckpt.latest_step()}) is intact"
                                  if ckpt.latest_step() else "no good checkpoint is on disk")
                               + "; lower optim.learning_rate")
            if stop:
                why = stop_request.requested or ("a preemption notice" if step != stop_at else "stop_at")
                logging.warning("stopped at step %d by %s, %s; the same command resumes", step, why,
                                "its state not saved (suspect)" if suspect else "with a checkpoint")
                break
    finally:
        if bar is not None:
            bar.close()
    return state
