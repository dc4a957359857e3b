"""What the alignment term costs per train step, and alignment guidance per sampling step.

    .venv/bin/python benchmarks/studies/alignment_cost.py [--config experiments/configs/fashion_mnist.py --rounds 5]

Train: the config's real train step (``Trainer.step``: EMA, clipping, condition dropout) with
``alignment.weight`` 0 (no heads) against λ > 0 (heads on x̂0, the contrastive term over the batch), on the same
synthetic batches. Sampling: ``Text2Image.generate`` with the config's sampler and guidance, randomly initialised
parameters (the cost does not depend on them), without and with alignment guidance (one more network forward
and backward per step). Both pairs are compiled and warmed up first; rounds alternate; medians of images/s.

Where the sampling time goes (``--probe``, on by default): the guidance step's extra work, ∇_x sim(x̂0(x_t)) at the
sampling batch, timed as one call, as the body of a ``lax.scan`` (how the samplers run it) and of an unrolled scan,
beside the network's forward pass in a scan. On XLA's CPU backend the gradient's convolutions inside a while loop
are lowered to a generic convolution (kernel layout ``01oi``) instead of the fused YNNPACK one they get outside a
loop; the probe prints that per-step time and how many generic convolutions the compiled loop holds.
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
    parser.add_argument("--config", default="experiments/configs/fashion_mnist.py")
    parser.add_argument("--weight", type=float, default=0.1, help="λ of the aligned train step")
    parser.add_argument("--images", type=int, default=100, help="images per sampling call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="skip the per-step probe")
    args = parser.parse_args()
    import jax

    from diffjax.config import load_config
    from diffjax.pipeline import Text2Image
    from diffjax.train import Trainer

    def trainer(weight):
        config = load_config(args.config, [f"alignment.weight={weight}"])
        return Trainer(config)

    plain, aligned = trainer(0.0), trainer(args.weight)
    b = plain.config.training.batch_size
    rng = np.random.default_rng(0)
    prompts = [f"a photo of a {c}" for c in ("t-shirt", "trouser", "pullover", "dress", "coat", "bag")]
    labels = np.array([0, 1, 2, 3, 4, 8], np.int32)  # their Fashion-MNIST classes (alignment.positives=label)
    pick = rng.integers(0, len(prompts), b)
    ids, mask = plain.models.text_encoder.tokenize([prompts[i] for i in pick])
    batch = {"image": rng.uniform(-1, 1, (b,) + plain.image_shape).astype(np.float32), "token_ids": ids, "mask": mask,
             "label": labels[pick]}
    states = {}
    for name, tr in (("λ = 0", plain), (f"λ = {args.weight:g}", aligned)):
        states[name] = (tr, tr.init(), tr.shard_batch(batch))
    train_rate = {name: [] for name in states}
    for name, (tr, state, sb) in states.items():  # compile, warm up
        state, m = tr.step(state, sb)
        jax.block_until_ready(m["loss"])
        states[name] = (tr, state, sb)
    for _ in range(args.rounds):
        for name, (tr, state, sb) in states.items():
            t0 = time.perf_counter()
            for _ in range(3):
                state, m = tr.step(state, sb)
            jax.block_until_ready(m["loss"])
            train_rate[name].append(3 * b / (time.perf_counter() - t0))
            states[name] = (tr, state, sb)

    # Sampling: the aligned model's pipeline (random heads) with and without alignment guidance.
    tr, state, _ = states[f"λ = {args.weight:g}"]
    sc = tr.config.sampling
    pipe = Text2Image(tr.models, state.ema_params[tr.models.component], state.ema_params.get("text",
                      state.frozen.get("text")), tr.image_shape, sampler=sc.sampler, num_steps=sc.num_steps,
                      guidance_scale=sc.guidance_scale, timestep_spacing=sc.timestep_spacing,
                      alignment_params=state.ema_params["alignment"])
    sample_prompts = (prompts * args.images)[: args.images]
    jobs = {"without": 0.0, "with alignment guidance": 1.0}
    for s in jobs.values():
        pipe.generate(sample_prompts, seed=0, batch_size=args.images, alignment_guidance_scale=s)
    sample_rate = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, s in jobs.items():
            t0 = time.perf_counter()
            pipe.generate(sample_prompts, seed=0, batch_size=args.images, alignment_guidance_scale=s)
            sample_rate[name].append(args.images / (time.perf_counter() - t0))
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    tm, sm = med(train_rate), med(sample_rate)
    dev = jax.devices()[0]
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}; {args.config}, batch {b}; {sc.sampler} "
          f"{sc.num_steps} steps, guidance {sc.guidance_scale}, {args.images} images; medians of {args.rounds} rounds")
    names = list(tm)
    print(f"train step: {names[0]} {tm[names[0]]:.1f} images/s, {names[1]} {tm[names[1]]:.1f} images/s; "
          f"ratio {tm[names[1]] / tm[names[0]]:.3f}")
    print(f"sampling: without {sm['without']:.2f} images/s, with alignment guidance "
          f"{sm['with alignment guidance']:.2f} images/s; ratio {sm['with alignment guidance'] / sm['without']:.3f}")
    if args.probe:
        probe(tr, state, sample_prompts, args.rounds)


def probe(tr, state, prompts, rounds, length=4):
    """Seconds per call of the guidance gradient outside a loop, in lax.scan and in an unrolled scan."""
    import jax
    import jax.numpy as jnp

    from diffjax import guidance, schedules as sch

    m, b = tr.models, len(prompts)
    dp, ap = state.ema_params[m.component], state.ema_params["alignment"]
    tp = state.ema_params.get("text", state.frozen.get("text"))
    ids, mask = m.text_encoder.tokenize(prompts)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b,) + tr.image_shape), jnp.float32)
    t = jnp.full((b,), m.schedule.num_timesteps / 2, jnp.float32)

    def grad_sim(x, cond):
        den = m.model_fn(dp)

        def sim(x):
            a, s = guidance.vp_coefficients(m.schedule, t, x.ndim)
            x0 = sch.x0_from_prediction(den(x, t, cond), x, a, s, m.prediction_type)
            return jnp.sum(m.alignment.similarity(ap, x0, cond.pooled))

        return jax.grad(sim)(x)

    def forward(x, cond):
        return m.model_fn(dp)(x, t, cond)

    def program(f, unroll=None):
        """The prompts encoded once, then ``f`` alone (``unroll`` None) or as the body of a scan of ``length``."""
        def run(x):
            cond = m.text_encoder.encode(tp, ids, mask, trainable=False)
            if unroll is None:
                return f(x, cond)
            return jax.lax.scan(lambda x, _: (x + 1e-3 * f(x, cond), None), x, None, length=length, unroll=unroll)[0]

        return jax.jit(run)

    jobs = {"gradient, one call": (program(grad_sim), 1), "gradient in lax.scan": (program(grad_sim, 1), length),
            "gradient in unrolled scan": (program(grad_sim, True), length),
            "forward in lax.scan": (program(forward, 1), length)}
    times = {}
    for name, (fn, n) in jobs.items():
        jax.block_until_ready(fn(x))
        runs = []
        for _ in range(max(1, rounds)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            runs.append((time.perf_counter() - t0) / n)
        times[name] = statistics.median(runs)
    hlo = jobs["gradient in lax.scan"][0].lower(x).compile().as_text()
    generic = sum(1 for line in hlo.splitlines() if " convolution(" in line and "_01oi->" in line)
    print(f"probe, batch {b}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items())
          + f"; generic 01oi convolutions in the compiled scan: {generic}")


if __name__ == "__main__":
    main()
