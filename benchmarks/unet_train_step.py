"""Time one jitted training step of the diffjax U-Net against diffusers' FlaxUNet2DConditionModel.

Both networks get the same architecture (channels, levels, res blocks, heads, cross-attention width),
the same inputs (image size, batch, text length) and the same step: forward, MSE loss against a random
target, backward, optax.adam update, parameters and optimizer state donated. diffjax additionally applies
a text padding mask (diffusers' Flax U-Net has none), so it does slightly more work.

The steps of the two models are interleaved (diffjax, diffusers, diffjax, ...) so that load from other
processes on the machine hits both alike; the median over --steps timed steps after --warmup is reported.

    .venv/bin/python benchmarks/unet_train_step.py                       # default small size
    .venv/bin/python benchmarks/unet_train_step.py --channels 64 --mult 1,2,2 --res-blocks 2 --image-size 32

Requires diffusers==0.39.0 (the last release with Flax classes).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its Flax classes log a deprecation note per module

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffjax.models import UNet, UNetConfig, count_params


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip() != "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=32,
                   help="base channels (multiple of 32: diffusers uses 32 groups)")
    p.add_argument("--mult", type=_ints, default=(1, 2, 2), help="channel multipliers, comma-separated")
    p.add_argument("--res-blocks", type=int, default=1, help="res blocks per level")
    p.add_argument("--attn-levels", type=_ints, default=(0, 1),
                   help="levels with cross-attention transformers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--context-dim", type=int, default=64, help="text state width")
    p.add_argument("--text-len", type=int, default=16, help="text length")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model after compilation")
    p.add_argument(
        "--diffusers-proj", default="linear", choices=["linear", "conv"],
        help="diffusers' transformer proj_in/out: Dense (use_linear_projection=True) or 1x1 conv",
    )
    p.add_argument("--attention-impl", default=None, choices=["dpa", "xla", "cudnn", "einsum"],
                   help="diffjax's UNetConfig.attention_impl (default: auto, i.e. einsum on CPU)")
    p.add_argument("--diffusers-split-head-dim", action="store_true", help="diffusers' split_head_dim=True")
    p.add_argument("--only", choices=["diffjax", "diffusers"], help="time one model only")
    return p.parse_args(argv)


def diffjax_model(a):
    cfg = UNetConfig(
        in_channels=a.in_channels, channels=a.channels, channel_mult=a.mult, num_res_blocks=a.res_blocks,
        attention_levels=a.attn_levels, mid_attention=True, num_heads=a.heads, context_dim=a.context_dim,
        norm_groups=32, flip_sin_to_cos=True, freq_shift=0.0, dtype=a.dtype,
        **({"attention_impl": a.attention_impl} if a.attention_impl else {}),
    )
    model = UNet(cfg)

    def init(key, x, t, text, mask):
        return model.init(key, x, t, text, mask)["params"]

    def apply(params, x, t, text, mask):
        return model.apply({"params": params}, x, t, text, mask, train=True)

    return cfg, init, apply


def diffusers_model(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import FlaxUNet2DConditionModel

    n = len(a.mult)
    down = tuple("CrossAttnDownBlock2D" if i in a.attn_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i in a.attn_levels else "UpBlock2D" for i in reversed(range(n)))
    model = FlaxUNet2DConditionModel(
        sample_size=a.image_size, in_channels=a.in_channels, out_channels=a.in_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(a.channels * m for m in a.mult),
        layers_per_block=a.res_blocks,
        attention_head_dim=a.heads,  # in diffusers' Flax U-Net this is the number of heads
        cross_attention_dim=a.context_dim, use_linear_projection=a.diffusers_proj == "linear",
        split_head_dim=a.diffusers_split_head_dim, flip_sin_to_cos=True, freq_shift=0,
        dtype=jnp.dtype(a.dtype),
    )

    def init(key, x, t, text, mask):
        return model.init(key, jnp.transpose(x, (0, 3, 1, 2)), t, text)["params"]

    def apply(params, x, t, text, mask):
        out = model.apply({"params": params}, jnp.transpose(x, (0, 3, 1, 2)), t, text, train=True).sample
        return jnp.transpose(out, (0, 2, 3, 1))

    return model, init, apply


def make_step(apply, tx):
    def step(params, opt_state, x, t, text, mask, target):
        def loss_fn(p):
            return jnp.mean((apply(p, x, t, text, mask) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None):
    a = parse_args(argv)
    rng = np.random.default_rng(0)
    s = a.image_size
    x = jnp.asarray(rng.standard_normal((a.batch, s, s, a.in_channels), np.float32))
    target = jnp.asarray(rng.standard_normal((a.batch, s, s, a.in_channels), np.float32))
    t = jnp.asarray(rng.integers(0, 1000, (a.batch,)), jnp.int32)
    text = jnp.asarray(rng.standard_normal((a.batch, a.text_len, a.context_dim), np.float32))
    lengths = rng.integers(a.text_len // 2, a.text_len + 1, (a.batch,))
    mask = jnp.asarray(np.arange(a.text_len)[None, :] < lengths[:, None])
    tx = optax.adam(1e-4)
    key = jax.random.key(0, impl="rbg")

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"size: channels={a.channels} mult={a.mult} res_blocks={a.res_blocks} attn_levels={a.attn_levels} "
          f"heads={a.heads} context_dim={a.context_dim} text_len={a.text_len} image={s}x{s}x{a.in_channels} "
          f"batch={a.batch} dtype={a.dtype}")

    builders = {"diffjax": diffjax_model, "diffusers": diffusers_model}
    names = [a.only] if a.only else ["diffjax", "diffusers"]
    state, counts, steps = {}, {}, {}
    for name in names:
        _, init, apply = builders[name](a)
        params = jax.jit(init)(key, x, t, text, mask)
        counts[name] = count_params(params)
        steps[name] = make_step(apply, tx)
        opt_state = tx.init(params)
        t0 = time.perf_counter()
        params, opt_state, loss = steps[name](params, opt_state, x, t, text, mask, target)
        loss.block_until_ready()
        print(f"{name:9s}: {counts[name]:,} parameters; compile + first step "
              f"{time.perf_counter() - t0:.1f} s, loss {float(loss):.4f}")
        for _ in range(a.warmup):
            params, opt_state, loss = steps[name](params, opt_state, x, t, text, mask, target)
        loss.block_until_ready()
        state[name] = (params, opt_state)

    times = {name: [] for name in names}
    for _ in range(a.steps):
        for name in names:
            params, opt_state = state[name]
            t0 = time.perf_counter()
            params, opt_state, loss = steps[name](params, opt_state, x, t, text, mask, target)
            loss.block_until_ready()
            times[name].append(time.perf_counter() - t0)
            state[name] = (params, opt_state)

    med = {name: statistics.median(v) for name, v in times.items()}
    for name in names:
        v = times[name]
        print(f"{name:9s}: median step {1e3 * med[name]:.1f} ms "
              f"(min {1e3 * min(v):.1f}, max {1e3 * max(v):.1f}, {len(v)} steps)")
    if len(names) == 2:
        print(f"parameters diffjax/diffusers: {counts['diffjax'] / counts['diffusers']:.4f}")
        ratio = med["diffjax"] / med["diffusers"]
        ratio_min = min(times["diffjax"]) / min(times["diffusers"])
        print(f"step time diffjax/diffusers: median {ratio:.3f}, min {ratio_min:.3f} "
              f"({'diffjax faster' if ratio < 1 else 'diffjax SLOWER'})")
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return med


if __name__ == "__main__":
    main()
