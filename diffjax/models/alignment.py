"""The image–text alignment heads: the second way the seed's system conditions the denoiser.

Beside cross-attention (the text states enter the network), the training objective carries a term that measures
the discrepancy between the generated image and the text (``config.alignment``)::

    L = L_denoise + λ · mean_i w(t_i) ℓ_align(u_i, v_i),   u_i = g_img(x̂0(x_t, t, c_i)),   v_i = g_txt(pooled(c_i)),

where x̂0 is the denoiser's prediction of the clean image at the sampled t (``losses.diffusion_loss``), g_img a
light image head (a few strided 3×3 convolutions with SiLU, global average pooling, a linear projection), g_txt a
linear projection of the pooled text embedding, and ℓ_align the symmetric InfoNCE of CLIP (Radford et al. 2021)
with a learned temperature, or 1 - cos (``losses.contrastive_alignment_loss`` / ``cosine_alignment_loss``).
The heads are trained jointly with the denoiser (``params["alignment"]``: sharded, EMA'd, checkpointed and
exported like the rest). Because they see x̂0 from noisy inputs they are noise-aware, which is what alignment
guidance at sampling needs (``guidance.alignment_guidance``, after GLIDE's CLIP guidance, Nichol et al. 2022).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import losses
from diffjax.losses import l2_normalize

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """The heads' architecture: ``alignment/config.json`` of a model folder."""

    in_channels: int = 1  # channels of x̂0 (the image's, or the latent's for a latent model)
    text_dim: int = 32  # width of the pooled text embedding
    channels: Sequence[int] = (32, 64, 64)  # one stride-2 3×3 convolution per entry
    embed_dim: int = 64  # the joint embedding's width
    init_temperature: float = 0.07  # τ₀ of the logits e^τ cos = cos / temperature (CLIP's initial value)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or min(self.channels) < 1 or self.embed_dim < 1:
            raise ValueError(f"alignment heads need positive channels and embed_dim, got channels={self.channels}, "
                             f"embed_dim={self.embed_dim}")
        if not self.init_temperature > 0:
            raise ValueError(f"alignment init_temperature must be > 0, got {self.init_temperature}")


# CLIP clips its learned logit scale at 100 (log 100 = 4.6052) so that training stays stable.
MAX_LOGIT_SCALE = float(np.log(100.0))


class AlignmentHeads(nn.Module):
    """``embed_image(x0) -> (B, embed_dim)``, ``embed_text(pooled) -> (B, embed_dim)``, ``logit_scale() -> τ``
    (use ``apply(..., method=...)``; ``__call__`` runs all three, for ``init``)."""

    config: AlignmentConfig

    def setup(self):
        c = self.config
        self.convs = [nn.Conv(ch, (3, 3), strides=(2, 2), padding=1, name=f"conv_{i}")
                      for i, ch in enumerate(c.channels)]
        self.image_proj = nn.Dense(c.embed_dim, name="image_proj")
        self.text_proj = nn.Dense(c.embed_dim, name="text_proj")
        self.log_inv_temperature = self.param("logit_scale", lambda _: jnp.asarray(np.log(1.0 / c.init_temperature),
                                                                                  jnp.float32))

    def embed_image(self, x0: Array) -> Array:
        h = x0.astype(jnp.float32)
        for conv in self.convs:
            h = nn.silu(conv(h))
        return self.image_proj(jnp.mean(h, axis=(1, 2)))

    def embed_text(self, pooled: Array) -> Array:
        return self.text_proj(pooled.astype(jnp.float32))

    def logit_scale(self) -> Array:
        return jnp.minimum(self.log_inv_temperature, MAX_LOGIT_SCALE)

    def __call__(self, x0: Array, pooled: Array):
        return self.embed_image(x0), self.embed_text(pooled), self.logit_scale()

    def init_params(self, rng: Array, image_shape) -> dict:
        """Parameters for x̂0 of shape ``image_shape`` (h, w, c) (the heads do not depend on h and w)."""
        h, w, c = image_shape
        return self.init(rng, jnp.zeros((1, h, w, c)), jnp.zeros((1, self.config.text_dim)))["params"]

    def similarity(self, params: dict, x0: Array, pooled: Array) -> Array:
        """e^τ cos(g_img(x0_i), g_txt(pooled_i)) per example (B,): the logit of the matching pair, which
        alignment guidance ascends."""
        u, v, tau = self.apply({"params": params}, x0, pooled)
        return jnp.exp(tau) * jnp.sum(l2_normalize(u) * l2_normalize(v), axis=-1)


