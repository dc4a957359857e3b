"""A text-conditioned Diffusion Transformer (DiT) denoiser in Flax linen.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") with the cross-attention to text of
PixArt-α (Chen et al. 2023, "PixArt-α: Fast Training of Diffusion Transformer for Photorealistic
Text-to-Image Synthesis")::

    x_t ─ patchify (p × p patches → Dense) + 2-D sin-cos positions ─► [DiTBlock] × depth ─►
        adaLN final layer ─ Dense (zero-init) ─ unpatchify ─► prediction (B, H, W, C_out)

    c = MLP(timestep_embedding(t)) [+ Dense(pooled text)] [+ Embed(label)]          (B, D)
    DiTBlock (adaLN-Zero: the six modulations are a zero-initialised Dense of SiLU(c)):
        x = x + α₁ ⊙ SelfAttn(LN(x) ⊙ (1 + γ₁) + β₁)
        x = x + CrossAttn(LN'(x), text states, text mask)        (PixArt-α; output projection zero-init)
        x = x + α₂ ⊙ MLP(LN(x) ⊙ (1 + γ₂) + β₂)

At initialisation every block is the identity and the output is exactly zero. The call signature is the
U-Net's (``diffjax.models.unet.UNet``), so every loss, sampler, trainer, pipeline and export works with either::

    model = DiT(dit_preset("tiny"))
    params = model.init(key, x_t, t, text_states, text_mask)["params"]
    out = model.apply({"params": params}, x_t, t, text_states, text_mask)   # (B, H, W, C_out) float32

Position embeddings are MAE's fixed 2-D sin-cos embeddings (He et al. 2022, as DiT uses them), evaluated at
positions ``i · base_grid_size / grid_size`` (PixArt-α's ``base_size``): a model trained on a
``base_grid_size``² token grid sees the same span of positions, interpolated, at any other resolution.

Numerics are the U-Net's: float32 parameters, projections and attention products in ``cfg.dtype``, LayerNorm
statistics, attention logits and softmax in float32, float32 output. Attention goes through
``diffjax.models.layers.Attention`` (``jax.nn.dot_product_attention``, or its einsum form on the CPU where that
is faster; see ``attention_impl``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.layers import (ATTENTION_IMPLS, REMAT_POLICIES, Attention, PresetConfig, canonical_dtype,
                                   check_denoiser_inputs, timestep_embedding)

__all__ = ["DiTConfig", "DiT", "dit_preset", "DIT_PRESETS", "sincos_pos_embed_2d"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DiTConfig(PresetConfig):
    """Architecture of :class:`DiT`. All fields are plain Python values (hashable, serialisable).

    Attributes:
      in_channels: channels of x_t (1 for Fashion-MNIST, 3 for RGB, 4 for SD latents).
      out_channels: channels of the prediction; ``None`` means ``in_channels``.
      patch_size: p; images are cut into p × p patches (H and W must be multiples of p), one token each.
      hidden_size: D, the token width.
      depth: number of DiT blocks.
      num_heads: attention heads (D must be a multiple).
      mlp_ratio: the MLP's hidden width is ``mlp_ratio * D``.
      context_dim: width of the text states (cross-attention); ``None`` builds none (an unconditional or
        pooled/label-conditioned DiT, as the original class-conditional one).
      pooled_dim: width of an optional pooled text embedding added to the conditioning vector c.
      num_classes: number of class labels for an optional label embedding added to c.
      learn_sigma: the output has ``2 * out_channels`` channels: the prediction, then the interpolation v of
        the log-variance between β_t and β̃_t (Nichol & Dhariwal 2021), trained with ``losses.vlb_term``.
      base_grid_size: the token grid side at which positions are integers; other grids are interpolated to
        the same span. ``None``: the grid of the input itself (DiT's fixed embeddings).
      freq_dim: width of the sinusoidal timestep features fed to the timestep MLP.
      norm_eps: LayerNorm epsilon.
      dtype: computation dtype (``"float32"`` or ``"bfloat16"``); parameters are ``param_dtype``.
      remat: wrap each block in ``nn.remat`` (gradient checkpointing per block); on XLA:CPU see
        ``UNetConfig.remat``.
      remat_policy: optional name of a ``jax.checkpoint_policies`` policy used with ``remat``.
      attention_impl: as ``UNetConfig.attention_impl`` (``None``: einsum on the CPU, ``jax.nn.dot_product_
        attention``'s choice elsewhere).
    """

    in_channels: int = 4
    out_channels: Optional[int] = None
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    context_dim: Optional[int] = 768
    pooled_dim: Optional[int] = None
    num_classes: Optional[int] = None
    learn_sigma: bool = False
    base_grid_size: Optional[int] = None
    freq_dim: int = 256
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: Optional[str] = None
    attention_impl: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "param_dtype"))
        self._validate()

    def _validate(self):
        def fail(msg):
            raise ValueError(f"DiTConfig: {msg}")

        for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads", "freq_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.out_channels is not None and self.out_channels < 1:
            fail(f"out_channels must be positive or None, got {self.out_channels}")
        if self.hidden_size % self.num_heads:
            fail(f"num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.hidden_size % 4:
            fail(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos position embeddings)")
        if self.freq_dim % 2:
            fail(f"freq_dim must be even, got {self.freq_dim}")
        if not self.mlp_ratio > 0:
            fail(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("context_dim", "pooled_dim", "num_classes", "base_grid_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                fail(f"{name} must be positive or None, got {value}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            fail(f"remat_policy {self.remat_policy!r} not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail(f"attention_impl {self.attention_impl!r} not one of {ATTENTION_IMPLS}")

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this: the patch size."""
        return self.patch_size

    @property
    def prediction_channels(self) -> int:
        """Channels of the prediction (without the learned-variance channels)."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def output_channels(self) -> int:
        """Channels the network outputs: the prediction's, twice with ``learn_sigma``."""
        return self.prediction_channels * (2 if self.learn_sigma else 1)

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.hidden_size * self.mlp_ratio))

    _KIND = "DiT"

    @classmethod
    def _presets(cls) -> dict:
        return DIT_PRESETS


