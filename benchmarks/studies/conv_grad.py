"""Banded vs XLA convolution weight gradients (``UNetConfig.conv_impl``), per layer and per training step.

    .venv/bin/python benchmarks/studies/conv_grad.py                 # layers of the demo U-Net + its train step
    .venv/bin/python benchmarks/studies/conv_grad.py --no-step       # layers only (a minute)

*layers*: the weight gradient alone (``jax.vjp`` of the convolution w.r.t. the kernel, jitted) for the 3x3
stride-1 convolutions of the fashion_mnist U-Net at batch 64 (28x28: 24 and 48 channels, the up path's
concatenated inputs; 14x14; 7x7), XLA's transposed convolution vs :func:`diffjax.models.cpu_kernels.banded_conv`'s
sum over bands of ~7 output rows. *step*: the demo config's whole jitted ``Trainer.step`` (forward,
backward, Adam, EMA) with ``conv_impl="xla"`` vs ``"banded"``, one synthetic batch on the device.
The two variants alternate (rounds) so that drifting machine load hits both alike; medians are reported
with the ratio xla / banded (> 1: banded is faster). Results are recorded in docs/lab_notebook.md.
The convolutions run on XLA's own kernels, as the command line runs them (``diffjax.xla_cpu``; there the automatic
``conv_impl`` is ``"xla"``); ``DIFFJAX_XLA_CPU_CONVOLUTIONS=off`` measures them on YNNPACK's (there: ``"banded"``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import xla_cpu
from diffjax.models.cpu_kernels import banded_conv

XLA_CONVOLUTIONS = xla_cpu.use_xla_convolutions()  # as the command line runs (DIFFJAX_XLA_CPU_CONVOLUTIONS=off: not)

# (batch, rows, columns, in channels, out channels) of the demo U-Net's 3x3 stride-1 convolutions.
LAYERS = [
    (64, 28, 28, 24, 24),  # level 0 res blocks
    (64, 28, 28, 48, 24),  # level 0 up path: concatenated skip
    (64, 28, 28, 48, 48),  # level 1 -> 0 upsampling convolution
    (64, 14, 14, 48, 48),  # level 1 res blocks
    (64, 14, 14, 96, 48),  # level 1 up path
    (64, 7, 7, 96, 48),  # level 2 up path (one band: the same computation)
]
PAD = ((1, 1), (1, 1))


def _time(fn, *args, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n


def layers(rounds: int, n: int) -> None:
    def xla_dw(x, w, g):
        conv = lambda w_: jax.lax.conv_general_dilated(x, w_, (1, 1), PAD,  # noqa: E731
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.vjp(conv, w)[1](g)[0]

    def banded_dw(x, w, g):
        return jax.vjp(lambda w_: banded_conv(x, w_, PAD), w)[1](g)[0]

    print("weight gradient of one 3x3 convolution, ms (median of rounds):")
    print(f"{'B, H, W, Cin -> Cout':>24} {'xla':>8} {'banded':>8} {'xla/banded':>11} {'max rel. diff':>14}")
    rng = np.random.default_rng(0)
    for b, h, w, c, d in LAYERS:
        x = jnp.asarray(rng.standard_normal((b, h, w, c), np.float32))
        k = jnp.asarray(rng.standard_normal((3, 3, c, d), np.float32))
        g = jnp.asarray(rng.standard_normal((b, h, w, d), np.float32))
        fx, fb = jax.jit(xla_dw), jax.jit(banded_dw)
        ref, got = fx(x, k, g), fb(x, k, g)
        diff = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        tx, tb = [], []
        for _ in range(rounds):
            tx.append(_time(fx, x, k, g, n=n))
            tb.append(_time(fb, x, k, g, n=n))
        mx, mb = statistics.median(tx) * 1e3, statistics.median(tb) * 1e3
        print(f"{f'{b}, {h}, {w}, {c} -> {d}':>24} {mx:8.1f} {mb:8.1f} {mx / mb:11.2f} {diff:14.1e}", flush=True)


def step(config_path: str, rounds: int, n: int, sets: list[str]) -> None:
    from diffjax.config import load_config
    from diffjax.data import make_dataset
    from diffjax.train import Trainer

    runs = {}
    batch = None
    for impl in ("xla", "banded"):
        config = load_config(config_path, sets)
        config.model.unet.conv_impl = impl
        trainer = Trainer(config)
        state = trainer.init()
        if batch is None:
            it = make_dataset(config.data, trainer.models.text_encoder, split=config.data.train_split, seed=0,
                              global_batch_size=config.training.batch_size)
            batch = next(it)
        fixed = trainer.shard_batch(batch)
        for _ in range(2):  # compile and warm up
            state, metrics = trainer.step(state, fixed)
        jax.block_until_ready(metrics)
        runs[impl] = [trainer, state, fixed, []]

    for _ in range(rounds):
        for impl, run in runs.items():
            trainer, state, fixed, times = run
            start = time.perf_counter()
            for _ in range(n):
                state, metrics = trainer.step(state, fixed)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / n)
            run[1] = state
    tx, tb = (statistics.median(runs[i][3]) for i in ("xla", "banded"))
    print(f"train step of {config_path}{''.join(', ' + s for s in sets)}, batch {config.training.batch_size}, "
          f"s/step (median of {rounds} rounds of {n}):")
    print(f"  xla {tx:.3f}   banded {tb:.3f}   xla/banded {tx / tb:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/configs/fashion_mnist.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer-iters", type=int, default=5, help="timed calls per layer and round")
    parser.add_argument("--step-iters", type=int, default=4, help="timed train steps per variant and round")
    parser.add_argument("--no-step", action="store_true", help="skip the train-step comparison")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of the train step, e.g. --set model.unet.channels=32")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), jax {jax.__version__}; XLA:CPU convolutions: "
          f"{'XLA' if XLA_CONVOLUTIONS else 'default (YNNPACK)'}")
    layers(args.rounds, args.layer_iters)
    if not args.no_step:
        step(args.config, args.rounds, args.step_iters, args.set)


if __name__ == "__main__":
    main()
