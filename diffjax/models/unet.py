"""A text-conditioned U-Net denoiser in Flax linen.

The network follows the DDPM / ADM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models";
Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis") with the self-attention blocks
replaced by the spatial transformers of latent diffusion / Stable Diffusion (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models"), which add cross-attention to the per-token
text states of a text encoder.

    x_t ─ conv_in ─► [ResBlock (+ SpatialTransformer)] × n ─ down ─► … ─► mid ─► … ─ up ─►
        [concat skip, ResBlock (+ SpatialTransformer)] × (n + 1) ─► GroupNorm ─ SiLU ─ conv_out (zero-init)

Calling convention (NHWC images)::

    cfg = unet_preset("tiny")
    model = UNet(cfg)
    params = model.init(key, x_t, t, text_states, text_mask)
    out = model.apply(params, x_t, t, text_states, text_mask, train=False)  # (B, H, W, C_out) float32
    out = model.apply(params, x_t, t, ..., train=True, rngs={"dropout": key})  # dropout active

``t`` is a float or integer array of shape ``(B,)`` (a scalar is broadcast), ``text_states`` ``(B, L, D)``
with ``D == cfg.context_dim`` and ``text_mask`` ``(B, L)`` (bool or int, 1 = real token). With
``text_states=None`` the cross-attention layers contribute nothing (unconditional model); a row of
``text_mask`` without any real token behaves the same way for that sample. Optional ``pooled`` (B, P) text
embeddings (``cfg.pooled_dim``) and integer class ``labels`` (B,) (``cfg.num_classes``) are projected and
added to the timestep embedding.

Numerics: parameters are ``cfg.param_dtype`` (float32); convolutions, projections and attention products
run in ``cfg.dtype`` (float32 or bfloat16); the timestep embedding, GroupNorm/LayerNorm statistics, the
attention logits and softmax are float32; the output is float32.

The architecture hyper-parameters live in the frozen dataclass :class:`UNetConfig`; named presets come from
:func:`unet_preset` / :meth:`UNetConfig.preset`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from diffjax.models.layers import (ATTENTION_IMPLS, CONV_IMPLS, REMAT_POLICIES, GEGLU, Attention, GroupNorm,
                                    PresetConfig, canonical_dtype, check_denoiser_inputs, conv_layer,
                                    timestep_embedding, upsample_nearest)

__all__ = [
    "UNetConfig",
    "UNet",
    "unet_preset",
    "PRESETS",
    "dummy_inputs",
]

Array = jax.Array

_ATTENTION_TYPES = ("transformer", "self")


# --------------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig(PresetConfig):
    """Architecture of :class:`UNet`. All fields are plain Python values (hashable, serialisable).

    Attributes:
      in_channels: channels of the input image x_t (3 for RGB, 4 for SD latents).
      out_channels: channels of the prediction; ``None`` means ``in_channels``.
      channels: base width; level ``i`` has ``channels * channel_mult[i]`` channels.
      channel_mult: one multiplier per resolution level. There are ``len(channel_mult)`` levels and
        ``len(channel_mult) - 1`` down-samplings, so H and W must be divisible by ``2**(levels - 1)``.
      num_res_blocks: residual blocks per level on the way down (``num_res_blocks + 1`` on the way up).
      attention_levels: indices of the levels (0 = full resolution) whose res blocks are followed by an
        attention block. E.g. DDPM CIFAR-10's "attention at 16x16" on 32x32 inputs is level 1.
      mid_attention: whether the middle block is ResBlock-attention-ResBlock (True) or two ResBlocks.
      attention_type: ``"transformer"`` (LDM SpatialTransformer: self-attn, cross-attn to the text, GEGLU)
        or ``"self"`` (the single-layer self-attention block of DDPM/ADM; ignores the text).
      num_heads, head_dim: attention heads and their width. Give one of them and the other follows from
        the block's channels (inner width = channels); give both to use an inner width
        ``num_heads * head_dim`` that differs from the channels (LDM's ``n_heads * d_head``).
      transformer_depth: transformer layers per SpatialTransformer.
      context_dim: width D of the text states; ``None`` builds no cross-attention at all.
      ff_mult: the GEGLU feed-forward's hidden width is ``ff_mult * inner width``.
      dropout: dropout rate inside the residual blocks (active with ``train=True``).
      norm_groups, norm_eps: GroupNorm groups and epsilon (LayerNorm uses the same epsilon).
      use_scale_shift_norm: FiLM conditioning ``GN(h) * (1 + s) + b`` instead of adding the embedding.
      resblock_updown: down/up-sample with residual blocks (ADM) instead of strided conv / nearest + conv.
      time_embed_dim: width of the timestep embedding MLP; ``None`` means ``4 * channels``.
      flip_sin_to_cos, freq_shift, max_period: the sinusoidal embedding, see :func:`timestep_embedding`.
      pooled_dim: width of an optional pooled text embedding added to the time embedding.
      num_classes: number of class labels for an optional label embedding added to the time embedding.
      dtype: computation dtype (``"float32"`` or ``"bfloat16"``); parameters are ``param_dtype``.
      remat: wrap each residual block and each spatial transformer in ``nn.remat`` (gradient checkpointing). On
        XLA:CPU jit the gradient with ``compiler_options=xla_cpu.compiler_options("cpu")`` (``Trainer`` does), or
        XLA merges the recomputation back and saves nothing.
      remat_policy: optional name of a ``jax.checkpoint_policies`` policy used with ``remat``.
      attention_impl: how the attention product is computed. ``"dpa"``: ``jax.nn.dot_product_attention``
        with JAX's choice of implementation; ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention``
        with that ``implementation=`` (cuDNN needs bfloat16/float16 compute and gets the text mask as key
        lengths, so padding must come after the real tokens, as CLIP tokenizers produce it);
        ``"einsum"``: the same math as two einsums (faster on CPU, see ``diffjax.models.layers.Attention``);
        ``None`` (auto): ``"einsum"`` on the CPU backend, ``"dpa"`` elsewhere.
      conv_impl: how the weight gradients of the stride-1 convolutions are computed (the forward pass and
        the input gradients are XLA's convolutions either way). ``"xla"``: XLA's own transposed
        convolution; ``"banded"``: the same sum split into bands of ~7 output rows (see
        :func:`diffjax.models.cpu_kernels.banded_conv`), much faster for some shapes with XLA:CPU's default
        (YNNPACK) convolutions (docs/performance.md); ``None`` (auto):
        ``"banded"`` on the CPU backend with YNNPACK's convolutions, ``"xla"`` elsewhere, and on the CPU
        with XLA's own convolution kernels (:mod:`diffjax.xla_cpu`: there XLA's weight gradient is the faster).
      gelu_approximate: the GEGLU feed-forward's GELU in its tanh approximation (True) or exact (False, as
        diffusers' Stable Diffusion U-Net; weights converted from there set it).
      transformer_norm_eps: epsilon of the spatial transformers' GroupNorm (None: ``norm_eps``; 1e-6 in diffusers'
        Stable Diffusion U-Net).
      use_text_mask: cross-attention attends to the real text tokens only (True), or to every token of the
        padded prompt (False: Stable Diffusion was trained attending to CLIP's padding states too).
    """

    in_channels: int = 3
    out_channels: Optional[int] = None
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)
    mid_attention: bool = True
    attention_type: str = "transformer"
    num_heads: Optional[int] = 8
    head_dim: Optional[int] = None
    transformer_depth: int = 1
    context_dim: Optional[int] = 768
    ff_mult: int = 4
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-5
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    time_embed_dim: Optional[int] = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    max_period: float = 10000.0
    pooled_dim: Optional[int] = None
    num_classes: Optional[int] = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: Optional[str] = None
    attention_impl: Optional[str] = None
    conv_impl: Optional[str] = None
    gelu_approximate: bool = True
    transformer_norm_eps: Optional[float] = None
    use_text_mask: bool = True

    def __post_init__(self):
        # Normalise sequences to tuples and dtypes to names so that the config stays hashable.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(sorted({int(a) for a in self.attention_levels})))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "param_dtype"))
        self._validate()

    # -- derived sizes ------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """H and W must be divisible by this: ``2 ** (num_levels - 1)``."""
        return 2 ** (self.num_levels - 1)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (the name every denoiser config shares): the downsampling."""
        return self.downsample_factor

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def temb_dim(self) -> int:
        return 4 * self.channels if self.time_embed_dim is None else self.time_embed_dim

    def level_channels(self, level: int) -> int:
        return self.channels * self.channel_mult[level]

    def heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of an attention block on ``channels`` channels."""
        if self.num_heads is not None and self.head_dim is not None:
            return self.num_heads, self.head_dim
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

    def _attention_channels(self) -> list[int]:
        chans = [self.level_channels(level) for level in self.attention_levels]
        if self.mid_attention:
            chans.append(self.level_channels(self.num_levels - 1))
        return chans

    def _validate(self):
        def fail(msg):
            raise ValueError(f"UNetConfig: {msg}")

        if not self.channel_mult:
            fail("channel_mult must name at least one level")
        if self.channels <= 0 or any(m <= 0 for m in self.channel_mult):
            fail(f"channels ({self.channels}) and channel_mult {self.channel_mult} must be positive")
        if self.num_res_blocks < 1:
            fail(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        bad = [a for a in self.attention_levels if not 0 <= a < self.num_levels]
        if bad:
            fail(f"attention_levels {bad} outside the {self.num_levels} levels 0..{self.num_levels - 1}")
        if self.attention_type not in _ATTENTION_TYPES:
            fail(f"attention_type {self.attention_type!r} not one of {_ATTENTION_TYPES}")
        if self.num_heads is None and self.head_dim is None:
            fail("give num_heads or head_dim (or both)")
        if (self.num_heads is not None and self.num_heads <= 0) or (
            self.head_dim is not None and self.head_dim <= 0
        ):
            fail(f"num_heads ({self.num_heads}) and head_dim ({self.head_dim}) must be positive")
        for c in self._attention_channels():
            if self.num_heads is None and c % self.head_dim:
                fail(f"head_dim {self.head_dim} does not divide the {c} channels of an attention level")
            if self.head_dim is None and c % self.num_heads:
                fail(f"num_heads {self.num_heads} does not divide the {c} channels of an attention level")
        if self.transformer_depth < 1:
            fail(f"transformer_depth must be >= 1, got {self.transformer_depth}")
        if self.context_dim is not None and self.context_dim <= 0:
            fail(f"context_dim must be positive or None, got {self.context_dim}")
        if self.ff_mult < 1:
            fail(f"ff_mult must be >= 1, got {self.ff_mult}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        for level in range(self.num_levels):
            c = self.level_channels(level)
            if c % self.norm_groups:
                fail(f"norm_groups {self.norm_groups} does not divide the {c} channels of level {level}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            fail(f"remat_policy {self.remat_policy!r} not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail(f"attention_impl {self.attention_impl!r} not one of {ATTENTION_IMPLS}")
        if self.conv_impl not in CONV_IMPLS:
            fail(f"conv_impl {self.conv_impl!r} not one of {CONV_IMPLS}")

    # -- presets (PresetConfig.preset) ---------------------------------------------------------------
    _KIND = "U-Net"

    @classmethod
    def _presets(cls) -> dict:
        return PRESETS


# Named presets: field overrides of UNetConfig. Parameter counts: docs/lab_notebook.md.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: two levels, one res block each, ~60k parameters.
    "tiny": dict(
        in_channels=3, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
        num_heads=2, context_dim=32, ff_mult=2, norm_groups=4,
    ),
    # Fashion-MNIST sized (28x28 or 32x32, one channel) for CPU training; ~2.8M parameters.
    "small": dict(
        in_channels=1, channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
        num_heads=4, context_dim=256, norm_groups=16, dropout=0.1,
    ),
    # DDPM CIFAR-10 (Ho et al. 2020, 35.7M parameters): ch=128, ch_mult=(1,2,2,2), 2 res blocks,
    # attention at 16x16 (level 1 of a 32x32 input) and in the middle block, dropout 0.1, DDPM's
    # sin-first embedding with log(10000)/(half-1) frequencies. The self-attention blocks are replaced by
    # cross-attention transformers whose inner width is 128 (2 heads x 64, LDM's n_heads x d_head) so that
    # the total stays within 5% of 35.7M; with ``attention_type="self"`` the count is DDPM's.
    "ddpm_cifar10": dict(
        in_channels=3, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,),
        num_heads=2, head_dim=64, context_dim=512, dropout=0.1, norm_groups=32, norm_eps=1e-6,
        flip_sin_to_cos=False, freq_shift=1.0,
    ),
    # Stable-Diffusion-v1-like (Rombach et al. 2022): 4 latent channels, 320 ch, mult (1,2,4,4),
    # 2 res blocks, transformers at the first three levels and the middle, 8 heads, CLIP-L context 768.
    "sd": dict(
        in_channels=4, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_levels=(0, 1, 2), num_heads=8, context_dim=768, norm_groups=32,
        flip_sin_to_cos=True, freq_shift=0.0,
    ),
}


def unet_preset(name: str, **overrides) -> UNetConfig:
    """``UNetConfig.preset(name, **overrides)``; unknown names raise ValueError listing the valid ones."""
    return UNetConfig.preset(name, **overrides)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _avg_pool2(x: Array) -> Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class Downsample(nn.Module):
    """3x3 convolution with stride 2 (DDPM's ``resamp_with_conv``)."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv_layer(self.channels, 3, 2, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 convolution."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    conv_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        return conv_layer(self.channels, dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
                     impl=self.conv_impl)(
            upsample_nearest(x)
        )


class ResBlock(nn.Module):
    r"""Residual block with timestep conditioning (Ho et al. 2020; Dhariwal & Nichol 2021).

    .. math::
        h &= \mathrm{conv}_1(\mathrm{SiLU}(\mathrm{GN}_1(x))) \\
        h &= \mathrm{SiLU}(\mathrm{GN}_2(h + W e))  \quad\text{(additive, DDPM), or} \\
        h &= \mathrm{SiLU}(\mathrm{GN}_2(h)\,(1 + s) + b),\ [s, b] = W e  \quad\text{(scale-shift, ADM)} \\
        y &= \mathrm{skip}(x) + \mathrm{conv}_2(\mathrm{dropout}(h))

    with ``e = SiLU(temb)``, ``skip`` a 1x1 convolution when the channel count changes (identity otherwise)
    and ``conv_2`` zero-initialised, so the block is the identity (or its skip) at initialisation.
    ``resample="down"|"up"`` resamples both branches inside the block (ADM's ``resblock_updown``; average
    pooling / nearest neighbour).
    """

    out_channels: int
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-5
    use_scale_shift_norm: bool = False
    resample: Optional[str] = None
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    conv_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(kw, impl=self.conv_impl)
        h = GroupNorm(self.norm_groups, self.norm_eps, act=True, name="norm1", **kw)(x)
        if self.resample == "down":
            h, x = _avg_pool2(h), _avg_pool2(x)
        elif self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        h = conv_layer(self.out_channels, name="conv1", **ckw)(h)

        n_emb = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb = nn.Dense(n_emb, name="temb_proj", **kw)(nn.silu(temb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = GroupNorm(self.norm_groups, self.norm_eps, name="norm2", **kw)(h)
            h = nn.silu(h * (1 + scale) + shift)
        else:
            h = GroupNorm(self.norm_groups, self.norm_eps, act=True, name="norm2", **kw)(h + emb)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv_layer(self.out_channels, zero=True, name="conv2", **ckw)(h)

        if x.shape[-1] != self.out_channels:
            x = conv_layer(self.out_channels, kernel=1, name="skip", **ckw)(x)
        return x + h


class TransformerBlock(nn.Module):
    r"""Pre-norm transformer layer of LDM / Stable Diffusion (Rombach et al. 2022)::

        h = h + SelfAttn(LN_1(h))
        h = h + CrossAttn(LN_2(h), text_states, text_mask)     (skipped when there is no text)
        h = h + GEGLU(LN_3(h))
    """

    num_heads: int
    head_dim: int
    context_dim: Optional[int]
    ff_mult: int = 4
    norm_eps: float = 1e-5
    impl: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    gelu_approximate: bool = True

    @nn.compact
    def __call__(self, h, context=None, mask=None, any_real=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = h.shape[-1]
        attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, out_features=dim, impl=self.impl, **kw)
        h = h + Attention(name="self_attn", **attn)(nn.LayerNorm(self.norm_eps, name="norm1", **kw)(h))
        if self.context_dim is not None:
            if context is not None:
                y = nn.LayerNorm(self.norm_eps, name="norm2", **kw)(h)
                h = h + Attention(name="cross_attn", **attn)(y, context, mask, any_real)
            elif self.is_initializing():
                # Create the cross-attention parameters even when initialising without text.
                y = nn.LayerNorm(self.norm_eps, name="norm2", **kw)(h)
                dummy = jnp.zeros((h.shape[0], 1, self.context_dim), self.dtype)
                Attention(name="cross_attn", **attn)(y, dummy)
        y = nn.LayerNorm(self.norm_eps, name="norm3", **kw)(h)
        return h + GEGLU(dim, self.ff_mult, self.gelu_approximate, name="ff", **kw)(y)


class SpatialTransformer(nn.Module):
    r"""LDM's spatial transformer: ``x + proj_out(Transformer^depth(proj_in(GN(x))))`` on the H*W tokens.

    ``proj_in`` maps the C channels to the inner width ``num_heads * head_dim`` and ``proj_out``
    (zero-initialised) maps back, so the block is the identity at initialisation.
    """

    num_heads: int
    head_dim: int
    context_dim: Optional[int]
    depth: int = 1
    ff_mult: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-5
    impl: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    group_norm_eps: Optional[float] = None  # the GroupNorm's ε (None: norm_eps, which the LayerNorms use)
    gelu_approximate: bool = True

    @nn.compact
    def __call__(self, x, context=None, mask=None, any_real=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        inner = self.num_heads * self.head_dim
        gn_eps = self.norm_eps if self.group_norm_eps is None else self.group_norm_eps
        h = GroupNorm(self.norm_groups, gn_eps, name="norm", **kw)(x).reshape(b, hh * ww, c)
        h = nn.Dense(inner, name="proj_in", **kw)(h)
        for i in range(self.depth):
            h = TransformerBlock(
                self.num_heads, self.head_dim, self.context_dim, self.ff_mult, self.norm_eps, self.impl,
                name=f"block_{i}", gelu_approximate=self.gelu_approximate, **kw,
            )(h, context, mask, any_real)
        h = nn.Dense(c, kernel_init=nn.initializers.zeros, name="proj_out", **kw)(h)
        return x + h.reshape(b, hh, ww, c)


class SelfAttentionBlock(nn.Module):
    r"""DDPM / ADM attention block: ``x + proj(Attn(qkv(GN(x))))`` with biased 1x1 projections and a
    zero-initialised output projection (Ho et al. 2020). Text inputs are ignored."""

    num_heads: int
    head_dim: int
    norm_groups: int = 32
    norm_eps: float = 1e-5
    impl: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None, any_real=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        h = GroupNorm(self.norm_groups, self.norm_eps, name="norm", **kw)(x).reshape(b, hh * ww, c)
        h = Attention(
            self.num_heads, self.head_dim, c, zero_out=True, qkv_bias=True, impl=self.impl, name="attn", **kw
        )(h)
        return x + h.reshape(b, hh, ww, c)


# --------------------------------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    r"""Text-conditioned U-Net ``ε_θ(x_t, t, c)`` (Ho et al. 2020; Rombach et al. 2022).

    ``__call__(x_t, t, text_states=None, text_mask=None, pooled=None, labels=None, train=False)``
    returns an array shaped like ``x_t`` with ``config.output_channels`` channels, in float32. The time
    embedding is ``MLP(timestep_embedding(t))`` (Linear, SiLU, Linear) plus ``Dense(pooled)`` and/or
    ``Embed(labels)`` when the config has ``pooled_dim`` / ``num_classes``. At initialisation the output
    is exactly zero (zero-initialised output convolution).
    """

    config: UNetConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        text_states: Optional[Array] = None,
        text_mask: Optional[Array] = None,
        pooled: Optional[Array] = None,
        labels: Optional[Array] = None,
        train: bool = False,
    ) -> Array:
        # One piece on purpose: the forward pass reads top to bottom as the architecture (conditioning, down path,
        # middle, up path with its skips, output), with the module names that checkpoints and diffusers'
        # conversion rules rely on; split into methods, those names and the skips' order would be spread out.
        cfg = self.config
        f = cfg.downsample_factor
        check_denoiser_inputs(cfg, x, t, text_states, text_mask, pooled, labels,
                              f"2**(num_levels-1) = {f} ({cfg.num_levels} levels)")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        b = x.shape[0]

        # ---- conditioning -------------------------------------------------------------------------
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb = timestep_embedding(
            t, cfg.channels, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
            max_period=cfg.max_period,
        )
        temb = nn.Dense(cfg.temb_dim, name="time_mlp_0", **kw)(temb)
        temb = nn.Dense(cfg.temb_dim, name="time_mlp_1", **kw)(nn.silu(temb))
        if cfg.pooled_dim is not None and (pooled is not None or self.is_initializing()):
            if pooled is None:
                pooled = jnp.zeros((b, cfg.pooled_dim), dtype)
            temb = temb + nn.Dense(cfg.temb_dim, name="pooled_proj", **kw)(pooled.astype(dtype))
        if cfg.num_classes is not None and (labels is not None or self.is_initializing()):
            if labels is None:
                labels = jnp.zeros((b,), jnp.int32)
            temb = temb + nn.Embed(cfg.num_classes, cfg.temb_dim, name="label_emb", **kw)(labels)

        context = mask = any_real = None
        if text_states is not None and cfg.attention_type == "transformer":
            context = text_states.astype(dtype)
            if text_mask is not None and cfg.use_text_mask:
                mask = jnp.asarray(text_mask).astype(bool)
                any_real = jnp.any(mask, axis=-1)

        # ---- blocks -------------------------------------------------------------------------------
        res_cls, attn_cls = ResBlock, (SpatialTransformer if cfg.attention_type == "transformer"
                                       else SelfAttentionBlock)
        if cfg.remat:
            policy = getattr(jax.checkpoint_policies, cfg.remat_policy) if cfg.remat_policy else None
            res_cls = nn.remat(res_cls, prevent_cse=True, policy=policy)
            attn_cls = nn.remat(attn_cls, prevent_cse=True, policy=policy)

        def res(out_ch, name, resample=None):
            return res_cls(
                out_ch, cfg.dropout, cfg.norm_groups, cfg.norm_eps, cfg.use_scale_shift_norm, resample,
                deterministic=not train, conv_impl=cfg.conv_impl, name=name, **kw,
            )

        def attn(ch, name):
            n, d = cfg.heads(ch)
            if cfg.attention_type == "transformer":
                mod = attn_cls(
                    n, d, cfg.context_dim, cfg.transformer_depth, cfg.ff_mult, cfg.norm_groups, cfg.norm_eps,
                    cfg.attention_impl, name=name, group_norm_eps=cfg.transformer_norm_eps,
                    gelu_approximate=cfg.gelu_approximate, **kw,
                )
            else:
                mod = attn_cls(n, d, cfg.norm_groups, cfg.norm_eps, cfg.attention_impl, name=name, **kw)
            return lambda h: mod(h, context, mask, any_real)

        last = cfg.num_levels - 1
        h = conv_layer(cfg.level_channels(0), name="conv_in", impl=cfg.conv_impl, **kw)(x.astype(dtype))
        skips = [h]
        for level in range(cfg.num_levels):
            ch = cfg.level_channels(level)
            for i in range(cfg.num_res_blocks):
                h = res(ch, f"down_{level}_res_{i}")(h, temb)
                if level in cfg.attention_levels:
                    h = attn(ch, f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != last:
                if cfg.resblock_updown:
                    h = res(ch, f"down_{level}_downsample", "down")(h, temb)
                else:
                    h = Downsample(ch, name=f"down_{level}_downsample", **kw)(h)
                skips.append(h)

        ch = cfg.level_channels(last)
        h = res(ch, "mid_res_0")(h, temb)
        if cfg.mid_attention:
            h = attn(ch, "mid_attn")(h)
        h = res(ch, "mid_res_1")(h, temb)

        for level in reversed(range(cfg.num_levels)):
            ch = cfg.level_channels(level)
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(ch, f"up_{level}_res_{i}")(h, temb)
                if level in cfg.attention_levels:
                    h = attn(ch, f"up_{level}_attn_{i}")(h)
            if level != 0:
                if cfg.resblock_updown:
                    h = res(ch, f"up_{level}_upsample", "up")(h, temb)
                else:
                    h = Upsample(ch, conv_impl=cfg.conv_impl, name=f"up_{level}_upsample", **kw)(h)

        h = GroupNorm(cfg.norm_groups, cfg.norm_eps, act=True, name="norm_out", **kw)(h)
        h = conv_layer(cfg.output_channels, zero=True, name="conv_out", impl=cfg.conv_impl, **kw)(h)
        return h.astype(jnp.float32)

    def init_params(self, key: Array, image_size: int | tuple[int, int] = 32, batch: int = 1,
                    text_len: int = 1):
        """Initialise parameters from dummy inputs of the given image size (with text when the config has
        a ``context_dim``). Under ``jax.eval_shape`` this only computes shapes."""
        x, t, ctx, m = dummy_inputs(self.config, image_size, batch, text_len)
        return self.init({"params": key, "dropout": key}, x, t, ctx, m)["params"]


def dummy_inputs(cfg: UNetConfig, image_size: int | tuple[int, int] = 32, batch: int = 1,
                 text_len: int = 1):
    """Zero inputs ``(x_t, t, text_states, text_mask)`` for ``init`` / ``eval_shape``."""
    hh, ww = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = jnp.zeros((batch, hh, ww, cfg.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    if cfg.context_dim is None:
        return x, t, None, None
    return x, t, jnp.zeros((batch, text_len, cfg.context_dim), jnp.float32), jnp.ones((batch, text_len), bool)