# Named presets: field overrides of DiTConfig. S/2, B/2, L/2 and XL/2 are the sizes of Peebles & Xie 2023
# (Table 1) with patch 2, on SD latents (4 channels) and CLIP ViT-L/14 text states (768).
DIT_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: 2 blocks of width 32.
    "tiny": dict(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0, context_dim=32,
                 freq_dim=32),
    # Fashion-MNIST (28x28x1, 196 tokens of 2x2 patches) on the CPU: the train step of
    # experiments/configs/fashion_mnist_dit.py costs what the U-Net's of fashion_mnist.py does (40 vs 42 GFLOP
    # per step of batch 64 in XLA's cost analysis, text encoder included).
    "fashion_mnist": dict(in_channels=1, patch_size=2, hidden_size=64, depth=6, num_heads=4, mlp_ratio=4.0,
                          context_dim=256, freq_dim=128),
    "S/2": dict(hidden_size=384, depth=12, num_heads=6),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16),
}


def dit_preset(name: str, **overrides) -> DiTConfig:
    """``DiTConfig.preset(name, **overrides)``; an unknown name raises ValueError listing the valid ones."""
    return DiTConfig.preset(name, **overrides)


# --------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos ω), cos(pos ω)] with ω_i = 10000^(-i / (dim/2)), i < dim/2 (Vaswani et al. 2017)."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_grid_size: Optional[int] = None) -> np.ndarray:
    r"""Fixed 2-D sin-cos position embeddings, (grid_h · grid_w, dim) in row-major token order.

    The first half of the channels encodes the column (x) coordinate, the second half the row (y) coordinate,
    each as :func:`_sincos_1d` (MAE's ``get_2d_sincos_pos_embed``, used by DiT). With ``base_grid_size`` the
    coordinates are ``i · base_grid_size / grid`` along each axis (PixArt-α), so every grid spans the positions
    of the base grid: a model trained at one resolution is evaluated at another on interpolated positions.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    ys = np.arange(grid_h, dtype=np.float64)
    xs = np.arange(grid_w, dtype=np.float64)
    if base_grid_size is not None:
        ys = ys * (base_grid_size / grid_h)
        xs = xs * (base_grid_size / grid_w)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.concatenate([_sincos_1d(dim // 2, xx), _sincos_1d(dim // 2, yy)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """``x ⊙ (1 + scale) + shift`` with (B, D) modulations broadcast over the tokens."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(eps: float, affine: bool, name: str, dtype, param_dtype=jnp.float32) -> nn.LayerNorm:
    """LayerNorm with float32 statistics (Flax computes them in float32 for low-precision inputs)."""
    return nn.LayerNorm(eps, use_bias=affine, use_scale=affine, dtype=dtype, param_dtype=param_dtype, name=name)


