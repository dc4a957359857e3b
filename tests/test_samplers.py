import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import guidance, samplers, schedules

SCHED = schedules.get_schedule("linear", 1000)
SHAPE = (3, 4, 4, 2)
X0 = jax.random.uniform(jax.random.key(5), SHAPE, minval=-1, maxval=1)


def _alpha_sigma_at(t, schedule=SCHED):
    """(α, σ) at possibly fractional t, as the VE samplers define it: σ_VE interpolated linearly in t."""
    sig = jnp.interp(t, jnp.arange(schedule.num_timesteps, dtype=jnp.float32),
                     jnp.asarray(schedule.sigmas, jnp.float32))
    a = jax.lax.rsqrt(sig**2 + 1)
    return a.reshape(-1, 1, 1, 1), (sig * a).reshape(-1, 1, 1, 1)


def oracle(x0, prediction_type):
    """The perfect model for data that is the single point x0: it knows x0 and returns the consistent ε/x0/v."""

    def model_fn(x_t, t):
        a, s = _alpha_sigma_at(t)
        eps = (x_t - a * x0) / s
        return schedules.prediction_target(x0, eps, a, s, prediction_type)

    return model_fn


def gaussian_denoiser(mu, std, prediction_type="eps"):
    """Exact posterior mean for data x0 ~ N(mu, std²): E[x0|x_t] = mu + α std² (x_t - α mu) / (α² std² + σ²)."""

    def model_fn(x_t, t):
        a, s = _alpha_sigma_at(t)
        x0 = mu + a * std**2 * (x_t - a * mu) / (a**2 * std**2 + s**2)
        eps = (x_t - a * x0) / s
        return schedules.prediction_target(x0, eps, a, s, prediction_type)

    return model_fn


