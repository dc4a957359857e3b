"""The KL autoencoder (diffjax.models.autoencoder): shapes, the posterior's closed forms, chunked decoding, the
preset sizes and bad input. Its agreement with diffusers' AutoencoderKL is in tests/test_diffusers_format.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.autoencoder import AutoencoderKL, DiagonalGaussian, decode_latents, encode_latents, vae_preset
from diffjax.models.layers import count_params


@pytest.fixture(scope="module")
def tiny():
    cfg = vae_preset("tiny", scaling_factor=0.5, shift_factor=0.1)
    vae = AutoencoderKL(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (5, 8, 12, 3)).astype(np.float32))
    shapes = jax.eval_shape(lambda k: vae.init(k, x)["params"], jax.random.key(0))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    return vae, params, x


def test_shapes_and_scaled_latents(tiny):
    vae, params, x = tiny
    posterior = vae.apply({"params": params}, x, method=vae.encode)
    assert posterior.mean.shape == posterior.logvar.shape == (5, 4, 6, 4)
    assert vae.config.downsample_factor == 2
    z = encode_latents(vae, params, x)
    np.testing.assert_allclose(z, (posterior.mean - 0.1) * 0.5, rtol=1e-6, atol=1e-6)
    decoded = decode_latents(vae, params, z)
    direct = vae.apply({"params": params}, posterior.mean, method=vae.decode)
    np.testing.assert_allclose(decoded, direct, rtol=1e-5, atol=1e-5)
    assert decoded.shape == x.shape and decoded.dtype == jnp.float32
    # Sampled latents: the mean plus std-scaled noise.
    sampled = encode_latents(vae, params, x, key=jax.random.key(3))
    assert float(jnp.abs(sampled - z).max()) > 0


def test_chunked_decoding_equals_whole_batch(tiny):
    vae, params, x = tiny
    z = encode_latents(vae, params, x)
    whole = decode_latents(vae, params, z)
    for chunk in (1, 2, 4):  # 5 examples: padded to a multiple of the chunk, the padding dropped
        np.testing.assert_allclose(decode_latents(vae, params, z, chunk=chunk), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encode_latents(vae, params, x, chunk=2), z, rtol=1e-5, atol=1e-5)


def test_posterior_closed_forms():
    mean = jnp.array([[[[0.5, -1.0]]]])
    logvar = jnp.array([[[[np.log(0.25), 50.0]]]])  # clipped to 20
    q = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
    assert float(q.logvar[..., 1].squeeze()) == 20.0
    np.testing.assert_allclose(q.std[..., 0], 0.5, rtol=1e-6)
    expect = 0.5 * (0.25 + 0.25 - 1 - np.log(0.25)) + 0.5 * (1.0 + np.exp(20.0) - 1 - 20.0)
    np.testing.assert_allclose(q.kl(), [expect], rtol=1e-6)
    samples = jax.vmap(lambda k: q.sample(k)[..., 0])(jax.random.split(jax.random.key(0), 20000))
    np.testing.assert_allclose([samples.mean(), samples.std()], [0.5, 0.5], atol=0.02)


def test_stable_diffusion_preset_has_its_size():
    cfg = vae_preset("sd")
    shapes = jax.eval_shape(lambda k: AutoencoderKL(cfg).init(k, jnp.zeros((1, 8, 8, 3)))["params"],
                            jax.random.key(0))
    assert count_params(shapes) == 83_653_863 and cfg.downsample_factor == 8 and cfg.scaling_factor == 0.18215


def test_bad_input_one_line(tiny):
    vae, params, _ = tiny
    with pytest.raises(ValueError, match="image size 7x8 is not divisible by the autoencoder's downsampling 2"):
        vae.apply({"params": params}, jnp.zeros((1, 7, 8, 3)), method=vae.encode)
    with pytest.raises(ValueError, match=r"the latent must be NHWC with 4 channels, got shape \(1, 4, 4, 3\)"):
        vae.apply({"params": params}, jnp.zeros((1, 4, 4, 3)), method=vae.decode)
    with pytest.raises(ValueError, match="unknown autoencoder preset 'sd9'"):
        vae_preset("sd9")
    with pytest.raises(ValueError, match=r"norm_num_groups 32 does not divide the widths \[8, 16\]"):
        vae_preset("tiny", norm_num_groups=32)
