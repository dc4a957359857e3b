"""Text-to-image generation from trained parameters: prompts → text states → guided sampling → uint8 images.

``make_generate_fn`` returns one jitted function per (sampler, number of steps, image shape); the prompts'
token ids, the seed and the guidance scale are arguments, so new prompts, seeds or scales reuse the
compiled program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import guidance, samplers


def to_uint8(x: jax.Array) -> np.ndarray:
    """Images in [-1, 1] → uint8 in [0, 255]: round((x + 1) · 127.5), clipped."""
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


def make_generate_fn(models: Any, image_shape: tuple[int, int, int], *, sampler: str = "dpmpp_2m",
                     num_steps: int = 25, prediction_type: str = "eps", **sampler_options) -> Callable:
    """``generate(unet_params, text_params, token_ids, mask, uncond_ids, uncond_mask, rng, guidance_scale)``
    → float32 images (B, H, W, C) in [-1, 1]: classifier-free guidance (one batched network call per step)
    with predicted x0 clipped to [-1, 1] at every step."""
    samplers.get_sampler(sampler)

    @jax.jit
    def generate(unet_params, text_params, token_ids, mask, uncond_ids, uncond_mask, rng, guidance_scale):
        encoder = models.text_encoder
        cond = encoder.encode(text_params, token_ids, mask, trainable=False)
        b = token_ids.shape[0]
        uncond_ids = jnp.broadcast_to(uncond_ids, (b,) + uncond_ids.shape[1:])
        uncond_mask = jnp.broadcast_to(uncond_mask, (b,) + uncond_mask.shape[1:])
        uncond = encoder.encode(text_params, uncond_ids, uncond_mask, trainable=False)
        model = guidance.classifier_free_guidance(models.denoiser(unet_params), cond, uncond, guidance_scale)
        noise_rng, sample_rng = jax.random.split(rng)
        x_T = jax.random.normal(noise_rng, (b,) + tuple(image_shape), jnp.float32)
        return samplers.sample(model, x_T, models.schedule, sampler, num_steps, rng=sample_rng,
                               prediction_type=prediction_type, denoised_fn=guidance.clip_x0, **sampler_options)

    return generate


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
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
