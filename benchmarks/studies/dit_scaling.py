"""The DiT's scaling on the embedded Fashion-MNIST: held-out loss of DiT presets trained for the same number of
steps on the same batches (Peebles & Xie 2023, Fig. 2: larger models reach lower loss at equal steps).

    .venv/bin/python benchmarks/studies/dit_scaling.py --presets tiny,S/2,B/2 --patch 4 --steps 200 --batch 16

Each preset keeps its width, depth and heads (tiny: 32 x 2, S: 384 x 12, B: 768 x 12) and takes the rest from
experiments/configs/fashion_mnist_dit.py (one input channel, the tiny CLIP text encoder, v-prediction, min-SNR,
learning rate 3e-3 with 100 warm-up steps; ``--lr`` and ``--warmup`` override them); ``--patch`` sets the patch size of all (4: 49
tokens per 28x28 image, so that B fits a CPU). The loss is the EMA model's weighted diffusion loss on 8 fixed
test batches with fixed t and noise (``Trainer.eval_step``), also printed every ``--log-every`` steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp


def run(preset: str, args) -> list[tuple[int, float]]:
    from diffjax import config as defaults
    from diffjax.config import load_config
    from diffjax.data import make_dataset
    from diffjax.models.layers import count_params
    from diffjax.train import Trainer

    config = load_config("experiments/configs/fashion_mnist_dit.py")
    fields = {k: v for k, v in defaults.dit_config("fashion_mnist").items() if k != "preset"}
    keep = defaults.dit_config(preset)
    fields.update(hidden_size=keep.hidden_size, depth=keep.depth, num_heads=keep.num_heads, patch_size=args.patch)
    config.model.dit = defaults.dit_config("fashion_mnist", **fields)
    config.model.dit.preset = preset
    config.training.batch_size, config.training.num_steps = args.batch, args.steps
    if args.lr:
        config.optim.learning_rate = args.lr
    if args.warmup is not None:
        config.optim.warmup_steps = args.warmup
    trainer = Trainer(config)
    enc = trainer.models.text_encoder
    train_it = make_dataset(config.data, enc, split=config.data.train_split, global_batch_size=args.batch, seed=0)
    test_it = make_dataset(config.data, enc, split=config.data.eval_split, global_batch_size=args.batch, seed=0,
                           shuffle=False)
    held_out = [trainer.shard_batch(next(test_it)) for _ in range(8)]
    key = jax.random.PRNGKey(7)

    def loss(state):
        return float(jnp.mean(jnp.stack([trainer.eval_step(state, b, key) for b in held_out])))

    state = trainer.init()
    n = count_params(state.params[trainer.models.component])
    curve, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        state, _ = trainer.step(state, trainer.shard_batch(next(train_it)))
        if step % args.log_every == 0 or step == args.steps:
            curve.append((step, loss(state)))
            print(f"{preset} ({n:,} parameters) step {step}: held-out loss {curve[-1][1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return curve


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="tiny,S/2,B/2")
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.0, help="peak learning rate (default: the config's)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the config's)")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    curves = {p: run(p, args) for p in args.presets.split(",")}
    print(f"\njax {jax.__version__}, {jax.devices()[0].platform}; patch {args.patch}, batch {args.batch}")
    steps = [s for s, _ in next(iter(curves.values()))]
    print("step " + " ".join(f"{p:>8s}" for p in curves))
    for i, s in enumerate(steps):
        print(f"{s:4d} " + " ".join(f"{curves[p][i][1]:8.4f}" for p in curves))


if __name__ == "__main__":
    main()
