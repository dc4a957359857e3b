"""Tests of diffjax.models.unet: tiny configs, 8x8 / 16x16 images, batch 2; shape checks via eval_shape."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import xla_cpu
from diffjax.models import PRESETS, UNet, UNetConfig, count_params, timestep_embedding, unet_preset
from diffjax.models.cpu_kernels import banded_conv
from diffjax.models.layers import GroupNorm

B, H, L = 2, 16, 6


def _inputs(cfg, size=H, seed=0):
    """Host-side (numpy) random inputs, so that no eager JAX op has to be compiled."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, size, size, cfg.in_channels), np.float32))
    t = jnp.array([3.0, 517.5])
    text = jnp.asarray(rng.standard_normal((B, L, cfg.context_dim), np.float32))
    # sample 0: 4 real tokens then padding; sample 1: 2 real tokens then padding.
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=bool)
    return x, t, text, mask


def _perturb(params, scale=0.1, seed=7):
    """params + scale * N(0, 1) noise on every leaf (host-side), so zero-initialised layers come alive."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params
    )


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its parameters (real init, jitted) and a jitted apply.

    The init key uses the "rbg" PRNG: compiling an init with threefry keys takes ~4x longer on CPU."""
    cfg = unet_preset("tiny")
    model = UNet(cfg)
    x, t, text, mask = _inputs(cfg)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t, text, mask)
    apply = jax.jit(model.apply)
    return cfg, model, params, apply


# --------------------------------------------------------------------------------------------------
# Shapes and dtypes (abstract evaluation only: no compilation)
# --------------------------------------------------------------------------------------------------

SHAPE_CASES = {
    "tiny_f32": dict(),
    "tiny_bf16": dict(dtype="bfloat16"),
    "film_updown_pooled_labels": dict(
        use_scale_shift_norm=True, resblock_updown=True, pooled_dim=12, num_classes=10, out_channels=6,
        channel_mult=(1, 2, 2), attention_levels=(0, 2), transformer_depth=2,
    ),
    "head_dim_remat_bf16": dict(num_heads=None, head_dim=4, dtype="bfloat16", remat=True),
    "ddpm_self_attention": dict(attention_type="self", context_dim=None),
    "no_context": dict(context_dim=None),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_output_shape_and_dtype(name):
    cfg = unet_preset("tiny", **SHAPE_CASES[name])
    model = UNet(cfg)
    x, t, text, mask = _inputs(cfg.replace(context_dim=cfg.context_dim or 8), size=8)
    kwargs = {}
    if cfg.pooled_dim:
        kwargs["pooled"] = jnp.ones((B, cfg.pooled_dim))
    if cfg.num_classes:
        kwargs["labels"] = jnp.array([1, 7])
    if cfg.context_dim is None:
        text = mask = None

    def run(key):
        variables = model.init(key, x, t, text, mask, **kwargs)
        return variables, model.apply(variables, x, t, text, mask, train=False, **kwargs)

    variables, out = jax.eval_shape(run, jax.random.key(0))
    assert out.shape == (B, 8, 8, cfg.output_channels)
    assert out.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_init_without_text_builds_the_same_parameters():
    model = UNet(unet_preset("tiny"))
    x, t, text, mask = _inputs(model.config)
    with_text = jax.eval_shape(lambda k: model.init(k, x, t, text, mask), jax.random.key(0))
    without = jax.eval_shape(lambda k: model.init(k, x, t), jax.random.key(0))
    assert jax.tree_util.tree_structure(with_text) == jax.tree_util.tree_structure(without)
    assert count_params(with_text) == count_params(without)


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


def test_zero_output_at_init(tiny):
    cfg, model, params, apply = tiny
    x, t, text, mask = _inputs(cfg)
    out = apply(params, x, t, text, mask)
    assert out.shape == (B, H, H, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_output_depends_on_text_but_not_on_padding(tiny):
    cfg, model, params, apply = tiny
    params = _perturb(params)
    x, t, text, mask = _inputs(cfg)
    out = apply(params, x, t, text, mask)
    assert float(jnp.abs(out).max()) > 0.1

    # A different prompt (real tokens changed) changes the prediction of every sample.
    rng = np.random.default_rng(5)
    other = text.at[:, :2].set(jnp.asarray(rng.standard_normal((B, 2, cfg.context_dim), np.float32)))
    diff = jnp.abs(apply(params, x, t, other, mask) - out).max(axis=(1, 2, 3))
    assert float(diff.min()) > 1e-3

    # Anything in the padded positions (beyond the mask) leaves the prediction unchanged.
    garbage = np.asarray(text).copy()
    garbage[~np.asarray(mask)] = 1e3 * rng.standard_normal((int((~mask).sum()), cfg.context_dim))
    np.testing.assert_allclose(apply(params, x, t, jnp.asarray(garbage), mask), out, rtol=0, atol=1e-5)


def test_no_real_tokens_equals_no_text_and_is_finite(tiny):
    cfg, model, params, apply = tiny
    params = _perturb(params)
    x, t, text, mask = _inputs(cfg)
    empty = apply(params, x, t, text, jnp.zeros_like(mask))
    assert bool(jnp.isfinite(empty).all())
    uncond = jax.jit(lambda p: model.apply(p, x, t))(params)
    np.testing.assert_allclose(empty, uncond, rtol=0, atol=1e-5)
    # Only the empty row is affected: sample 0 keeps its text, sample 1 has none.
    half = apply(params, x, t, text, mask.at[1].set(False))
    full = apply(params, x, t, text, mask)
    np.testing.assert_allclose(half[0], full[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(half[1], uncond[1], rtol=0, atol=1e-5)


def test_attention_implementations_agree(tiny):
    # auto (= "einsum" on CPU) against jax.nn.dot_product_attention's XLA path, with a padded row and an
    # empty row: same values, no NaN.
    cfg, model, params, apply = tiny
    params = _perturb(params)
    x, t, text, mask = _inputs(cfg)
    mask = mask.at[1].set(False)
    out = apply(params, x, t, text, mask)
    out_dpa = jax.jit(UNet(cfg.replace(attention_impl="xla")).apply)(params, x, t, text, mask)
    assert bool(jnp.isfinite(out_dpa).all())
    np.testing.assert_allclose(out_dpa, out, rtol=1e-5, atol=1e-5)


def test_remat_gives_the_same_loss_and_gradients():
    # One level (res block + transformer, middle block, up path) keeps the two gradient compiles short;
    # parameters are random values in the abstract init's shapes (no init to compile).
    cfg = unet_preset("tiny", channel_mult=(1,), attention_levels=(0,), dropout=0.0)
    x, t, text, mask = _inputs(cfg, size=8)
    shapes = jax.eval_shape(lambda k: UNet(cfg).init(k, x, t, text, mask), jax.random.key(0))
    params = _perturb(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), scale=0.3)

    def loss_and_grads(c):
        def loss(p):
            return jnp.mean((UNet(c).apply(p, x, t, text, mask) - 0.5) ** 2)

        # Compiled as the Trainer compiles its step: on the CPU, remat's barriers kept (xla_cpu.compiler_options).
        options = xla_cpu.compiler_options(jax.default_backend())
        return jax.jit(jax.value_and_grad(loss), compiler_options=options)(params)

    loss, grads = loss_and_grads(cfg)
    loss_r, grads_r = loss_and_grads(cfg.replace(remat=True))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(grads_r)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-6)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads)) > 0


