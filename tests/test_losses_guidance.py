import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import guidance, losses, schedules

SCHED = schedules.get_schedule("cosine", 1000)
X0 = jax.random.uniform(jax.random.key(0), (6, 4, 4, 3), minval=-1, maxval=1)


def perfect(prediction_type):
    """A model that knows x0 exactly and answers in the given parameterisation."""

    def model_fn(x_t, t, cond):
        a, s = schedules.alpha_sigma(SCHED, t, x_t.ndim)
        eps = (x_t - a * X0) / s
        return schedules.prediction_target(X0, eps, a, s, prediction_type)

    return model_fn


@pytest.mark.parametrize("pt", ["eps", "x0", "v"])
def test_perfect_model_has_zero_loss_and_zero_model_has_known_loss(pt):
    out = losses.diffusion_loss(jax.random.key(1), perfect(pt), SCHED, X0, prediction_type=pt)
    assert float(out.loss) < 1e-8
    # A zero output: the mse is the mean square of the target, known in closed form per example.
    t = jnp.array([0, 10, 200, 500, 900, 999])
    noise = jax.random.normal(jax.random.key(2), X0.shape)
    zero = lambda x, t, c: jnp.zeros_like(x)  # noqa: E731
    out = losses.diffusion_loss(jax.random.key(1), zero, SCHED, X0, prediction_type=pt, t=t, noise=noise)
    a, s = schedules.alpha_sigma(SCHED, t, 4)
    target = {"eps": noise, "x0": X0, "v": a * noise - s * X0}[pt]
    np.testing.assert_allclose(out.mse, jnp.mean(target**2, axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(out.t, t)


def test_weightings_closed_forms():
    snr = jnp.array([0.0, 0.1, 1.0, 5.0, 20.0, 1e4])
    g = 5.0
    np.testing.assert_allclose(losses.loss_weight(snr, "x0", "min_snr", min_snr_gamma=g), np.minimum(snr, g))
    np.testing.assert_allclose(losses.loss_weight(snr, "eps", "min_snr", min_snr_gamma=g),
                               [1.0, 1.0, 1.0, 1.0, g / 20.0, g / 1e4], rtol=1e-6)
    np.testing.assert_allclose(losses.loss_weight(snr, "v", "min_snr", min_snr_gamma=g), np.minimum(snr, g) / (snr + 1),
                               rtol=1e-6)
    np.testing.assert_allclose(losses.loss_weight(snr, "eps", "p2", p2_gamma=1.0, p2_k=1.0), 1 / (1 + snr), rtol=1e-6)
    np.testing.assert_array_equal(losses.loss_weight(snr, "v", "none"), 1.0)


def test_weightings_are_parameterisation_invariant():
    """The same imperfect model, trained under eps/x0/v with min-SNR or P2, must get the same weighted loss:
    the weights convert through ‖ε-ε̂‖² = SNR ‖x0-x̂0‖² and ‖v-v̂‖² = (1+SNR) ‖x0-x̂0‖²."""
    x0_hat = lambda x_t, t: 0.8 * X0 + 0.05  # noqa: E731  a fixed, imperfect x0 estimate
    t = jnp.array([1, 50, 300, 600, 900, 990])
    noise = jax.random.normal(jax.random.key(3), X0.shape)

    def model(pt):
        def fn(x_t, t, cond):
            a, s = schedules.alpha_sigma(SCHED, t, x_t.ndim)
            x0 = x0_hat(x_t, t)
            return schedules.prediction_target(x0, (x_t - a * x0) / s, a, s, pt)

        return fn

    for weighting in ("min_snr", "p2"):
        vals = [float(losses.diffusion_loss(jax.random.key(0), model(pt), SCHED, X0, prediction_type=pt,
                                            weighting=weighting, t=t, noise=noise).loss) for pt in ("eps", "x0", "v")]
        np.testing.assert_allclose(vals, vals[0], rtol=2e-3)


def test_condition_dropout_rate_and_content():
    b = 4000
    cond = {"states": jnp.ones((b, 3, 2)), "mask": jnp.ones((b, 3), bool)}
    uncond = {"states": jnp.zeros((1, 3, 2)), "mask": jnp.zeros((1, 3), bool)}
    out = losses.drop_condition(jax.random.key(0), cond, uncond, 0.1)
    dropped = np.asarray(out["states"][:, 0, 0] == 0)
    assert dropped.mean() == pytest.approx(0.1, abs=0.015)
    np.testing.assert_array_equal(np.asarray(out["mask"][:, 0]), ~dropped)  # leaves dropped together
    assert np.all(np.asarray(out["states"])[~dropped] == 1)


def test_condition_dropout_reaches_model():
    seen = {}

    def model(x_t, t, cond):
        seen["cond"] = cond
        return jnp.zeros_like(x_t)

    cond = jnp.ones((X0.shape[0], 2))
    losses.diffusion_loss(jax.random.key(0), model, SCHED, X0, cond, uncond=jnp.zeros((1, 2)), cond_drop_prob=1.0)
    np.testing.assert_array_equal(seen["cond"], 0.0)
    losses.diffusion_loss(jax.random.key(0), model, SCHED, X0, cond, uncond=jnp.zeros((1, 2)), cond_drop_prob=0.0)
    np.testing.assert_array_equal(seen["cond"], 1.0)


def test_loss_is_differentiable_and_jittable():
    def model(params, x_t, t, cond):
        return params["w"] * x_t

    def loss(params, rng):
        return losses.diffusion_loss(rng, lambda x, t, c: model(params, x, t, c), SCHED, X0,
                                     prediction_type="v", weighting="min_snr").loss

    g = jax.jit(jax.grad(loss))({"w": jnp.array(0.3)}, jax.random.key(0))
    assert np.isfinite(float(g["w"])) and float(g["w"]) != 0.0


def test_loss_bad_input():
    zero = lambda x, t, c: jnp.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        losses.diffusion_loss(jax.random.key(0), zero, SCHED, X0, prediction_type="noise")
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        losses.diffusion_loss(jax.random.key(0), zero, SCHED, X0, weighting="snr")
    with pytest.raises(ValueError, match="needs the unconditional conditioning"):
        losses.diffusion_loss(jax.random.key(0), zero, SCHED, X0, jnp.ones((6, 2)), cond_drop_prob=0.1)
    with pytest.raises(ValueError, match="model output shape"):
        losses.diffusion_loss(jax.random.key(0), lambda x, t, c: x[..., :1], SCHED, X0)
    with pytest.raises(ValueError, match="timestep out of range"):
        losses.diffusion_loss(jax.random.key(0), zero, SCHED, X0, t=jnp.full((6,), 1000))


# ---------------------------------------------------------------- guidance


def _denoiser(x, t, cond):
    return jnp.tanh(x) * cond["scale"].reshape(-1, 1, 1, 1) + cond["shift"].reshape(-1, 1, 1, 1)


COND = {"scale": jnp.array([1.0, 2.0, 3.0]), "shift": jnp.array([0.5, -0.5, 0.1])}
UNCOND = {"scale": jnp.ones(3), "shift": jnp.zeros(3)}
X = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
T = jnp.full((3,), 500.0)


def test_cfg_formula_and_single_batched_call():
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return _denoiser(x, t, c)

    w = 4.0
    out = guidance.classifier_free_guidance(counting, COND, UNCOND, w)(X, T)
    assert calls == [6]  # one network call on the doubled batch
    cond, unc = _denoiser(X, T, COND), _denoiser(X, T, UNCOND)
    np.testing.assert_allclose(out, unc + w * (cond - unc), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(guidance.classifier_free_guidance(_denoiser, COND, UNCOND, 1.0)(X, T), cond,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(guidance.classifier_free_guidance(_denoiser, COND, UNCOND, 0.0)(X, T), unc,
                               rtol=1e-6, atol=1e-6)


def test_guidance_rescale():
    cond, unc = _denoiser(X, T, COND), _denoiser(X, T, UNCOND)
    guided = unc + 7.0 * (cond - unc)
    full = guidance.cfg_combine(unc, cond, 7.0, guidance_rescale=1.0)
    # φ = 1: per-sample std equals the conditional prediction's.
    np.testing.assert_allclose(jnp.std(full, axis=(1, 2, 3)), jnp.std(cond, axis=(1, 2, 3)), rtol=1e-5)
    half = guidance.cfg_combine(unc, cond, 7.0, guidance_rescale=0.7)
    np.testing.assert_allclose(half, 0.7 * full + 0.3 * guided, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(guidance.cfg_combine(unc, cond, 7.0, 0.0), guided, rtol=1e-6)


def test_guidance_schedules_have_mean_w_and_the_interval_switches_guidance_off_outside_it():
    from diffjax import schedules

    sched = schedules.get_schedule("linear", 1000)
    t = jnp.arange(1000.0)
    w = 4.0
    const = guidance.guidance_scale_fn(w, sched)(t)
    np.testing.assert_array_equal(const, np.full(1000, w, np.float32))
    for name, at_data in (("linear", 1 + 2 * (w - 1)), ("cosine", 1 + 2 * (w - 1))):
        ws = np.asarray(guidance.guidance_scale_fn(w, sched, name)(t))
        np.testing.assert_allclose(ws.mean(), w, rtol=1e-5)  # the same guidance on average over t
        np.testing.assert_allclose([ws[0], ws[-1]], [at_data, 1.0], rtol=1e-5, atol=1e-5)  # strongest at the data
        assert np.all(np.diff(ws) <= 1e-6)  # growing as the noise falls
    sigma = np.asarray(sched.sigmas)
    lo, hi = 0.3, 5.0
    inside = (sigma > lo) & (sigma <= hi)
    assert 0 < inside.sum() < 1000
    ws = np.asarray(guidance.guidance_scale_fn(w, sched, interval=(lo, hi))(t))
    np.testing.assert_array_equal(ws, np.where(inside, w, 1.0).astype(np.float32))
    # Fractional t (Karras grids): σ interpolated between timesteps, as the samplers do.
    tf = jnp.asarray([np.argmax(sigma > hi) - 0.5])
    s_tf = np.interp(tf, np.arange(1000), sigma)
    assert guidance.guidance_scale_fn(w, sched, interval=(lo, float(s_tf[0]) - 1e-4))(tf)[0] == 1.0
    assert guidance.guidance_scale_fn(w, sched, interval=(lo, float(s_tf[0]) + 1e-4))(tf)[0] == w
    with pytest.raises(ValueError, match="guidance_schedule must be one of"):
        guidance.guidance_scale_fn(w, sched, "exponential")


def test_cfg_with_a_per_example_scale():
    cond, unc = _denoiser(X, T, COND), _denoiser(X, T, UNCOND)
    per_example = jnp.asarray([0.0, 1.0, 3.0])
    out = guidance.classifier_free_guidance(_denoiser, COND, UNCOND, 99.0, scale_fn=lambda t: per_example)(X, T)
    np.testing.assert_allclose(out, unc + per_example[:, None, None, None] * (cond - unc), rtol=1e-6, atol=1e-6)


def test_cfg_outside_the_interval_runs_the_conditional_branch_alone():
    cond, unc = _denoiser(X, T, COND), _denoiser(X, T, UNCOND)
    for w, want in ((1.0, cond), (3.0, unc + 3.0 * (cond - unc))):
        fn = guidance.classifier_free_guidance(_denoiser, COND, UNCOND, w, scale_fn=lambda t, w=w: jnp.full(3, w),
                                               skip_unguided=True)
        np.testing.assert_allclose(jax.jit(fn)(X, T), want, rtol=1e-6, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(fn)(X, T))
    assert "cond[" in jaxpr  # one branch runs: the doubled batch only when some example is guided


def test_cfg_batch_mismatch_error():
    with pytest.raises(ValueError, match="cond leaves need a leading batch axis of size 2"):
        guidance.classifier_free_guidance(_denoiser, COND, UNCOND, 3.0)(X[:2], T[:2])


def test_clip_and_dynamic_threshold():
    x0 = jnp.stack([jnp.linspace(-3, 3, 1000), jnp.linspace(-0.5, 0.5, 1000)]).reshape(2, 10, 100)
    np.testing.assert_allclose(guidance.clip_x0(x0), jnp.clip(x0, -1, 1))
    out = guidance.dynamic_threshold(x0, percentile=0.9, max_value=10.0)
    s = np.quantile(np.abs(np.linspace(-3, 3, 1000)), 0.9)
    np.testing.assert_allclose(out[0], np.clip(np.asarray(x0[0]), -s, s) / s, rtol=1e-5)
    np.testing.assert_allclose(out[1], x0[1], rtol=1e-6)  # s = max(1, q) = 1: untouched inside [-1, 1]
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6
    capped = guidance.dynamic_threshold(x0, percentile=0.9, max_value=1.5)  # s capped at max_value
    np.testing.assert_allclose(capped[0], np.clip(np.asarray(x0[0]), -1.5, 1.5) / 1.5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Learned variance: the hybrid objective (Nichol & Dhariwal 2021) and its guidance.
# --------------------------------------------------------------------------------------------------


def test_vlb_term_closed_forms():
    t = jnp.array([0, 1, 10, 200, 500, 999])
    noise = jax.random.normal(jax.random.key(3), X0.shape)
    x_t = schedules.q_sample(SCHED, X0, t, noise)
    # The true mean and the true (clipped) posterior variance, f = 0 (v = -1): every KL term is zero.
    vlb = losses.vlb_term(SCHED, X0, x_t, t, X0, -jnp.ones_like(X0))
    np.testing.assert_allclose(vlb[1:], 0.0, atol=1e-6)
    # The true mean with another variance: KL = ½ (Δ - 1 + e^{-Δ}) / ln 2 per dimension, Δ the log-variance gap.
    v = jnp.full_like(X0, 0.4)
    vlb = losses.vlb_term(SCHED, X0, x_t, t, X0, v)
    _, _, min_log = schedules.q_posterior(SCHED, X0, x_t, t)
    max_log = jnp.log(SCHED.betas[t]).reshape(-1, 1, 1, 1)
    delta = (0.7 * max_log + 0.3 * min_log - min_log)[:, 0, 0, 0]
    np.testing.assert_allclose(vlb[1:], (0.5 * (delta - 1 + jnp.exp(-delta)) / np.log(2))[1:], rtol=1e-4, atol=1e-6)
    # At t = 0 the term is the discretised decoder NLL, positive.
    mean0, _, _ = schedules.q_posterior(SCHED, X0[:1], x_t[:1], t[:1])  # x0 up to the rounding of β_0 / (1 - ᾱ_0)
    log_scale = 0.5 * (0.7 * max_log[:1] + 0.3 * min_log[:1])
    nll = -jnp.mean(losses.discretized_gaussian_log_likelihood(X0[:1], mean0, log_scale)) / np.log(2)
    np.testing.assert_allclose(vlb[0], nll, rtol=1e-5)
    assert float(vlb[0]) > 0


def test_discretized_gaussian_likelihood_sums_to_one_over_the_256_values():
    values = jnp.linspace(-1.0, 1.0, 256)
    for mean, log_scale in ((0.1, -2.0), (-0.95, -4.0), (0.5, 0.3)):
        p = jnp.exp(losses.discretized_gaussian_log_likelihood(values, jnp.float32(mean), jnp.float32(log_scale)))
        np.testing.assert_allclose(float(jnp.sum(p)), 1.0, rtol=1e-5)


def test_hybrid_loss_trains_the_variance_only_through_the_vlb_term():
    t = jnp.array([0, 10, 200, 500, 900, 999])
    noise = jax.random.normal(jax.random.key(2), X0.shape)

    def loss(params, learned):
        def model_fn(x_t, t_, cond):
            pred = params["pred"] * x_t
            return jnp.concatenate([pred, jnp.broadcast_to(params["v"], x_t.shape)], -1) if learned else pred

        return losses.diffusion_loss(jax.random.key(1), model_fn, SCHED, X0, t=t, noise=noise,
                                     learned_variance=learned).loss

    params = {"pred": jnp.float32(0.3), "v": jnp.float32(0.2)}
    g_hybrid = jax.grad(loss)(params, True)
    g_simple = jax.grad(loss)(params, False)
    np.testing.assert_allclose(g_hybrid["pred"], g_simple["pred"], rtol=1e-6)  # stop-gradient on the mean
    assert abs(float(g_hybrid["v"])) > 0 and float(g_simple["v"]) == 0
    out = losses.diffusion_loss(jax.random.key(1), lambda x, t_, c: jnp.concatenate([x, x], -1), SCHED, X0, t=t,
                                noise=noise, learned_variance=True)
    np.testing.assert_allclose(out.loss, jnp.mean(out.weights * out.mse + out.vlb), rtol=1e-6)  # T/1000 = 1
    with pytest.raises(ValueError, match=r"a learned-variance model must output \(6, 4, 4, 6\)"):
        losses.diffusion_loss(jax.random.key(1), lambda x, t_, c: x, SCHED, X0, learned_variance=True)


def test_guidance_of_a_learned_variance_output_guides_the_prediction_channels_only():
    def denoiser(x, t, cond):
        return jnp.concatenate([x + cond, 2 * x - cond], -1)

    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 2))
    cond, uncond = jnp.full((2, 1, 1, 1), 1.0), jnp.zeros((2, 1, 1, 1))
    out = guidance.classifier_free_guidance(denoiser, cond, uncond, 4.0)(x, jnp.zeros(2))
    np.testing.assert_allclose(out[..., :2], x + 4.0, rtol=1e-6)  # uncond + 4 (cond - uncond)
    np.testing.assert_allclose(out[..., 2:], 2 * x - 1.0, rtol=1e-6)  # the conditional model's variance


def test_log_normal_timesteps_follow_edm_noise_levels():
    """ln σ(t) of the sampled timesteps ~ N(P_mean, P_std²) (up to the rounding to the schedule's timesteps);
    uniform sampling is the integer uniform of before."""
    from diffjax import losses, schedules

    sched = schedules.get_schedule("cosine", 1000)
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    t = jax.vmap(losses.timestep_sampler(sched, "log_normal", -1.2, 1.2))(keys)
    log_sigma = np.log(np.asarray(sched.sigmas))[np.asarray(t)]
    assert abs(log_sigma.mean() + 1.2) < 0.03 and abs(log_sigma.std() - 1.2) < 0.03
    uniform = jax.vmap(losses.timestep_sampler(sched))(keys)
    np.testing.assert_array_equal(uniform, jax.vmap(lambda k: jax.random.randint(k, (), 0, 1000))(keys))
    with pytest.raises(ValueError, match="timestep sampling 'beta': expected one of uniform, log_normal"):
        losses.timestep_sampler(sched, "beta")
