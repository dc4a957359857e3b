"""Print the parameter counts of the U-Net and DiT presets (abstract init via jax.eval_shape: no memory, seconds).

    .venv/bin/python benchmarks/studies/param_counts.py

Counted: every leaf of the ``params`` collection returned by ``UNet(cfg).init`` (kernels, biases,
GroupNorm/LayerNorm scales and offsets, the label/pooled embeddings when configured), summed over
``np.prod(leaf.shape)``; with text inputs so that cross-attention parameters exist. Parameter counts do not
depend on the image size. The DiT presets are counted as configured (text cross-attention of width
``context_dim``) and in the paper's class-conditional form (1000 classes + null, learned sigma, no text), which
Peebles & Xie 2023 report as 33M (S/2), 130M (B/2), 458M (L/2) and 675M (XL/2).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax

import jax.numpy as jnp

from diffjax.models import DIT_PRESETS, PRESETS, DiT, UNet, count_params, dit_preset, unet_preset

# Reference figures: Ho et al. 2020 (DDPM CIFAR-10: 35.7M; reimplementations of that architecture count
# 35,746,307) and Stable Diffusion v1's U-Net (859,520,964 parameters).
DDPM_CIFAR10 = 35.7e6
SD_V1 = 859_520_964


def abstract_params(cfg, image_size=32):
    model = UNet(cfg)
    return jax.eval_shape(lambda k: model.init_params(k, image_size), jax.random.key(0))


def breakdown(params) -> dict[str, int]:
    """Parameters by part: residual blocks, attention blocks, resampling, the rest."""
    parts = {"res blocks": 0, "attention": 0, "resample": 0, "other": 0}
    for name, sub in params.items():
        if "_attn" in name:
            key = "attention"
        elif "sample" in name:
            key = "resample"
        elif "_res_" in name:
            key = "res blocks"
        else:
            key = "other"
        parts[key] += count_params(sub)
    return parts


def main():
    rows = []
    for name in PRESETS:
        cfg = unet_preset(name)
        params = abstract_params(cfg)
        rows.append((name, cfg, count_params(params), breakdown(params)))

    print(f"{'preset':14s} {'parameters':>14s}  {'res blocks':>12s} {'attention':>12s} {'resample':>10s} "
          f"{'other':>9s}")
    for name, cfg, n, parts in rows:
        print(f"{name:14s} {n:14,d}  {parts['res blocks']:12,d} {parts['attention']:12,d} "
              f"{parts['resample']:10,d} {parts['other']:9,d}")

    print()
    ddpm = dict((r[0], r[2]) for r in rows)["ddpm_cifar10"]
    print(f"ddpm_cifar10 (cross-attention transformers): {ddpm:,} = {ddpm / 1e6:.2f}M, "
          f"{100 * (ddpm / DDPM_CIFAR10 - 1):+.1f}% vs DDPM's 35.7M (limit: 5%)")
    self_cfg = unet_preset(
        "ddpm_cifar10", attention_type="self", num_heads=1, head_dim=None, context_dim=None
    )
    n_self = count_params(abstract_params(self_cfg))
    print(f"ddpm_cifar10 with DDPM's single-head self-attention blocks instead: {n_self:,} "
          f"(DDPM: 35.7M; 35,746,307 in reimplementations)")
    sd = dict((r[0], r[2]) for r in rows)["sd"]
    print(f"sd: {sd:,} (Stable Diffusion v1 U-Net: {SD_V1:,})")

    print()
    print(f"{'DiT preset':14s} {'as configured':>14s} {'class-cond.':>14s}  {'paper':>6s}")
    paper = {"S/2": "33M", "B/2": "130M", "L/2": "458M", "XL/2": "675M"}
    for name in DIT_PRESETS:
        cfg = dit_preset(name)
        n = count_params(dit_params(cfg))
        cc = count_params(dit_params(dit_preset(name, context_dim=None, num_classes=1001, learn_sigma=True),
                                     labels=True))
        print(f"{name:14s} {n:14,d} {cc:14,d}  {paper.get(name, ''):>6s}")


def dit_params(cfg, labels=False, image_size=32):
    x = jnp.zeros((1, image_size, image_size, cfg.in_channels))
    text = None if cfg.context_dim is None else jnp.zeros((1, 1, cfg.context_dim))
    kw = {"labels": jnp.zeros((1,), jnp.int32)} if labels else {}
    return jax.eval_shape(lambda k: DiT(cfg).init(k, x, jnp.zeros((1,)), text, **kw), jax.random.key(0))


if __name__ == "__main__":
    main()