ALL = list(samplers.SAMPLERS)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pt", ["eps", "x0", "v"])
def test_oracle_recovers_x0(name, pt):
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    out = samplers.sample(oracle(X0, pt), x_T, SCHED, name, 10, rng=jax.random.key(1), prediction_type=pt)
    np.testing.assert_allclose(out, X0, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_start_step_at_num_steps_returns_x0_init(name):
    """SDEdit with no step left to take (strength below 1/N): every sampler returns x0_init itself, the model
    never called."""

    def never_called(x_t, t):
        raise AssertionError("the model was called")

    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    out = samplers.sample(never_called, x_T, SCHED, name, 10, rng=jax.random.key(1), start_step=10, x0_init=X0)
    np.testing.assert_array_equal(out, X0)


@pytest.mark.parametrize("name,order", [("ddim", 1), ("euler", 1), ("dpmpp_2m", 2), ("heun", 2), ("ddpm", 1)])
def test_samples_converge_to_gaussian_data_distribution(name, order):
    """With the exact denoiser of x0 ~ N(mu, std²), the samples' std converges to std as the step count grows,
    at the rate of the method's order (a check on the whole trajectory, not just the last step)."""
    mu, std, n = 0.5, 0.3, 20000
    x_T = jax.random.normal(jax.random.key(2), (n, 1, 1, 1))
    errs = []
    for steps in (25, 100):
        out = samplers.sample(gaussian_denoiser(mu, std), x_T, SCHED, name, steps, rng=jax.random.key(3))
        assert float(jnp.mean(out)) == pytest.approx(mu, abs=0.01)
        errs.append(abs(float(jnp.std(out)) - std))
    # 100 steps: within 2% (second order), 5% (first order), 12% (DDPM, whose 'fixed_small' variance
    # under-disperses with skipped steps).
    assert errs[1] < {"ddpm": 0.12, 1: 0.05, 2: 0.02}.get(name, {1: 0.05, 2: 0.02}[order]) * std
    if order == 2:  # 4x the steps: error down by ~16x for a second-order method (4x for first order)
        assert errs[1] < errs[0] / 6
    elif name != "ddpm":  # ddpm's error is dominated by Monte Carlo noise at 100 steps
        assert errs[1] < errs[0] / 2.5


def test_ddim_eta0_deterministic_and_ddpm_reproducible():
    model = gaussian_denoiser(0.0, 0.5)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    a = samplers.sample(model, x_T, SCHED, "ddim", 10, rng=jax.random.key(1), eta=0.0)
    b = samplers.sample(model, x_T, SCHED, "ddim", 10, rng=jax.random.key(2), eta=0.0)
    np.testing.assert_array_equal(a, b)  # η = 0: the key is irrelevant
    c = samplers.sample(model, x_T, SCHED, "ddim", 10, rng=jax.random.key(2), eta=1.0)
    assert float(jnp.max(jnp.abs(c - a))) > 1e-2
    d1 = samplers.sample(model, x_T, SCHED, "ddpm", 10, rng=jax.random.key(7))
    d2 = samplers.sample(model, x_T, SCHED, "ddpm", 10, rng=jax.random.key(7))
    d3 = samplers.sample(model, x_T, SCHED, "ddpm", 10, rng=jax.random.key(8))
    np.testing.assert_array_equal(d1, d2)
    assert float(jnp.max(jnp.abs(d1 - d3))) > 1e-2


def test_ddim_eta1_equals_ddpm_posterior():
    """DDIM with η = 1 is DDPM ancestral sampling with the 'fixed_small' variance (Song et al. 2021, §4.1)."""
    model = gaussian_denoiser(0.2, 0.5)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    rng = jax.random.key(4)
    a = samplers.sample(model, x_T, SCHED, "ddim", 20, rng=rng, eta=1.0)
    b = samplers.sample(model, x_T, SCHED, "ddpm", 20, rng=rng, variance_type="fixed_small")
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_spacings():
    np.testing.assert_array_equal(samplers.spaced_timesteps(1000, 4, "leading"), [750, 500, 250, 0])
    np.testing.assert_array_equal(samplers.spaced_timesteps(1000, 4, "leading", steps_offset=1), [751, 501, 251, 1])
    np.testing.assert_array_equal(samplers.spaced_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
    np.testing.assert_array_equal(samplers.spaced_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(samplers.spaced_timesteps(10, 10, "trailing"), np.arange(9, -1, -1))
    s = samplers.karras_sigmas(0.002, 80.0, 5)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)
    # ρ = 7: σ^{1/7} is linear in the step index (Karras et al. 2022, eq. 5).
    np.testing.assert_allclose(np.diff(s ** (1 / 7)), np.diff(s ** (1 / 7))[0], rtol=1e-10)
    sig = SCHED.sigmas
    np.testing.assert_allclose(samplers.sigma_to_t(sig[[0, 10, 999]], sig), [0, 10, 999], atol=1e-9)


def test_denoised_fn_clips_x0():
    big = lambda x, t: jnp.full_like(x, 3.0)  # noqa: E731  an x0-predictor far outside [-1, 1]
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    for name in ALL:
        out = samplers.sample(big, x_T, SCHED, name, 5, rng=jax.random.key(0), prediction_type="x0",
                              denoised_fn=guidance.clip_x0)
        np.testing.assert_allclose(out, 1.0, atol=1e-5)


class CompileCounter:
    """Counts XLA backend compilations through jax.monitoring."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += duration


@contextlib.contextmanager
def count_compiles():
    c = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(c)
    try:
        yield c
    finally:
        jax.monitoring.unregister_event_duration_listener(c)


def _guided_sampler(name, num_steps):
    def denoiser(x, t, cond):  # a conditional stand-in network
        return 0.5 * jnp.tanh(x + cond.reshape(-1, 1, 1, 1)) + 0.01 * t.reshape(-1, 1, 1, 1) / 1000

    @jax.jit
    def run(x_T, rng, guidance_scale, eta, cond):
        model = guidance.classifier_free_guidance(denoiser, cond, jnp.zeros_like(cond), guidance_scale)
        opts = {"eta": eta} if name == "ddim" else {}
        return samplers.sample(model, x_T, SCHED, name, num_steps, rng=rng, **opts)

    return run


@pytest.mark.parametrize("name", ALL)
def test_sampler_compiles_once(name):
    run = _guided_sampler(name, 8)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    cond = jnp.arange(SHAPE[0], dtype=jnp.float32)
    with count_compiles() as c:
        first = run(x_T, jax.random.key(0), 3.0, 0.0, cond).block_until_ready()
    assert c.count >= 1
    keys, x_new, cond_new = [jax.random.key(0), jax.random.key(1)], x_T + 1.0, cond + 1.0
    with count_compiles() as c:  # (inputs made beforehand: eager ops compile too)
        outs = [run(x_T, keys[1], 3.0, 0.0, cond),  # new seed
                run(x_T, keys[0], 7.5, 0.0, cond),  # new guidance scale
                run(x_T, keys[0], 3.0, 0.5, cond),  # new η
                run(x_new, keys[0], 3.0, 0.0, cond_new)]  # new inputs
        jax.block_until_ready(outs)
    assert c.count == 0, f"{name} recompiled {c.count} times"
    assert float(jnp.max(jnp.abs(outs[1] - first))) > 0  # the guidance scale did reach the computation


def test_compile_time_independent_of_num_steps():
    """1000 steps compile like 10 (one scan body), not 100x longer as an unrolled loop would."""
    x_T, key, cond = jax.random.normal(jax.random.key(0), SHAPE), jax.random.key(0), jnp.zeros(SHAPE[0])
    times = {}
    for n in (10, 1000):
        run = _guided_sampler("ddim", n)
        with count_compiles() as c:
            start = time.perf_counter()
            run.lower(x_T, key, 3.0, 0.0, cond).compile()
            times[n] = time.perf_counter() - start
        assert c.count == 1
    assert times[1000] < 3 * times[10] + 1.0, times


def test_bad_input_errors():
    model = oracle(X0, "eps")
    x_T = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*ddim"):
        samplers.sample(model, x_T, SCHED, "dpm", 10)
    with pytest.raises(ValueError, match="num_steps=1001 exceeds the schedule's num_timesteps=1000"):
        samplers.sample(model, x_T, SCHED, "ddim", 1001)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        samplers.sample(model, x_T, SCHED, "euler", 0)
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon_'"):
        samplers.sample(model, x_T, SCHED, "ddim", 10, prediction_type="epsilon_")
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"):
        samplers.sample(model, x_T, SCHED, "ddim", 10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="sampler 'ddpm' needs an rng key"):
        samplers.sample(model, x_T, SCHED, "ddpm", 10)
    with pytest.raises(ValueError, match="sampler 'euler'.*unexpected keyword argument 'eta'"):
        samplers.sample(model, x_T, SCHED, "euler", 10, eta=0.5)
    with pytest.raises(ValueError, match="outside 0..999"):
        samplers.sample(model, x_T, SCHED, "ddim", 10, steps_offset=200)
