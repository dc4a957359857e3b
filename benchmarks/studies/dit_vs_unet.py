"""The DiT and the U-Net of the Fashion-MNIST configs side by side: FLOPs per train step (XLA's cost analysis),
train-step images/s and sampling images/s, measured in one process, rounds alternating, medians.

    .venv/bin/python benchmarks/studies/dit_vs_unet.py [--rounds 3 --steps 5 --sample-batch 64]

Both use the jitted, sharded ``Trainer.step`` of experiments/configs/fashion_mnist.py and fashion_mnist_dit.py on
one synthetic batch of 64 already on the device, and ``Text2Image.generate`` (DPM-Solver++ 20 steps, guidance 5,
text encoding included) with the models' initial EMA parameters, perturbed so that no layer is zero.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np

CONFIGS = {"U-Net": "experiments/configs/fashion_mnist.py", "DiT": "experiments/configs/fashion_mnist_dit.py"}


def setup(path: str, sample_batch: int):
    from diffjax.config import load_config

    from diffjax.models.layers import count_params
    from diffjax.pipeline import Text2Image
    from diffjax.train import Trainer

    # Both at the recipe of the measured comparison (docs/lab_notebook.md): the demo config has since added the
    # alignment term.
    config = load_config(path, ["alignment.weight=0.0", "sampling.guidance_scale=5.0"])
    trainer = Trainer(config, image_shape=(28, 28, 1))
    rng = np.random.default_rng(0)
    b = config.training.batch_size
    ids, mask = trainer.models.text_encoder.tokenize(["a photo of a sneaker", "an ankle boot"] * (b // 2))
    batch = trainer.shard_batch({"image": rng.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32), "token_ids": ids,
                                 "mask": mask})
    state = trainer.init()
    flops = trainer.step.lower(state, batch).cost_analysis()["flops"]
    net = state.ema_params[trainer.models.component]
    noisy = jax.tree_util.tree_map(lambda x: x + 0.02 * np.asarray(rng.standard_normal(x.shape), x.dtype), net)
    sc = config.sampling
    text = jax.tree_util.tree_map(jnp.copy, state.text_params(ema=True))  # the train step donates the state's
    pipe = Text2Image(trainer.models, noisy, text, (28, 28, 1), sampler=sc.sampler,
                      num_steps=sc.num_steps, guidance_scale=sc.guidance_scale, timestep_spacing=sc.timestep_spacing)
    prompts = ["a photo of a bag", "a dress"] * (sample_batch // 2)
    return dict(trainer=trainer, batch=batch, state=state, flops=flops, pipe=pipe, prompts=prompts, batch_size=b,
                params=count_params(net))


def time_train(s, steps: int) -> float:
    state = s["state"]
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = s["trainer"].step(state, s["batch"])
    jax.block_until_ready(metrics)
    s["state"] = state
    return steps * s["batch_size"] / (time.perf_counter() - t0)


def time_sample(s) -> float:
    t0 = time.perf_counter()
    images = s["pipe"].generate(s["prompts"], seed=1, batch_size=len(s["prompts"]))
    return len(images) / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="train steps per round")
    parser.add_argument("--sample-batch", type=int, default=64)
    args = parser.parse_args()
    setups = {name: setup(path, args.sample_batch) for name, path in CONFIGS.items()}
    for s in setups.values():  # warm-up: compile and run once
        time_train(s, 1)
        time_sample(s)
    train = {name: [] for name in setups}
    sample = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, s in setups.items():
            train[name].append(time_train(s, args.steps))
            sample[name].append(time_sample(s))
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds")
    print(f"{'':6s} {'parameters':>11s} {'GFLOP/step':>11s} {'train img/s':>12s} {'sample img/s':>13s}")
    for name, s in setups.items():
        print(f"{name:6s} {s['params']:11,d} {s['flops'] / 1e9:11.1f} {statistics.median(train[name]):12.1f} "
              f"{statistics.median(sample[name]):13.2f}")
    u, d = setups["U-Net"], setups["DiT"]
    print(f"DiT / U-Net: FLOPs {d['flops'] / u['flops']:.2f}, train images/s "
          f"{statistics.median(train['DiT']) / statistics.median(train['U-Net']):.2f}, sampling images/s "
          f"{statistics.median(sample['DiT']) / statistics.median(sample['U-Net']):.2f}")


if __name__ == "__main__":
    main()