class DiTBlock(nn.Module):
    r"""One DiT block with adaLN-Zero (Peebles & Xie 2023, Fig. 3) and PixArt-α's cross-attention.

    .. math::
        (\beta_1, \gamma_1, \alpha_1, \beta_2, \gamma_2, \alpha_2) &= W\,\mathrm{SiLU}(c) + b
            \quad (W, b \text{ zero-initialised}) \\
        x &\leftarrow x + \alpha_1 \odot \mathrm{SelfAttn}(\mathrm{LN}(x) \odot (1 + \gamma_1) + \beta_1) \\
        x &\leftarrow x + \mathrm{CrossAttn}(\mathrm{LN}'(x), \text{text}) \\
        x &\leftarrow x + \alpha_2 \odot \mathrm{MLP}(\mathrm{LN}(x) \odot (1 + \gamma_2) + \beta_2)

    LN has no affine parameters (the modulation replaces them); LN' before the cross-attention has them. The
    cross-attention's output projection is zero-initialised (as PixArt-α), so the block starts as the identity.
    A sample whose text mask has no real token gets no cross-attention contribution at all.
    """

    hidden_size: int
    num_heads: int
    mlp_hidden: int
    context_dim: Optional[int]  # None: no cross-attention
    norm_eps: float = 1e-6
    impl: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c, context=None, mask=None, any_real=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, n = self.hidden_size, self.num_heads
        mod = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, name="adaLN_modulation", **kw)(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        attn = dict(num_heads=n, head_dim=d // n, out_features=d, impl=self.impl, **kw)
        h = _modulate(_layer_norm(self.norm_eps, False, "norm1", self.dtype)(x), shift1, scale1)
        x = x + gate1[:, None, :] * Attention(qkv_bias=True, name="self_attn", **attn)(h)
        if self.context_dim is not None and (context is not None or self.is_initializing()):
            h = _layer_norm(self.norm_eps, True, "norm_cross", self.dtype, self.param_dtype)(x)
            if context is None:  # initialising without text: create the parameters, add nothing
                Attention(qkv_bias=True, zero_out=True, name="cross_attn", **attn)(
                    h, jnp.zeros((x.shape[0], 1, self.context_dim), self.dtype))
            else:
                x = x + Attention(qkv_bias=True, zero_out=True, name="cross_attn", **attn)(h, context, mask, any_real)
        h = _modulate(_layer_norm(self.norm_eps, False, "norm2", self.dtype)(x), shift2, scale2)
        h = nn.Dense(self.mlp_hidden, name="mlp_in", **kw)(h)
        h = nn.Dense(d, name="mlp_out", **kw)(nn.gelu(h, approximate=True))
        return x + gate2[:, None, :] * h


class FinalLayer(nn.Module):
    """adaLN final layer: ``Dense(LN(x) ⊙ (1 + γ) + β)`` to p·p·C_out per token, modulation and Dense
    zero-initialised (the output is exactly zero at initialisation)."""

    hidden_size: int
    out_features: int
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = nn.Dense(2 * self.hidden_size, kernel_init=nn.initializers.zeros, name="adaLN_modulation",
                       **kw)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = _modulate(_layer_norm(self.norm_eps, False, "norm", self.dtype)(x), shift, scale)
        return nn.Dense(self.out_features, kernel_init=nn.initializers.zeros, name="linear", **kw)(h)


def patchify(x: Array, p: int) -> Array:
    """(B, H, W, C) → (B, (H/p)·(W/p), p·p·C): row-major patches, each flattened (row, column, channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Array, grid_h: int, grid_w: int, p: int) -> Array:
    """The inverse of :func:`patchify`: (B, grid_h·grid_w, p·p·C) → (B, grid_h·p, grid_w·p, C)."""
    b, _, f = tokens.shape
    c = f // (p * p)
    x = tokens.reshape(b, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * p, grid_w * p, c)


# --------------------------------------------------------------------------------------------------
# The DiT
# --------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    r"""Text-conditioned Diffusion Transformer ``ε_θ(x_t, t, c)`` (Peebles & Xie 2023; Chen et al. 2023).

    ``__call__(x_t, t, text_states=None, text_mask=None, pooled=None, labels=None, train=False)`` returns an
    array shaped like ``x_t`` with ``config.output_channels`` channels, in float32 (``train`` is accepted for
    the U-Net's signature; the DiT has no dropout).
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x: Array, t: Array, text_states: Optional[Array] = None, text_mask: Optional[Array] = None,
                 pooled: Optional[Array] = None, labels: Optional[Array] = None, train: bool = False) -> Array:
        cfg = self.config
        check_denoiser_inputs(cfg, x, t, text_states, text_mask, pooled, labels, f"the DiT's patch size {cfg.patch_size}")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        b, hh, ww, _ = x.shape
        p, d = cfg.patch_size, cfg.hidden_size
        gh, gw = hh // p, ww // p

        # ---- conditioning vector c ----------------------------------------------------------------------
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        c = timestep_embedding(t, cfg.freq_dim, flip_sin_to_cos=True)
        c = nn.Dense(d, name="t_embedder_0", **kw)(c)
        c = nn.Dense(d, name="t_embedder_1", **kw)(nn.silu(c))
        if cfg.pooled_dim is not None and (pooled is not None or self.is_initializing()):
            if pooled is None:
                pooled = jnp.zeros((b, cfg.pooled_dim), dtype)
            c = c + nn.Dense(d, name="pooled_proj", **kw)(pooled.astype(dtype))
        if cfg.num_classes is not None and (labels is not None or self.is_initializing()):
            if labels is None:
                labels = jnp.zeros((b,), jnp.int32)
            c = c + nn.Embed(cfg.num_classes, d, name="label_emb", **kw)(labels)

        context = mask = any_real = None
        if text_states is not None:  # the cross-attention's key/value projections take the text width as is
            context = text_states.astype(dtype)
            if text_mask is not None:
                mask = jnp.asarray(text_mask).astype(bool)
                any_real = jnp.any(mask, axis=-1)

        # ---- tokens -----------------------------------------------------------------------------------
        h = nn.Dense(d, kernel_init=nn.initializers.xavier_uniform(), name="patch_embed", **kw)(
            patchify(x.astype(dtype), p))
        pos = sincos_pos_embed_2d(d, gh, gw, cfg.base_grid_size)
        h = h + jnp.asarray(pos, dtype)[None]

        block_cls = DiTBlock
        if cfg.remat:
            policy = getattr(jax.checkpoint_policies, cfg.remat_policy) if cfg.remat_policy else None
            block_cls = nn.remat(DiTBlock, prevent_cse=True, policy=policy)
        for i in range(cfg.depth):
            h = block_cls(d, cfg.num_heads, cfg.mlp_hidden, cfg.context_dim, cfg.norm_eps,
                          cfg.attention_impl, name=f"block_{i}", **kw)(h, c, context, mask, any_real)

        h = FinalLayer(d, p * p * cfg.output_channels, cfg.norm_eps, name="final_layer", **kw)(h, c)
        return unpatchify(h, gh, gw, p).astype(jnp.float32)
