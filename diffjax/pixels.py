"""The one conversion between stored pixels and the model's space: uint8 [0, 255] ↔ float32 [-1, 1].

    x = u / 127.5 - 1              (0 → -1, 255 → 1; DDPM's scaling, Ho et al. 2020, §3.3)
    u = clip(round((x + 1) · 127.5), 0, 255)

The input pipeline, the sampling pipeline and the metrics all call these two functions. Image grids and PNG files
of uint8 images are written here too.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image


def from_uint8(images) -> np.ndarray:
    """uint8 images in [0, 255] → float32 in [-1, 1] (the inverse of :func:`to_uint8` on the uint8 grid)."""
    return np.asarray(images).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x) -> np.ndarray:
    """Images in [-1, 1] (numpy or jax) → uint8 in [0, 255]: round((x + 1) · 127.5), clipped."""
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


def image_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (rows·(H+pad)+pad, cols·(W+pad)+pad, C) image, white margins."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_image(image: np.ndarray, path: str, scale: int = 1) -> None:
    """Write a uint8 (H, W, C) image as PNG, optionally enlarged ``scale``× (nearest neighbour)."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_images(images: np.ndarray, directory: str, prompts: Sequence[str], prefix: str = "") -> list[str]:
    """One PNG per image (``{prefix}{i:04d}.png``) and ``prompts.json`` mapping file → prompt."""
    os.makedirs(directory, exist_ok=True)
    paths, index = [], {}
    for i, (img, p) in enumerate(zip(images, prompts)):
        name = f"{prefix}{i:04d}.png"
        save_image(img, os.path.join(directory, name))
        paths.append(os.path.join(directory, name))
        index[name] = p
    with open(os.path.join(directory, f"{prefix}prompts.json"), "w") as f:
        json.dump(index, f, indent=1)
    return paths


def write_samples(images: np.ndarray, directory: str, prompts: Sequence[str], rows: int) -> list[str]:
    """:func:`save_images` (one PNG per image and ``prompts.json``) and ``grid.png``, their grid in ``rows`` rows
    enlarged 2×; returns the images' paths."""
    paths = save_images(images, directory, prompts)
    save_image(image_grid(images, rows=rows), os.path.join(directory, "grid.png"), scale=2)
    return paths
