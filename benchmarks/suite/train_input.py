"""Is the input pipeline ever the bottleneck? Train steps/s fed by the real pipeline vs one synthetic batch.

    .venv/bin/python benchmarks/suite/train_input.py                          # the fashion_mnist (demo) config
    .venv/bin/python benchmarks/suite/train_input.py --unet=tiny --steps=40   # a much faster step: a harder test

Both loops run the same jitted, sharded ``Trainer.step`` on the same state. *synthetic*: one batch, already
on the devices, fed again every step (the upper bound: no input work at all). *real*: every step takes the
next batch from the grain iterator of ``make_dataset`` (decode from the in-memory copy, random flip,
captions picked and tokenized, float conversion) and ``Trainer.shard_batch`` puts it on the devices, as the
training loop does. The two alternate in rounds, so that drifting machine load hits both alike; the ratio
of their throughputs is the figure (≥ 0.95 means the pipeline costs at most 5%). Results go to stdout and
are recorded in docs/lab_notebook.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # experiments/ configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/configs/fashion_mnist.py")
    parser.add_argument("--unet", default="", help="replace the config's U-Net by this preset (e.g. tiny)")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.num_threads=1 (repeatable)")
    args = parser.parse_args()

    import jax

    from diffjax import config as defaults
    from diffjax.config import load_config
    from diffjax.data import make_dataset
    from diffjax.train import Trainer

    config = load_config(args.config, args.set)
    if args.unet:
        config.model.unet = defaults.unet_config(args.unet, in_channels=config.data.channels)
    if args.batch_size:
        config.training.batch_size = args.batch_size
    trainer = Trainer(config)
    state = trainer.init()
    it = make_dataset(config.data, trainer.models.text_encoder, split=config.data.train_split, seed=0,
                      global_batch_size=config.training.batch_size)
    fixed = trainer.shard_batch(next(it))
    for _ in range(3):  # compile and warm both paths
        state, m = trainer.step(state, fixed)
        state, m = trainer.step(state, trainer.shard_batch(next(it)))
    jax.block_until_ready(m)

    def timed(real: bool) -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = trainer.step(state, trainer.shard_batch(next(it)) if real else fixed)
        jax.block_until_ready(metrics)
        return args.steps / (time.perf_counter() - start)

    synth, real = [], []
    for _ in range(args.rounds):
        synth.append(timed(False))
        real.append(timed(True))
    s, r = sum(synth) / len(synth), sum(real) / len(real)
    print(f"machine: {platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"jax {jax.__version__}; config {args.config}{' unet=' + args.unet if args.unet else ''}, "
          f"global batch {config.training.batch_size}" + "".join(f", {x}" for x in args.set))
    print(f"synthetic batch: {s:.3f} steps/s ({' '.join(f'{x:.3f}' for x in synth)})")
    print(f"real pipeline:   {r:.3f} steps/s ({' '.join(f'{x:.3f}' for x in real)})")
    print(f"real / synthetic = {r / s:.3f}")


if __name__ == "__main__":
    main()
