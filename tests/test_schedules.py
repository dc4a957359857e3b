import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import schedules as S


def test_linear_matches_ddpm_constants():
    s = S.get_schedule("linear", 1000)
    b = np.asarray(s.betas, np.float64)
    assert b[0] == pytest.approx(1e-4, rel=1e-6) and b[-1] == pytest.approx(0.02, rel=1e-6)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-3)
    # ᾱ_T for DDPM's schedule: ∏(1 - β) ≈ 4.04e-5 (Ho et al. 2020: "L_T ≈ 1e-5 bits/dim").
    assert float(s.alphas_cumprod[-1]) == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-5)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.035e-5, rel=1e-3)


def test_scaled_linear_is_linear_in_sqrt_beta():
    s = S.get_schedule("scaled_linear", 1000)
    sq = np.sqrt(np.asarray(s.betas, np.float64))
    assert sq[0] ** 2 == pytest.approx(0.00085, rel=1e-6) and sq[-1] ** 2 == pytest.approx(0.012, rel=1e-6)
    np.testing.assert_allclose(np.diff(sq), (0.012**0.5 - 0.00085**0.5) / 999, rtol=1e-3)


def test_cosine_closed_form():
    T, s_ = 1000, 0.008
    s = S.get_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 500, 900):  # away from the β ≤ 0.999 cap, ᾱ_t = f(t+1) / f(0)
        assert float(s.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert float(np.max(np.asarray(s.betas))) == pytest.approx(0.999, rel=1e-6)


def test_sigmoid_closed_form_and_monotone():
    T = 1000
    s = S.get_schedule("sigmoid", T, start=-3, end=3, tau=1.0)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g = lambda u: (sig(3) - sig(u * 6 - 3)) / (sig(3) - sig(-3))  # noqa: E731
    for t in (0, 100, 500, 800):
        assert float(s.alphas_cumprod[t]) == pytest.approx(g((t + 1) / T) / g(0), rel=1e-5)
    ab = np.asarray(s.alphas_cumprod)
    assert np.all(np.diff(ab) < 0)


@pytest.mark.parametrize("name", S.SCHEDULES)
@pytest.mark.parametrize("T", [10, 1000])
def test_schedules_valid_for_any_T(name, T):
    s = S.get_schedule(name, T)
    b, ab = np.asarray(s.betas), np.asarray(s.alphas_cumprod)
    assert b.shape == ab.shape == (T,) and b.dtype == np.float32
    assert np.all((b > 0) & (b <= 0.999 + 1e-6))
    # ᾱ is accumulated from the float64 betas; the float32-rounded betas reproduce it to 1e-4 after T steps.
    np.testing.assert_allclose(ab, np.cumprod(1 - b.astype(np.float64)), rtol=1e-4)
    assert np.all(np.diff(ab) < 0)


@pytest.mark.parametrize("name", S.SCHEDULES)
def test_zero_terminal_snr(name):
    base, z = S.get_schedule(name), S.get_schedule(name, rescale_to_zero_snr=True)
    assert float(z.alphas_cumprod[-1]) == 0.0 and float(z.betas[-1]) == pytest.approx(1.0)
    assert float(z.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-6)
    # √ᾱ is an affine function of the original √ᾱ (Lin et al. 2023, Alg. 1).
    x, y = np.sqrt(np.asarray(base.alphas_cumprod, np.float64)), np.sqrt(np.asarray(z.alphas_cumprod, np.float64))
    slope, icpt = np.polyfit(x, y, 1)
    np.testing.assert_allclose(slope * x + icpt, y, atol=1e-5)
    assert float(S.snr(z, 999)) == 0.0


def test_q_sample_marginal_moments():
    s = S.get_schedule("linear", 1000)
    n, x0_val = 200_000, 0.7
    for t in (0, 100, 500, 999):
        noise = jax.random.normal(jax.random.key(t), (n,))
        x_t = S.q_sample(s, jnp.full((n,), x0_val), jnp.full((n,), t), noise)
        ab = float(s.alphas_cumprod[t])
        se = math.sqrt((1 - ab) / n)
        assert float(jnp.mean(x_t)) == pytest.approx(math.sqrt(ab) * x0_val, abs=5 * se + 1e-6)
        assert float(jnp.var(x_t)) == pytest.approx(1 - ab, rel=0.02)


def test_q_sample_preserves_unit_variance_for_unit_data():
    s = S.get_schedule("cosine", 1000)
    x0 = jax.random.normal(jax.random.key(0), (4096, 8))
    t = jax.random.randint(jax.random.key(1), (4096,), 0, 1000)
    x_t = S.q_sample(s, x0, t, jax.random.normal(jax.random.key(2), x0.shape))
    assert float(jnp.var(x_t)) == pytest.approx(1.0, abs=0.02)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): check mean/variance against the product of
    Gaussians computed independently."""
    s = S.get_schedule("linear", 1000)
    x0, x_t = jnp.array([0.3, -1.2]), jnp.array([0.9, 0.1])
    for t in (1, 10, 500, 999):
        mean, var, log_var = S.q_posterior(s, x0, x_t, jnp.array([t, t]))
        beta, ab_prev = float(s.betas[t]), float(s.alphas_cumprod[t - 1])
        # prior N(√ᾱ_{t-1} x0, 1-ᾱ_{t-1}); likelihood of x_{t-1}: N(x_t/√α_t, β/α_t).
        a = 1 - beta
        prec = 1 / (1 - ab_prev) + a / beta
        exp_var = 1 / prec
        exp_mean = exp_var * (math.sqrt(ab_prev) * np.asarray(x0) / (1 - ab_prev) + math.sqrt(a) * np.asarray(x_t) / beta)
        np.testing.assert_allclose(np.asarray(mean), exp_mean, rtol=2e-4)
        np.testing.assert_allclose(np.asarray(var).ravel(), exp_var, rtol=2e-4)
        np.testing.assert_allclose(np.asarray(log_var).ravel(), np.log(exp_var), rtol=1e-4)
    _, var0, log_var0 = S.q_posterior(s, x0, x_t, jnp.array([0, 0]))
    assert float(var0[0]) == 0.0 and np.isfinite(np.asarray(log_var0)).all()


def test_snr_and_log_snr():
    s = S.get_schedule("linear", 1000)
    t = jnp.array([0, 10, 999])
    ab = np.asarray(s.alphas_cumprod)[[0, 10, 999]]
    np.testing.assert_allclose(np.asarray(S.snr(s, t)), ab / (1 - ab), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(S.log_snr(s, t)), np.log(ab / (1 - ab)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.sigmas)[[0, 10, 999]], np.sqrt((1 - ab) / ab), rtol=1e-5)


def test_sigmas_stay_finite_at_zero_terminal_snr():
    """σ_t = √((1 - ᾱ_t)/ᾱ_t) in float64, with ᾱ_{T-1} = 0 replaced by 2⁻²⁴ (σ_max = √(2²⁴ - 1) ≈ 4096)."""
    s = S.get_schedule("scaled_linear", 1000, rescale_to_zero_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0
    sig = s.sigmas
    assert sig.dtype == np.float64 and np.all(np.isfinite(sig)) and np.all(np.diff(sig) > 0)
    assert sig[-1] == np.sqrt(2.0**24 - 1)
    ab = np.asarray(s.alphas_cumprod, np.float64)[:-1]
    np.testing.assert_array_equal(sig[:-1], np.sqrt((1 - ab) / ab))


def test_prediction_conversions_round_trip():
    s = S.get_schedule("scaled_linear", 1000)
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k0, (5, 3, 3, 2))
    eps = jax.random.normal(k1, x0.shape)
    t = jax.random.randint(k2, (5,), 0, 1000)
    x_t = S.q_sample(s, x0, t, eps)
    v = S.get_v(s, x0, t, eps)
    tol = dict(rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(S.predict_x0_from_eps(s, x_t, t, eps), x0, **tol)
    np.testing.assert_allclose(S.predict_eps_from_x0(s, x_t, t, x0), eps, **tol)
    np.testing.assert_allclose(S.predict_x0_from_v(s, x_t, t, v), x0, **tol)
    np.testing.assert_allclose(S.predict_eps_from_v(s, x_t, t, v), eps, **tol)
    a, sg = S.alpha_sigma(s, t, x0.ndim)
    for p, pred in (("eps", eps), ("x0", x0), ("v", v)):
        np.testing.assert_allclose(S.x0_from_prediction(pred, x_t, a, sg, p), x0, **tol)
        np.testing.assert_allclose(S.eps_from_prediction(pred, x_t, a, sg, p), eps, **tol)
        np.testing.assert_allclose(S.prediction_target(x0, eps, a, sg, p), pred, **tol)
    # v has unit variance when x0 and ε do: α² + σ² = 1.
    assert float(jnp.var(S.get_v(s, jax.random.normal(k0, (20000,)), jnp.full((20000,), 500),
                                 jax.random.normal(k1, (20000,))))) == pytest.approx(1.0, abs=0.03)


def test_schedule_is_a_pytree_and_jits():
    s = S.get_schedule("linear", 100)
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 2
    f = jax.jit(lambda sch, x, t: S.q_sample(sch, x, t, jnp.zeros_like(x)))
    out = f(s, jnp.ones((2, 3)), jnp.array([0, 99]))
    np.testing.assert_allclose(out[:, 0], np.sqrt(np.asarray(s.alphas_cumprod)[[0, 99]]), rtol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'.*linear"):
        S.get_schedule("cosin")
    with pytest.raises(ValueError, match="num_timesteps must be a positive integer"):
        S.get_schedule("linear", 0)
    with pytest.raises(ValueError, match="bad option for noise schedule 'cosine'"):
        S.get_schedule("cosine", beta_start=0.1)
    s = S.get_schedule("linear", 100)
    with pytest.raises(ValueError, match=r"timestep out of range.*0\.\.99"):
        S.q_sample(s, jnp.ones((2,)), jnp.array([5, 100]), jnp.ones((2,)))
    with pytest.raises(ValueError, match="timestep out of range"):
        S.q_sample(s, jnp.ones((1,)), jnp.array([-1]), jnp.ones((1,)))
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        S.x0_from_prediction(jnp.ones(2), jnp.ones(2), 1.0, 0.0, "noise")
    assert S.canonical_prediction_type("v_prediction") == "v"