def heads_from_config(alignment_config, in_channels: int, text_dim: int):
    """The :class:`AlignmentHeads` of ``config.alignment`` (None when its ``weight`` λ is 0: no term, no heads,
    the train step as without it); a one-line ValueError naming a bad key."""
    ac = alignment_config
    if ac is None:
        return None
    try:
        weight = float(ac.weight)
    except (TypeError, ValueError):
        weight = float("nan")
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"config.alignment.weight must be a finite number >= 0 (0: off), got {ac.weight!r}")
    if ac.loss not in losses.ALIGNMENT_LOSSES:
        raise ValueError(f"config.alignment.loss={ac.loss!r}: expected one of {', '.join(losses.ALIGNMENT_LOSSES)}")
    if ac.weighting not in losses.ALIGNMENT_WEIGHTINGS:
        raise ValueError(f"config.alignment.weighting={ac.weighting!r}: expected one of "
                         f"{', '.join(losses.ALIGNMENT_WEIGHTINGS)}")
    positives = ac.get("positives", "prompt")
    if positives not in losses.ALIGNMENT_POSITIVES:
        raise ValueError(f"config.alignment.positives={positives!r}: expected one of "
                         f"{', '.join(losses.ALIGNMENT_POSITIVES)}")
    try:
        scale = float(ac.get("guidance_scale", 0.0))
    except (TypeError, ValueError):
        scale = float("nan")
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"config.alignment.guidance_scale must be a finite number >= 0, got {ac.guidance_scale!r}")
    if scale > 0 and weight == 0 and not ac.get("clip_model"):
        raise ValueError("config.alignment.guidance_scale > 0 needs alignment heads (config.alignment.weight > 0) or "
                         "a CLIP to follow (config.alignment.clip_model)")
    if weight == 0:
        return None
    try:
        cfg = AlignmentConfig(in_channels=int(in_channels), text_dim=int(text_dim), channels=tuple(ac.channels),
                              embed_dim=int(ac.embed_dim), init_temperature=float(ac.init_temperature))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.alignment: {e}") from None
    return AlignmentHeads(cfg)


def alignment_loss(heads: AlignmentHeads, params: dict, schedule, x0_pred: Array, pooled: Array, t: Array,
                   valid: Array, loss: str = "contrastive", weighting: str = "alpha_cumprod",
                   positives: Array | None = None) -> Array:
    """The alignment term, mean_i w(t_i) ℓ_i over the ``valid`` examples (the others, whose prompts were dropped
    for classifier-free guidance, contribute nothing and are no negatives): ℓ the contrastive or cosine loss of
    g_img(x̂0) against g_txt(pooled) (``losses``), w(t) ``losses.alignment_weight``. Under a sharded ``jit`` the
    contrastive negatives are the whole global batch; under ``pmap``, each device's."""
    u, v, tau = heads.apply({"params": params}, x0_pred, pooled)
    if loss == "contrastive":
        per = losses.contrastive_alignment_loss(u, v, tau, valid, positives)
    elif loss == "cosine":
        per = losses.cosine_alignment_loss(u, v, valid)
    else:
        raise ValueError(f"config.alignment.loss={loss!r}: expected one of {', '.join(losses.ALIGNMENT_LOSSES)}")
    w = losses.alignment_weight(schedule, t, weighting)
    return jnp.sum(w * per) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
