"""The training run: data, resume, periodic metrics / sample grids / held-out loss / checkpoints.

The only module that imports both training (``diffjax.train``: the compiled, sharded steps) and generation
(``diffjax.pipeline``: the sample grids). Periodic work is written once, as :class:`Periodic` actions
(the shape of clu's periodic actions in Flax's examples) rather than a chain of ``if step % n`` blocks::

    trainer = Trainer(config)
    state = loop.train(trainer, workdir)          # resumes from workdir's latest checkpoint if any
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffjax import pipeline
from diffjax.checkpoints import Checkpointer
from diffjax.train import Trainer, TrainState


class MetricWriter:
    """TensorBoard event files through tensorboardX (no TensorFlow needed); a no-op on processes other
    than 0, so that every process can call it."""

    def __init__(self, logdir: str):
        self._w = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

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


def train(trainer: Trainer, workdir: str, stop_at: Optional[int] = None) -> TrainState:
    """The whole run: resume from ``workdir``'s latest checkpoint if any, train to ``training.num_steps`` with
    metrics (TensorBoard + progress bar or log lines), sample grids, held-out loss and checkpoints.
    ``stop_at`` ends the run early after that step, with a checkpoint (as a preemption would)."""
    from diffjax.data import describe_dataset, make_dataset

    cfg, tc, sc = trainer.config, trainer.config.training, trainer.config.sampling
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    info = describe_dataset(cfg.data, cfg.data.train_split)
    if tuple(info.image_shape) != tuple(trainer.image_shape):
        raise ValueError(f"data gives images of shape {info.image_shape}, the model is built for "
                         f"{trainer.image_shape} (config.data.image_size / channels)")
    enc = trainer.models.text_encoder
    data_kw = dict(global_batch_size=tc.batch_size, process_index=jax.process_index(),
                   process_count=jax.process_count())
    train_it = make_dataset(cfg.data, enc, split=cfg.data.train_split, seed=cfg.seed, **data_kw)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state, data_state, _ = ckpt.restore(trainer.restore_target())
        if data_state:
            train_it.set_state(data_state)
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    else:
        state = trainer.init()
    start, last = int(state.step), int(tc.num_steps)

    writer = MetricWriter(os.path.join(workdir, "tensorboard"))
    prompts = [p for p in sc.prompts.split("|") if p] if sc.prompts else info.prompts()
    sampler = pipeline.Text2Image(trainer.models, None, None, trainer.image_shape, sampler=sc.sampler,
                                  num_steps=sc.num_steps, guidance_scale=sc.guidance_scale,
                                  timestep_spacing=sc.timestep_spacing, mesh=trainer.mesh)
    bar = None
    if lead and tc.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=last, initial=start, desc="train", dynamic_ncols=True)
    timer = {"time": time.perf_counter(), "step": start}
    metrics = None

    def log_metrics(step):
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - timer["time"]) / max(step - timer["step"], 1)
        timer.update(time=now, step=step)
        m.update(step_time=dt, images_per_second=tc.batch_size / dt)
        writer.write_scalars(step, m, prefix="train/")
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_second']:.0f}")
        elif lead:
            logging.info("step %d: loss %.4f, %.2f s/step, %.0f images/s", step, m["loss"], m["step_time"],
                         m["images_per_second"])

    def evaluate(step):
        it = make_dataset(cfg.data, enc, split=cfg.data.eval_split, seed=cfg.seed, shuffle=False, **data_kw)
        key = jax.random.PRNGKey(cfg.seed + 2)
        vals = [trainer.eval_step(state, trainer.shard_batch(next(it)), key) for _ in range(tc.eval_batches)]
        writer.write_scalars(step, {"eval/loss": float(jnp.mean(jnp.stack(vals)))})

    def write_samples(step):
        pipe = sampler.with_params(state.ema_params["unet"], state.text_params(ema=True))
        images = pipe.generate([p for p in prompts for _ in range(sc.images_per_prompt)], seed=cfg.seed + 1)
        if lead:
            grid = pipeline.image_grid(images, rows=len(prompts))
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            pipeline.save_image(grid, os.path.join(workdir, "samples", f"step_{step:06d}.png"), scale=2)
            writer.write_image(step, "samples", grid)

    actions = [Periodic(tc.log_every, log_metrics, last), Periodic(tc.eval_every, evaluate, last, at_end=False),
               Periodic(tc.sample_every, write_samples, last)]
    checkpoint = Periodic(tc.checkpoint_every, None, last)
    for step in range(start + 1, last + 1):
        state, metrics = trainer.step(state, trainer.shard_batch(next(train_it)))
        if bar is not None:
            bar.update(1)
        for action in actions:
            action(step)
        stop = step == stop_at or ckpt.reached_preemption(step)
        if checkpoint.due(step) or stop:
            ckpt.save(step, state, train_it.get_state(), cfg, force=stop)
        if stop:
            logging.warning("stopping at step %d with a checkpoint", step)
            break
    ckpt.close()
    if bar is not None:
        bar.close()
    writer.close()
    return state
