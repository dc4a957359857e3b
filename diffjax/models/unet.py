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
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from diffjax import xla_cpu

__all__ = [
    "UNetConfig",
    "UNet",
    "unet_preset",
    "PRESETS",
    "count_params",
    "dummy_inputs",
    "timestep_embedding",
]

Array = jax.Array

_ATTENTION_TYPES = ("transformer", "self")
ATTENTION_IMPLS = (None, "dpa", "xla", "cudnn", "einsum")
CONV_IMPLS = (None, "xla", "banded")
REMAT_POLICIES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


# --------------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------------


def canonical_dtype(value: Any, field: str) -> str:
    try:
        name = jnp.dtype(value).name
    except TypeError as e:
        raise ValueError(f"UNetConfig.{field}: not a dtype: {value!r}") from e
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"UNetConfig.{field} must be float32, bfloat16 or float16, got {name}")
    return name


class PresetConfig:
    """What the network configs share (``UNetConfig``, ``DiTConfig``, ``VAEConfig``): named presets, a dict of
    field overrides per name (``_PRESETS`` of the class's module, ``_KIND`` naming it in errors), and ``replace``."""

    _KIND = "network"

    @classmethod
    def _presets(cls) -> dict:
        raise NotImplementedError

    @classmethod
    def preset(cls, name: str, **overrides):
        """The named preset, with optional field overrides; an unknown name raises ValueError listing the valid ones."""
        presets = cls._presets()
        if name not in presets:
            raise ValueError(f"unknown {cls._KIND} preset {name!r}; valid presets: {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


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
        ``"einsum"``: the same math as two einsums (faster on CPU, see ``_einsum_attention``);
        ``None`` (auto): ``"einsum"`` on the CPU backend, ``"dpa"`` elsewhere.
      conv_impl: how the weight gradients of the stride-1 convolutions are computed (the forward pass and
        the input gradients are XLA's convolutions either way). ``"xla"``: XLA's own transposed
        convolution; ``"banded"``: the same sum split into bands of ~7 output rows (see
        :func:`banded_conv`), up to 8x faster with XLA:CPU's default (YNNPACK) convolutions; ``None`` (auto):
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


# Named presets: field overrides of UNetConfig. Parameter counts are in benchmarks/RESULTS_unet.md.
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


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def timestep_embedding(
    t: Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Array:
    r"""Sinusoidal embedding of (possibly fractional) timesteps, in float32.

    With ``half = dim // 2`` and frequencies

    .. math::  \omega_i = \exp\!\big(-\ln(P) \cdot i / (\text{half} - s)\big),\quad i = 0, \dots,
               \text{half}-1,\quad P = \text{max\_period},\ s = \text{freq\_shift},

    the embedding is ``[sin(t ω), cos(t ω)]`` (DDPM, Ho et al. 2020, which uses ``freq_shift=1``; the
    Transformer position encoding of Vaswani et al. 2017) or ``[cos(t ω), sin(t ω)]`` with
    ``flip_sin_to_cos=True`` (the ADM / Stable Diffusion order, ``freq_shift=0``). An odd ``dim`` is padded
    with one zero.
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    r"""Group normalisation (Wu & He 2018) with float32 statistics, optionally fused with SiLU.

    For each sample and each of ``num_groups`` channel groups g, over its positions and channels,

    .. math::  \mu_g = E[x],\quad \sigma_g^2 = \max(E[x^2] - \mu_g^2, 0),\quad
               y = (x - \mu_g)\,/\sqrt{\sigma_g^2 + \epsilon}\cdot \gamma + \beta

    (the one-pass variance, as Flax's GroupNorm computes it by default). The normalisation is folded
    into one per-(sample, channel) affine map ``y = x a + b`` (one pass over x forward and backward),
    computed in float32 and cast to ``dtype``. The moments are summed over positions first, per channel, and
    then over each group's channels: one reduction over both axes of the (B, P, G, C/G) view is what XLA:CPU
    runs 2-5x slower (the whole normalisation at 32×32×64, batch 32: 9.5 -> 1.9 ms forward, 10.7 -> 4.8 ms
    with its gradient; the suite's sampler 1.047x and train step 1.043x faster; jax 0.10.2, 2-core CPU).
    """

    num_groups: int
    epsilon: float = 1e-5
    act: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        g = self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        xr = xf.reshape(b, -1, c)
        n = xr.shape[1] * (c // g)  # elements per group

        def group_mean(v):  # (B, P, C) -> (B, G): positions first (contiguous rows of C), then each group's channels
            return jnp.sum(v, axis=1).reshape(b, g, c // g).sum(-1) / n

        mean = group_mean(xr)
        var = jnp.maximum(group_mean(jnp.square(xr)) - jnp.square(mean), 0.0)
        inv = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), c // g, axis=-1)  # (B, C)
        a = inv * scale.astype(jnp.float32)
        shift = bias.astype(jnp.float32) - jnp.repeat(mean, c // g, axis=-1) * a
        y = xf * a.reshape(b, *([1] * (x.ndim - 2)), c) + shift.reshape(b, *([1] * (x.ndim - 2)), c)
        if self.act:
            y = nn.silu(y)
        return y.astype(self.dtype)


_BAND_ROWS = 7  # output rows per band of banded_conv's weight gradient


def _conv_nhwc(x, w, padding, precision=None):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def banded_conv(x: Array, w: Array, padding: tuple, precision=None) -> Array:
    r"""Stride-1 NHWC/HWIO convolution whose weight gradient is summed over bands of output rows.

    The forward pass is XLA's convolution; :math:`\partial L/\partial x` is the forward convolution of the
    output gradient with the kernel flipped in space and transposed in its channels (padding ``k - 1 - p``), the
    same numbers as XLA's transposed convolution. Written out because inside a while loop (a sampler's
    ``lax.scan`` taking ``∇_x`` at every step, as alignment guidance does) XLA:CPU folds that kernel transpose
    into the convolution's dimension labels (``01oi``) and lowers it to a generic convolution, ~40x slower than
    the fused one it emits outside loops (``benchmarks/alignment_cost.py``'s probe). The weight gradient

    .. math:: \frac{\partial L}{\partial w_{ijcd}} = \sum_{b,h,w} x^{\mathrm{pad}}_{b,h+i,w+j,c}\,
              g_{b,h,w,d}

    is split over bands of ~``_BAND_ROWS`` output rows ``h``, each band's term being the weight gradient of
    the convolution of its rows (plus the ``kh - 1`` halo rows) with no vertical padding. The sum is the
    same; only the summation order differs. Why: XLA:CPU lowers the weight gradient to a convolution
    whose window is the whole B x H x W output, and that is up to 20x slower than the forward pass for
    some shapes (e.g. 48 -> 48 channels at 28 x 28, batch 64: 560 ms vs 29 ms, jax 0.10 on 2 cores);
    bands of 7 rows bring it to 70 ms. The batch dimension is left whole, so a batch sharded across
    devices stays sharded. ``benchmarks/conv_grad.py`` measures it.
    """
    return _conv_nhwc(x, w, padding, precision)


def _banded_conv_fwd(x, w, padding, precision):
    return _conv_nhwc(x, w, padding, precision), (x, w)


def _banded_conv_bwd(padding, precision, res, g):
    x, w = res
    dx = _conv_input_grad(g, w, padding, precision, x)
    (top, bottom), horizontal = padding
    kh, rows = w.shape[0], g.shape[1]
    xp = jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)))
    n = max(1, round(rows / _BAND_ROWS))
    edges = [round(k * rows / n) for k in range(n + 1)]
    acc = jnp.promote_types(w.dtype, jnp.float32)  # the bands' partial sums, added in at least float32
    dw = jnp.zeros(w.shape, acc)
    for r0, r1 in zip(edges[:-1], edges[1:]):
        band = xp[:, r0:r1 + kh - 1]
        part = jax.vjp(lambda w_: _conv_nhwc(band, w_, ((0, 0), horizontal), precision), w)[1](g[:, r0:r1])[0]
        dw = dw + part.astype(acc)
    return dx, dw.astype(w.dtype)


banded_conv.defvjp(_banded_conv_fwd, _banded_conv_bwd)


def _conv_input_grad(g, w, padding, precision, x):
    """∂L/∂x of the stride-1 convolution ``_conv_nhwc(x, w, padding)`` given its output gradient ``g``:
    ``g`` convolved with ``w`` flipped in space, input and output channels swapped, padded ``k - 1 - p``."""
    (kh, kw), ((top, bottom), (left, right)) = w.shape[:2], padding
    pad = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    if min(v for pair in pad for v in pair) < 0:  # padding wider than the kernel: XLA's own transpose
        return jax.vjp(lambda x_: _conv_nhwc(x_, w, padding, precision), x)[1](g)[0]
    return _conv_nhwc(g, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), pad, precision).astype(x.dtype)


def conv_general_dilated(impl: Optional[str] = None):
    """A ``conv_general_dilated`` for ``nn.Conv``: :func:`banded_conv` for the stride-1, undilated,
    ungrouped NHWC convolutions when ``impl`` (``UNetConfig.conv_impl``) asks for it, XLA's otherwise."""
    if impl is None:  # auto
        impl = "banded" if jax.default_backend() == "cpu" and not xla_cpu.convolutions_from_xla() else "xla"

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None):
        plain = (
            impl == "banded" and lhs.ndim == 4 and rhs.shape[0] > 1 and tuple(window_strides) == (1, 1)
            and not isinstance(padding, str) and all(p >= 0 for pair in padding for p in pair)
            and feature_group_count == 1 and batch_group_count == 1
            and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
            and preferred_element_type is None and dimension_numbers is not None
            and tuple(dimension_numbers) == tuple(jax.lax.conv_dimension_numbers(
                lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
        )
        if plain:
            return banded_conv(lhs, rhs, tuple(tuple(int(v) for v in p) for p in padding), precision)
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type,
        )

    return conv


def conv_layer(features, kernel=3, stride=1, zero=False, dtype=jnp.float32, param_dtype=jnp.float32, name=None,
               impl=None) -> nn.Conv:
    """A square ``kernel`` × ``kernel`` NHWC convolution with "same" padding (kernel // 2 each side), LeCun-normal
    or zero-initialised (``zero``), its weight gradient by ``conv_impl`` ``impl`` (see :func:`banded_conv`)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_general_dilated(impl),
        name=name,
    )


def upsample_nearest(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling of NHWC ``x``."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


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


def _einsum_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v as two einsums on (B, T, N, D) tensors; logits and softmax in float32.

    The same computation as the XLA path of ``jax.nn.dot_product_attention``, without that path's ``vmap``
    over query groups, whose batching rules add transposes and copies of the (B, N, T, S) logits (measured
    in jax 0.10.2 on CPU: 3 copies + 2 transposes of the logits per attention in a training step). q, k and
    v are moved to (B, N, T, D) first, so both products are batched over (B, N) with the contracted axis
    last or second to last: written on (B, T, N, D) directly, the second product's output came out of
    XLA:CPU laid out (B, N, D, T) and had to be transposed back, which made the matched U-Net's forward pass
    1.29x slower (forward at batch 32, 2-core CPU, jax 0.10.2; the backward pass unchanged). Masked logits
    get the same finite large negative value, so a row without real tokens gives no NaN."""
    q = (q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bntd,bnsd->bnts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, 0.7 * float(jnp.finfo(jnp.float32).min))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bnsd->bntd", probs, v).transpose(0, 2, 1, 3)


def _dpa(q, k, v, mask, impl):
    """Attention on (B, T, N, D) tensors; ``mask`` (B, S) bool or None. See ``UNetConfig.attention_impl``.

    A row without any real token attends uniformly to its (finite) padding -- no NaN; the caller zeroes
    that row's contribution."""
    if impl is None:  # auto
        impl = "einsum" if jax.default_backend() == "cpu" else "dpa"
    if impl == "einsum":
        return _einsum_attention(q, k, v, mask)
    implementation = None if impl == "dpa" else impl
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    if impl == "cudnn":
        lengths = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32), 1)
        return jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, implementation=implementation
        )
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation=implementation)


class Attention(nn.Module):
    r"""Multi-head attention ``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017).

    Self-attention when ``context`` is None, cross-attention otherwise (queries from ``x``, keys and
    values from ``context``). The q/k/v projections have no bias (``qkv_bias``), the output projection
    has. ``mask`` (B, S) marks the real context tokens. The projections produce (B, T, heads, head_dim)
    tensors, the layout of ``jax.nn.dot_product_attention``, which computes the product (and picks the
    platform's fused kernel, e.g. ``impl="cudnn"``) except on CPU, where the equivalent einsum form is
    faster (``UNetConfig.attention_impl``). Logits and softmax are in float32.
    """

    num_heads: int
    head_dim: int
    out_features: int
    zero_out: bool = False
    out_bias: bool = True
    qkv_bias: bool = False
    impl: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None, any_real=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        n, d = self.num_heads, self.head_dim
        src = x if context is None else context.astype(self.dtype)
        proj = dict(use_bias=self.qkv_bias, **kw)
        # Three projections (one fused QKV matmul would need slices of its output, which cost more on
        # CPU than they save), reshaped to (B, T, heads, head_dim) at no cost.
        q = nn.Dense(n * d, name="q", **proj)(x).reshape(b, t, n, d)
        k = nn.Dense(n * d, name="k", **proj)(src).reshape(b, src.shape[1], n, d)
        v = nn.Dense(n * d, name="v", **proj)(src).reshape(b, src.shape[1], n, d)
        o = _dpa(q, k, v, mask, self.impl).reshape(b, t, n * d)
        init = nn.initializers.zeros if self.zero_out else nn.initializers.lecun_normal()
        o = nn.Dense(self.out_features, use_bias=self.out_bias, kernel_init=init, name="out", **kw)(o)
        if any_real is not None:
            # No real token in a sample: its cross-attention contributes exactly nothing (as with no text).
            o = jnp.where(any_real[:, None, None], o, jnp.zeros((), o.dtype))
        return o


class GEGLU(nn.Module):
    r"""Gated feed-forward ``W_2 (x W + b ⊙ GELU(x V + c))`` (Shazeer 2020, "GLU Variants Improve
    Transformer"), hidden width ``mult * dim``; GELU in its tanh approximation, or exact (``approximate=False``,
    as diffusers' Stable Diffusion U-Net computes it)."""

    dim: int
    mult: int = 4
    approximate: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = self.mult * self.dim
        # W and V as two matmuls (not one of width 2*hidden split in two: the slices cost more on CPU).
        a = nn.Dense(hidden, name="proj_value", **kw)(x)
        gate = nn.Dense(hidden, name="proj_gate", **kw)(x)
        return nn.Dense(self.dim, name="proj_out", **kw)(a * nn.gelu(gate, approximate=self.approximate))


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


def check_denoiser_inputs(cfg, x, t, text_states, text_mask, pooled, labels, size_what: str) -> None:
    """One-line ValueErrors for denoiser inputs that do not fit ``cfg`` (a UNetConfig or DiTConfig): x_t NHWC with
    H and W multiples of ``cfg.size_multiple`` (``size_what`` says why) and ``in_channels`` channels, t a scalar
    or (B,), text states (B, L, context_dim) with a (B, L) mask, pooled (B, pooled_dim), labels."""
    if x.ndim != 4:
        raise ValueError(f"x_t must be NHWC (B, H, W, C), got shape {x.shape}")
    b, hh, ww, c = x.shape
    if hh % cfg.size_multiple or ww % cfg.size_multiple:
        raise ValueError(f"image size {hh}x{ww} is not divisible by {size_what}")
    if c != cfg.in_channels:
        raise ValueError(f"x_t has {c} channels but config.in_channels is {cfg.in_channels}")
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] not in (1, b)):
        raise ValueError(f"t must be a scalar or have shape ({b},), got {jnp.shape(t)}")
    if text_states is not None:
        if cfg.context_dim is None:
            raise ValueError("text_states given but config.context_dim is None (no cross-attention)")
        if text_states.ndim != 3 or text_states.shape[0] != b:
            raise ValueError(f"text_states must be (B={b}, L, D), got shape {text_states.shape}")
        if text_states.shape[-1] != cfg.context_dim:
            raise ValueError(f"text_states last dim {text_states.shape[-1]} != config.context_dim {cfg.context_dim}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_states.shape[:2]):
            raise ValueError(f"text_mask shape {tuple(text_mask.shape)} != text_states (B, L) "
                             f"{tuple(text_states.shape[:2])}")
    if pooled is not None:
        if cfg.pooled_dim is None:
            raise ValueError("pooled given but config.pooled_dim is None")
        if pooled.shape != (b, cfg.pooled_dim):
            raise ValueError(f"pooled must have shape ({b}, {cfg.pooled_dim}), got {pooled.shape}")
    if labels is not None and cfg.num_classes is None:
        raise ValueError("labels given but config.num_classes is None")


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
