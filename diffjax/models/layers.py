"""The layers the networks share (the U-Net, the DiT, the autoencoder, the classifier), and their configs' common
base: ``PresetConfig`` (named presets), ``canonical_dtype``, the attention, convolution and remat choices.

A network file imports its layers from here, never from another network's file (tests/test_imports.py). The
XLA:CPU-only weight-gradient kernel that ``conv_layer`` can use lives in :mod:`diffjax.models.cpu_kernels`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import xla_cpu
from diffjax.models.cpu_kernels import banded_conv

__all__ = [
    "ATTENTION_IMPLS",
    "CONV_IMPLS",
    "REMAT_POLICIES",
    "Attention",
    "GEGLU",
    "GroupNorm",
    "PresetConfig",
    "canonical_dtype",
    "check_denoiser_inputs",
    "conv_general_dilated",
    "conv_layer",
    "count_params",
    "timestep_embedding",
    "upsample_nearest",
]

Array = jax.Array

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


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


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
    runs several times slower (the figures: docs/performance.md).
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


def _einsum_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v as two einsums on (B, T, N, D) tensors; logits and softmax in float32.

    The same computation as the XLA path of ``jax.nn.dot_product_attention``, without that path's ``vmap``
    over query groups, whose batching rules add transposes and copies of the (B, N, T, S) logits (measured
    in jax 0.10.2 on CPU: 3 copies + 2 transposes of the logits per attention in a training step). q, k and
    v are moved to (B, N, T, D) first, so both products are batched over (B, N) with the contracted axis
    last or second to last: written on (B, T, N, D) directly, the second product's output came out of
    XLA:CPU laid out (B, N, D, T) and had to be transposed back, which made the U-Net's forward pass slower
    (the figures: docs/performance.md). Masked logits
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
