"""The KL autoencoder of latent diffusion, in Flax linen (NHWC).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", §3 and Appendix G: a
convolutional encoder maps an image x to the mean and log-variance of a diagonal Gaussian posterior over a
latent z with ``latent_channels`` channels and 2^(levels-1) times fewer pixels per side; the decoder maps z
back. Diffusion then runs on the scaled latent ``(z - shift_factor) · scaling_factor`` (0.18215 for Stable
Diffusion 1.x/2.x), whose variance is then about one::

    x ─ conv_in ─► [ResBlock × layers (+ downsample)] per level ─► mid (ResBlock, attention, ResBlock)
      ─► GroupNorm ─ SiLU ─ conv_out (2 × latent) ─ quant_conv (1×1) ─► (mean, log σ²)
    z ─ post_quant_conv (1×1) ─ conv_in ─► mid ─► [ResBlock × (layers + 1) (+ upsample)] per level
      ─► GroupNorm ─ SiLU ─ conv_out ─► x̂

The layers are those of the reference implementation as diffusers' ``AutoencoderKL`` has them (so its weights
convert one to one, ``diffjax.diffusers_format``): residual blocks without time embedding, GroupNorm with ε = 1e-6, a
downsampling convolution of stride 2 after zero-padding one row and column at the bottom and right, nearest
upsampling followed by a convolution, one single-head self-attention block (with biases) in each middle block,
and the log-variance clipped to [-30, 20].

    vae = AutoencoderKL(vae_preset("sd"))
    params = vae.init(key, x)["params"]
    posterior = vae.apply({"params": params}, x, method=vae.encode)            # DiagonalGaussian
    x_rec = vae.apply({"params": params}, posterior.mode(), method=vae.decode)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.layers import CONV_IMPLS, GroupNorm, PresetConfig, canonical_dtype, conv_layer, upsample_nearest

__all__ = ["VAEConfig", "AutoencoderKL", "DiagonalGaussian", "vae_preset", "VAE_PRESETS"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VAEConfig(PresetConfig):
    """Architecture of :class:`AutoencoderKL` (the fields of diffusers' ``AutoencoderKL`` config that matter).

    Attributes:
      in_channels, out_channels: image channels in and out.
      latent_channels: channels of z.
      block_out_channels: width of each level; ``len - 1`` downsamplings.
      layers_per_block: residual blocks per encoder level (the decoder has one more per level).
      norm_num_groups, norm_eps: GroupNorm groups and epsilon.
      mid_block_add_attention: the middle blocks' self-attention.
      use_quant_conv, use_post_quant_conv: the 1×1 convolutions around the latent.
      scaling_factor, shift_factor: the diffusion model sees ``(z - shift) · scaling``.
      dtype, param_dtype: computation and parameter dtypes.
      conv_impl: as ``UNetConfig.conv_impl``.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    conv_impl: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "param_dtype"))

        def fail(msg):
            raise ValueError(f"VAEConfig: {msg}")

        if not self.block_out_channels or min(self.block_out_channels) < 1:
            fail(f"block_out_channels must be positive widths, got {self.block_out_channels}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            fail(f"norm_num_groups {self.norm_num_groups} does not divide the widths {bad}")
        if not self.scaling_factor > 0:
            fail(f"scaling_factor must be positive, got {self.scaling_factor}")
        if self.conv_impl not in CONV_IMPLS:
            fail(f"conv_impl {self.conv_impl!r} not one of {CONV_IMPLS}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 2^(levels - 1) (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    _KIND = "autoencoder"

    @classmethod
    def _presets(cls) -> dict:
        return VAE_PRESETS


VAE_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: two levels of widths 8 and 16, one residual block each.
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
    # Stable Diffusion 1.x / 2.x (83,653,863 parameters; 512 px → 64×64×4 latents).
    "sd": dict(),
    # SDXL's autoencoder: the same network, another latent scale.
    "sdxl": dict(scaling_factor=0.13025),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    return VAEConfig.preset(name, **overrides)


class DiagonalGaussian(NamedTuple):
    r"""The posterior q(z | x) = N(mean, exp(logvar)), logvar clipped to [-30, 20]."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: Array) -> Array:
        """z = mean + std · ε, ε ~ N(0, I)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean

    def kl(self) -> Array:
        """KL(q ‖ N(0, I)) per example: ½ Σ (mean² + σ² - 1 - log σ²)."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=axes)


class VAEResBlock(nn.Module):
    """``x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))``, with a 1×1 ``conv_shortcut`` when the width changes."""

    out_channels: int
    groups: int
    eps: float
    conv_impl: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(kw, impl=self.conv_impl)
        h = GroupNorm(self.groups, self.eps, act=True, name="norm1", **kw)(x)
        h = conv_layer(self.out_channels, name="conv1", **ckw)(h)
        h = GroupNorm(self.groups, self.eps, act=True, name="norm2", **kw)(h)
        h = conv_layer(self.out_channels, name="conv2", **ckw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv_layer(self.out_channels, kernel=1, name="conv_shortcut", **ckw)(x)
        return x + h


class VAEAttention(nn.Module):
    """The middle block's single-head self-attention over the H·W positions: ``x + out(softmax(q kᵀ/√C) v)``
    with q, k, v, out biased ``Dense`` layers on ``GroupNorm(x)`` (logits and softmax in float32)."""

    groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        h = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, hh * ww, c)
        q = nn.Dense(c, name="q", **kw)(h) * jnp.asarray(1.0 / math.sqrt(c), self.dtype)
        k = nn.Dense(c, name="k", **kw)(h)
        v = nn.Dense(c, name="v", **kw)(h)
        probs = jax.nn.softmax(jnp.einsum("btc,bsc->bts", q, k, preferred_element_type=jnp.float32), axis=-1)
        o = jnp.einsum("bts,bsc->btc", probs.astype(v.dtype), v)
        return x + nn.Dense(c, name="out", **kw)(o).reshape(b, hh, ww, c)


def _mid(cfg: VAEConfig, kw: dict, h: Array) -> Array:
    ch = cfg.block_out_channels[-1]
    g, eps = cfg.norm_num_groups, cfg.norm_eps
    h = VAEResBlock(ch, g, eps, cfg.conv_impl, name="mid_res_0", **kw)(h)
    if cfg.mid_block_add_attention:
        h = VAEAttention(g, eps, name="mid_attn", **kw)(h)
    return VAEResBlock(ch, g, eps, cfg.conv_impl, name="mid_res_1", **kw)(h)


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        h = conv_layer(cfg.block_out_channels[0], name="conv_in", impl=cfg.conv_impl, **kw)(x.astype(kw["dtype"]))
        last = len(cfg.block_out_channels) - 1
        for i, ch in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                h = VAEResBlock(ch, g, eps, cfg.conv_impl, name=f"down_{i}_res_{j}", **kw)(h)
            if i != last:  # pad one row and column at the bottom and right, then a stride-2 convolution
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = nn.Conv(ch, (3, 3), strides=(2, 2), padding="VALID", name=f"down_{i}_downsample", **kw)(h)
        h = _mid(cfg, kw, h)
        h = GroupNorm(g, eps, act=True, name="norm_out", **kw)(h)
        return conv_layer(2 * cfg.latent_channels, name="conv_out", impl=cfg.conv_impl, **kw)(h)


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        widths = tuple(reversed(cfg.block_out_channels))  # level 0 of the decoder is the lowest resolution
        h = conv_layer(widths[0], name="conv_in", impl=cfg.conv_impl, **kw)(z.astype(kw["dtype"]))
        h = _mid(cfg, kw, h)
        for i, ch in enumerate(widths):
            for j in range(cfg.layers_per_block + 1):
                h = VAEResBlock(ch, g, eps, cfg.conv_impl, name=f"up_{i}_res_{j}", **kw)(h)
            if i != len(widths) - 1:
                h = conv_layer(ch, name=f"up_{i}_upsample", impl=cfg.conv_impl, **kw)(upsample_nearest(h))
        h = GroupNorm(g, eps, act=True, name="norm_out", **kw)(h)
        return conv_layer(cfg.out_channels, name="conv_out", impl=cfg.conv_impl, **kw)(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> x̂`` (NHWC, images in [-1, 1]); ``__call__`` is
    ``decode(encode(x).mode())`` (and creates every parameter at init)."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv(c2, (1, 1), name="quant_conv", **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = (nn.Conv(cfg.latent_channels, (1, 1), name="post_quant_conv", **kw)
                                if cfg.use_post_quant_conv else None)

    def _check(self, x, channels, what):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {x.shape}")

    def encode(self, x: Array) -> DiagonalGaussian:
        cfg = self.config
        self._check(x, cfg.in_channels, "the image")
        f = cfg.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the autoencoder's "
                             f"downsampling {f}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Array) -> Array:
        self._check(z, self.config.latent_channels, "the latent")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z.astype(jnp.dtype(self.config.dtype)))
        return self.decoder(z)

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x).mode())


# --------------------------------------------------------------------------------------------------
# Scaled latents, in chunks.
# --------------------------------------------------------------------------------------------------


def _chunked(fn, x: Array, chunk: Optional[int]) -> Array:
    """``fn`` over the batch of ``x`` in chunks of ``chunk`` (``lax.map``: one chunk's activations live at a time,
    so that large batches fit); the batch is padded to a multiple of the chunk and the padding dropped."""
    b = x.shape[0]
    if not chunk or chunk >= b:
        return fn(x)
    n = -(-b // chunk)
    padded = jnp.concatenate([x, jnp.zeros((n * chunk - b,) + x.shape[1:], x.dtype)]) if n * chunk > b else x
    out = jax.lax.map(fn, padded.reshape((n, chunk) + x.shape[1:]))
    return out.reshape((n * chunk,) + out.shape[2:])[:b]


def scale_latents(config: VAEConfig, posterior: DiagonalGaussian, noise: Optional[Array] = None) -> Array:
    """The diffusion model's latent ``(z - shift) · scaling`` of a posterior: z = mean + std · ``noise``, or its
    mean without noise (Rombach et al. 2022, §3). Precomputed moments (``diffjax.data.latents``) and encoding in
    the step both go through here."""
    z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def encode_latents(vae: AutoencoderKL, params, images: Array, key: Optional[Array] = None,
                   chunk: Optional[int] = None, noise: Optional[Array] = None) -> Array:
    """The diffusion model's latents of ``images`` (NHWC in [-1, 1]): ``(z - shift) · scaling`` with z sampled
    from the posterior (z = mean + std · ε, ε drawn with ``key`` or given as ``noise``), or its mean."""
    cfg = vae.config

    def moments(x):
        posterior = vae.apply({"params": params}, x, method=vae.encode)
        return jnp.concatenate([posterior.mean, posterior.logvar], -1)

    both = _chunked(moments, images, chunk)
    posterior = DiagonalGaussian(both[..., :cfg.latent_channels], both[..., cfg.latent_channels:])
    if noise is None and key is not None:
        noise = jax.random.normal(key, posterior.mean.shape, jnp.float32)
    return scale_latents(cfg, posterior, noise)


def decode_latents(vae: AutoencoderKL, params, latents: Array, chunk: Optional[int] = None) -> Array:
    """Images (NHWC, float32, not clipped) of the diffusion model's latents: ``decode(latents / scaling + shift)``,
    ``chunk`` examples at a time."""
    cfg = vae.config
    z = latents.astype(jnp.float32) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    return _chunked(lambda c: vae.apply({"params": params}, c, method=vae.decode), z, chunk)