@pytest.mark.parametrize(
    "shape, kernel, padding",
    [
        ((3, 15, 9, 2, 4), (3, 3), ((1, 1), (1, 1))),  # 2 bands of 7 and 8 rows
        ((2, 29, 6, 3, 2), (5, 5), ((2, 2), (2, 2))),  # 4 bands, 5x5 kernel (4 halo rows per band)
        ((2, 16, 5, 2, 3), (3, 3), ((0, 2), (1, 0))),  # asymmetric padding: 16 output rows, 2 bands
        ((2, 17, 6, 2, 3), (5, 3), ((3, 1), (1, 1))),  # 5x3 kernel, more padding on top: 2 bands
        ((2, 20, 4, 2, 2), (4, 4), ((3, 1), (0, 0))),  # even kernel, 20 output rows of 20, 3 bands
    ],
)
def test_banded_conv_gives_xla_values_and_gradients(shape, kernel, padding):
    # The forward pass is XLA's convolution; both gradients match XLA's to float32 rounding.
    b, h, w, c, d = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, h, w, c), np.float32))
    k = jnp.asarray(rng.standard_normal((*kernel, c, d), np.float32))

    def xla(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out, vjp = jax.vjp(xla, x, k)
    out_b, vjp_b = jax.vjp(lambda x, k: banded_conv(x, k, padding), x, k)
    g = jnp.asarray(rng.standard_normal(out.shape, np.float32))
    np.testing.assert_array_equal(out_b, out)
    for got, want in zip(vjp_b(g), vjp(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_implementations_give_the_same_gradients(monkeypatch):
    # The U-Net with banded weight gradients against XLA's own: one 16x16 level (two bands).
    cfg = unet_preset("tiny", channel_mult=(1,), attention_levels=(), mid_attention=False, dropout=0.0)
    x, t, _, _ = _inputs(cfg)
    shapes = jax.eval_shape(lambda k: UNet(cfg).init(k, x, t), jax.random.key(0))
    params = _perturb(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), scale=0.3)

    def grads(impl):
        def loss(p):
            return jnp.mean((UNet(cfg.replace(conv_impl=impl)).apply(p, x, t) - 0.5) ** 2)

        return jax.jit(jax.grad(loss))(params)

    for g_b, g_x in zip(jax.tree_util.tree_leaves(grads("banded")), jax.tree_util.tree_leaves(grads("xla"))):
        np.testing.assert_allclose(g_b, g_x, rtol=1e-5, atol=1e-6)

    # ... and each implementation is the one at work: the 12 3x3 stride-1 convolutions (conv_in, 2 per res
    # block, conv_out) go through banded_conv's custom VJP, the 1x1 skips and "xla" do not.
    def vjp_calls(impl):
        c = cfg.replace(conv_impl=impl)
        return str(jax.make_jaxpr(lambda p: UNet(c).apply(p, x, t))(params)).count("custom_vjp_call")

    assert (vjp_calls("banded"), vjp_calls("xla")) == (12, 0)
    # auto: the bands with XLA:CPU's default (YNNPACK) convolutions, XLA's own with diffjax.xla_cpu's flag.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert vjp_calls(None) == 12
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {xla_cpu.FLAG}")
    assert vjp_calls(None) == 0


def test_bfloat16_compute_is_close_to_float32(tiny):
    # Measured on CPU (tiny preset, three noise seeds): max |bf16 - f32| / max |f32| = 1.1-1.5%, mean
    # |bf16 - f32| / max |f32| = 0.23-0.30% (bfloat16 has 8 significant bits, eps 2**-8 = 0.4%, and the
    # errors of ~20 layers accumulate). Bounds: 5% at the worst element, 1% on average.
    cfg, model, params, apply = tiny
    params = _perturb(params)
    x, t, text, mask = _inputs(cfg)
    ref = apply(params, x, t, text, mask)
    out = jax.jit(UNet(cfg.replace(dtype="bfloat16")).apply)(params, x, t, text, mask)
    assert out.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(out - ref).max()) < 0.05 * scale
    assert float(jnp.abs(out - ref).mean()) < 0.01 * scale


def test_dropout_is_active_only_in_training(tiny):
    cfg, model, params, apply = tiny
    params = _perturb(params)
    x, t, text, mask = _inputs(cfg)
    eval_out = apply(params, x, t, text, mask)  # train=False: dropout is the identity
    train = jax.jit(lambda p, k: UNet(cfg.replace(dropout=0.5)).apply(
        p, x, t, text, mask, train=True, rngs={"dropout": k}))
    a, b = train(params, jax.random.key(1, impl="rbg")), train(params, jax.random.key(2, impl="rbg"))
    assert float(jnp.abs(a - eval_out).max()) > 1e-3
    assert float(jnp.abs(a - b).max()) > 1e-3


@pytest.mark.parametrize("shape, groups", [((2, 6, 5, 12), 4), ((3, 7, 8), 8)])
def test_group_norm_matches_the_definition_and_flax(shape, groups):
    """Each sample's and group's positions and channels normalised to mean 0, variance 1, then scaled and
    shifted per channel (Wu & He 2018), on inputs far from zero mean (the one-pass variance's weak spot);
    the same numbers as flax.linen.GroupNorm, and ``act`` is SiLU of them."""
    import flax.linen as nn

    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32) * 3.0 + 5.0
    c = shape[-1]
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    y = np.asarray(GroupNorm(groups).apply(params, jnp.asarray(x)))
    xg = x.reshape(shape[0], -1, groups, c // groups).astype(np.float64)
    mean, var = xg.mean(axis=(1, 3), keepdims=True), xg.var(axis=(1, 3), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(shape) * scale + bias
    np.testing.assert_allclose(y, want, atol=2e-4, rtol=1e-4)
    flax_y = nn.GroupNorm(num_groups=groups, epsilon=1e-5).apply(params, jnp.asarray(x))
    np.testing.assert_allclose(y, np.asarray(flax_y), atol=2e-4, rtol=1e-4)
    act = np.asarray(GroupNorm(groups, act=True).apply(params, jnp.asarray(x)))
    np.testing.assert_allclose(act, want / (1 + np.exp(-want)), atol=2e-4, rtol=1e-4)


def test_timestep_embedding_matches_closed_form():
    t = np.array([0.0, 1.0, 10.5, 999.0])
    dim = 10
    half = dim // 2
    # DDPM: [sin, cos] with log(10000)/(half-1); SD/ADM: [cos, sin] with log(10000)/half.
    w_ddpm = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    w_sd = np.exp(-math.log(10000.0) * np.arange(half) / half)
    ddpm = np.concatenate([np.sin(t[:, None] * w_ddpm), np.cos(t[:, None] * w_ddpm)], axis=1)
    sd = np.concatenate([np.cos(t[:, None] * w_sd), np.sin(t[:, None] * w_sd)], axis=1)
    np.testing.assert_allclose(
        timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=1.0), ddpm, rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(timestep_embedding(t, dim), sd, rtol=1e-5, atol=1e-4)
    assert timestep_embedding(t, 7).shape == (4, 7)


# --------------------------------------------------------------------------------------------------
# Parameter counts (eval_shape of init: no memory, no compilation)
# --------------------------------------------------------------------------------------------------


def _abstract_count(cfg, size=32):
    model = UNet(cfg)
    return count_params(jax.eval_shape(lambda k: model.init_params(k, size), jax.random.key(0)))


def test_ddpm_cifar10_preset_is_within_5_percent_of_35_7m():
    n = _abstract_count(unet_preset("ddpm_cifar10"))
    assert abs(n - 35.7e6) / 35.7e6 < 0.05, n
    # With DDPM's own single-head self-attention blocks the count is DDPM's exactly (35,746,307).
    ddpm = unet_preset("ddpm_cifar10", attention_type="self", num_heads=1, head_dim=None, context_dim=None)
    assert _abstract_count(ddpm) == 35_746_307


def test_sd_preset_has_stable_diffusion_v1_size():
    assert _abstract_count(unet_preset("sd"), 64) == 859_520_964  # the SD v1 U-Net's parameter count


def test_tiny_preset_is_tiny():
    assert 10_000 < _abstract_count(unet_preset("tiny"), 16) < 100_000


# --------------------------------------------------------------------------------------------------
# Errors: one clear ValueError each
# --------------------------------------------------------------------------------------------------


def _trace(cfg, x, text=None, mask=None):
    model = UNet(cfg)
    return jax.eval_shape(lambda k: model.init(k, x, jnp.zeros((x.shape[0],)), text, mask), jax.random.key(0))


def test_indivisible_image_size_raises():
    cfg = unet_preset("tiny", channel_mult=(1, 2, 2))  # 3 levels: factor 4
    with pytest.raises(ValueError, match=r"image size 18x18 is not divisible by 2\*\*\(num_levels-1\) = 4"):
        _trace(cfg, jnp.zeros((B, 18, 18, 3)))


def test_wrong_text_width_raises():
    cfg = unet_preset("tiny")
    with pytest.raises(ValueError, match=r"text_states last dim 24 != config.context_dim 32"):
        _trace(cfg, jnp.zeros((B, 8, 8, 3)), jnp.zeros((B, L, 24)), jnp.ones((B, L)))


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"unknown U-Net preset 'huge'; valid presets: tiny, small"):
        unet_preset("huge")
    with pytest.raises(ValueError, match="ddpm_cifar10"):
        UNetConfig.preset("nope")
    assert set(PRESETS) == {"tiny", "small", "ddpm_cifar10", "sd"}


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(attention_levels=(5,)), "attention_levels"),
        (dict(num_heads=3, head_dim=None), "num_heads 3 does not divide"),
        (dict(norm_groups=3), "norm_groups 3 does not divide"),
        (dict(dtype="int32"), "dtype"),
        (dict(conv_impl="im2col"), "conv_impl 'im2col' not one of"),
    ],
)
def test_bad_config_raises(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        unet_preset("tiny", **changes)


def test_banded_conv_input_gradient_in_a_scan_is_a_plain_convolution():
    # A sampler's lax.scan that takes ∇_x at every step (alignment guidance): XLA:CPU folds the transpose of a
    # transposed convolution's kernel into its dimension labels (01oi) inside a while loop and lowers it to a
    # generic convolution ~40x slower; banded_conv writes ∂L/∂x as a forward convolution (HWIO) instead.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 4), np.float32))

    def steps(conv):
        grad = jax.grad(lambda x: jnp.sum(conv(x, k) ** 2))
        return jax.jit(lambda x: jax.lax.scan(lambda x, _: (x - 1e-3 * grad(x), None), x, None, length=3)[0])

    xla = steps(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))
    banded = steps(lambda x, k: banded_conv(x, k, ((1, 1), (1, 1))))
    np.testing.assert_allclose(banded(x), xla(x), rtol=1e-5, atol=1e-5)
    generic = lambda f: sum(" convolution(" in l and "_01oi->" in l for l in f.lower(x).compile().as_text().splitlines())  # noqa: E731
    if jax.default_backend() == "cpu":
        assert generic(xla) >= 1  # the XLA behaviour this works around (if this fails, XLA has changed)
    assert generic(banded) == 0
