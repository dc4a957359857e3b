"""Sampling with guidance in a limited interval of noise levels against guidance at every step.

    .venv/bin/python benchmarks/studies/guidance_interval.py --workdir runs/demo [--interval 0.28,5.42 --rounds 5]

Outside the interval a step runs the conditional branch alone (half the network's batch), so a run is cheaper in
proportion to the steps it leaves unguided. Both programs are compiled and warmed up first; rounds alternate;
medians of images/s. The first line names the device and how many of the steps the interval guides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/demo", help="a training run (its latest checkpoint is sampled)")
    parser.add_argument("--interval", default="0.28,5.42", help="sigma_lo,sigma_hi")
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import jax

    from diffjax import samplers
    from diffjax.guidance import check_guidance_interval
    from diffjax.pipeline import Text2Image

    pipe = Text2Image.from_checkpoint(args.workdir)
    interval = check_guidance_interval(args.interval, "--interval")
    prompts = [f"a photo of a {c}" for c in ("t-shirt", "trouser", "pullover", "dress", "coat")]
    prompts = (prompts * args.images)[: args.images]
    kw = dict(seed=0, guidance_scale=args.scale, batch_size=args.images)
    jobs = {"every step": dict(kw), "interval": dict(kw, guidance_interval=interval)}
    for job in jobs.values():
        pipe.generate(prompts, **job)  # compile, warm up
    times = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            pipe.generate(prompts, **job)
            times[name].append(args.images / (time.perf_counter() - t0))
    n = pipe.defaults["num_steps"]
    ts = samplers.spaced_timesteps(pipe.models.schedule.num_timesteps, n, pipe.timestep_spacing or "leading", 0)
    sigmas = np.interp(ts.astype(float), np.arange(pipe.models.schedule.num_timesteps), pipe.models.schedule.sigmas)
    guided = int(np.sum((sigmas > interval[0]) & (sigmas <= interval[1])))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax {jax.__version__}; {pipe.defaults['sampler']}"
          f" {n} steps, {args.images} images, guidance {args.scale}; the interval {interval} guides {guided} of the "
          f"{n} steps; medians of {args.rounds} rounds")
    print(f"every step guided: {med['every step']:.2f} images/s; interval: {med['interval']:.2f} images/s; "
          f"ratio {med['interval'] / med['every step']:.2f} (if the network is all the cost: "
          f"{2 * n / (n + guided):.2f})")


if __name__ == "__main__":
    main()
