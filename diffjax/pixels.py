"""The one conversion between stored pixels and the model's space: uint8 [0, 255] ↔ float32 [-1, 1].

    x = u / 127.5 - 1              (0 → -1, 255 → 1; DDPM's scaling, Ho et al. 2020, §3.3)
    u = clip(round((x + 1) · 127.5), 0, 255)

The input pipeline, the sampling pipeline and the metrics all call these two functions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def from_uint8(images) -> np.ndarray:
    """uint8 images in [0, 255] → float32 in [-1, 1] (the inverse of :func:`to_uint8` on the uint8 grid)."""
    return np.asarray(images).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x) -> np.ndarray:
    """Images in [-1, 1] (numpy or jax) → uint8 in [0, 255]: round((x + 1) · 127.5), clipped."""
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8))
