"""Whole sampling runs compared with diffusers' PyTorch schedulers, step for step.

Both sides drive the same deterministic stand-in network (a smooth function of x and t written once in
torch and once in jax) and, for the stochastic samplers, the same noise; the final samples must agree to
1e-5 relative. Skipped when torch or diffusers is missing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffjax import guidance, samplers, schedules  # noqa: E402

T = 1000
SHAPE = (2, 4, 4, 3)
RTOL = 1e-5

# (diffjax schedule name, diffusers beta_schedule name)
SCHEDULES = [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def net_jax(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.5 * jnp.tanh(x * (1.0 + 0.2 * jnp.cos(t / 97.0))) + 0.05 * jnp.sin(t / 31.0)


def net_torch(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.5 * torch.tanh(x * (1.0 + 0.2 * torch.cos(t / 97.0))) + 0.05 * torch.sin(t / 31.0)


def x0_clip_net_jax(x, t):  # an x0 predictor whose outputs leave [-1, 1], to exercise clipping
    return 2.0 * net_jax(x, t)


def x0_clip_net_torch(x, t):
    return 2.0 * net_torch(x, t)


def _x_T():
    return jax.random.normal(jax.random.key(42), SHAPE, jnp.float32)


def _schedule(ours, **kw):
    return schedules.get_schedule(ours, T, **kw)


def _diffusers(cls, schedule, theirs, pt, **kw):
    # Feed diffusers the exact betas and ᾱ of our schedule, so the comparison isolates the sampler arithmetic
    # (ᾱ differs in the last float32 digits: diffusers accumulates it in float32, diffjax in float64).
    ref = cls(num_train_timesteps=T, trained_betas=np.asarray(schedule.betas, np.float64),
              beta_schedule=theirs, prediction_type=PRED[pt], **kw)
    ref.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))
    return ref


def _close(ours, theirs, rtol=RTOL):
    ours, theirs = np.asarray(ours), theirs.numpy()
    scale = np.max(np.abs(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale)


def _ve_rtol(sigmas):
    """diffusers takes Euler steps as x + (σ' - σ) d in float32, which cancels digits when σ ≫ σ': the first
    step from σ_max loses log10(σ_0/σ_1) of them (cosine: σ_max ≈ 2·10⁴, zero terminal SNR: 4096). diffjax
    uses the well-conditioned form (σ'/σ) x + (1 - σ'/σ) x̂0, so the reference itself is only that accurate."""
    sigmas = np.asarray(sigmas, np.float64)
    return max(RTOL, 8 * np.finfo(np.float32).eps * sigmas[0] / sigmas[1])


@pytest.mark.parametrize("ours,theirs", SCHEDULES)
def test_schedule_matches_diffusers(ours, theirs):
    s = _schedule(ours)
    betas = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(ours, {})  # SD's constants
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs, **betas)
    np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-9)


def test_zero_snr_rescale_matches_diffusers():
    s = _schedule("scaled_linear", rescale_to_zero_snr=True)
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, rescale_betas_zero_snr=True)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-8)
    assert float(s.alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacings_match_diffusers(spacing):
    for n in (1, 7, 10, 50, 999):
        ref = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=1 if
                                      spacing == "leading" else 0)
        ref.set_timesteps(n)
        ours = samplers.spaced_timesteps(T, n, spacing, steps_offset=1 if spacing == "leading" else 0)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy())
        dpm = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        if n + 1 <= T or spacing == "trailing":
            dpm.set_timesteps(n)
            ts, _ = samplers.dpm_solver_timesteps(_schedule("linear"), n, spacing)
            np.testing.assert_array_equal(ts, dpm.timesteps.numpy())


def _run_ddpm_reference(s, theirs, pt, spacing, n, variance_type, clip, rng, net, nchw=False):
    """diffusers' DDPMScheduler loop with diffjax's x_T and step noise; ``nchw``: the state and ``net`` in NCHW
    (diffusers splits a learned variance off axis 1), the result back in NHWC."""
    ref = _diffusers(diffusers.DDPMScheduler, s, theirs, pt, timestep_spacing=spacing, clip_sample=clip,
                     variance_type=variance_type)
    ref.set_timesteps(n)
    layout = (lambda a: a.permute(0, 3, 1, 2)) if nchw else (lambda a: a)
    x = layout(torch.from_numpy(np.array(_x_T())))
    noises = iter([layout(torch.from_numpy(np.array(samplers.step_noise(rng, i, SHAPE)))) for i in range(n)])
    import diffusers.schedulers.scheduling_ddpm as mod

    orig = mod.randn_tensor
    mod.randn_tensor = lambda *a, **k: next(noises)
    try:
        for t in ref.timesteps:
            x = ref.step(net(x, t), t, x).prev_sample
    finally:
        mod.randn_tensor = orig
    return x.permute(0, 2, 3, 1) if nchw else x


@pytest.mark.parametrize("ours,theirs,pt", [SCHEDULES[0] + ("eps",), SCHEDULES[1] + ("v",), SCHEDULES[2] + ("eps",)])
def test_ddpm_matches(ours, theirs, pt):
    s, rng, n = _schedule(ours), jax.random.key(7), 20
    for spacing, variance_type in [("leading", "fixed_small"), ("trailing", "fixed_large")]:
        ref = _run_ddpm_reference(s, theirs, pt, spacing, n, variance_type, False, rng, net_torch)
        out = samplers.sample(net_jax, _x_T(), s, "ddpm", n, rng=rng, prediction_type=pt,
                              timestep_spacing=spacing, variance_type=variance_type)
        _close(out, ref)


def test_ddpm_learned_range_variance_matches():
    """A learned-variance network (prediction and v ∈ [-1, 1], twice the channels): diffusers' DDPMScheduler
    with variance_type="learned_range" splits the channels on axis 1, so it runs on NCHW transposes."""
    s, rng, n = _schedule("linear"), jax.random.key(5), 20

    def var_jax(x, t):
        return jnp.concatenate([net_jax(x, t), jnp.tanh(0.7 * x + t.reshape(-1, 1, 1, 1) / 500.0 - 1.0)], -1)

    def var_torch_nchw(x, t):
        nhwc = x.permute(0, 2, 3, 1)
        v = torch.tanh(0.7 * nhwc + float(t) / 500.0 - 1.0)
        return torch.cat([net_torch(nhwc, t), v], -1).permute(0, 3, 1, 2)

    ref = _run_ddpm_reference(s, "linear", "eps", "leading", n, "learned_range", False, rng, var_torch_nchw, nchw=True)
    out = samplers.sample(var_jax, _x_T(), s, "ddpm", n, rng=rng, timestep_spacing="leading",
                          variance_type="learned_range")
    _close(out, ref)
    fixed = samplers.sample(net_jax, _x_T(), s, "ddpm", n, rng=rng, timestep_spacing="leading")
    assert float(jnp.abs(out - fixed).max()) > 1e-2  # the learned variance is really used


def test_ddpm_x0_prediction_with_clipping_matches():
    s, rng, n = _schedule("linear"), jax.random.key(3), 25
    ref = _run_ddpm_reference(s, "linear", "x0", "linspace", n, "fixed_small", True, rng, x0_clip_net_torch)
    out = samplers.sample(x0_clip_net_jax, _x_T(), s, "ddpm", n, rng=rng, prediction_type="x0",
                          timestep_spacing="linspace", denoised_fn=guidance.clip_x0)
    _close(out, ref)


# The cases cover every schedule, prediction type and option at least once, without the full product.
LIN, SCL, COS = SCHEDULES


@pytest.mark.parametrize("ours,theirs,pt,spacing,offset,eta", [
    LIN + ("eps", "leading", 1, 0.0), SCL + ("v", "trailing", 0, 0.0), COS + ("x0", "leading", 0, 0.7),
    LIN + ("v", "leading", 0, 0.7), COS + ("eps", "trailing", 0, 0.0), SCL + ("x0", "trailing", 0, 1.0)])
def test_ddim_matches(ours, theirs, pt, spacing, offset, eta):
    s, rng, n = _schedule(ours), jax.random.key(11), 25
    ref = _diffusers(diffusers.DDIMScheduler, s, theirs, pt, timestep_spacing=spacing, steps_offset=offset,
                     clip_sample=False)
    ref.set_timesteps(n)
    x = torch.from_numpy(np.asarray(_x_T()))
    for i, t in enumerate(ref.timesteps):
        noise = torch.from_numpy(np.asarray(samplers.step_noise(rng, i, SHAPE)))
        x = ref.step(net_torch(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
    out = samplers.sample(net_jax, _x_T(), s, "ddim", n, rng=rng, eta=eta, prediction_type=pt,
                          timestep_spacing=spacing, steps_offset=offset)
    _close(out, x)


def _run_ode_reference(ref, n, net, dtype=torch.float32):
    ref.set_timesteps(n)
    x = torch.from_numpy(np.asarray(_x_T())).to(dtype) * ref.init_noise_sigma
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)
        x = ref.step(net(x_in, t), t, x).prev_sample
    return x


def _close_ode(ours, make_ref, n):
    """Compare with diffusers' float32 run, to 1e-5 relative where float32 can resolve the problem. Where it
    cannot, diffusers' float32 and float64 runs differ by more than that, and diffjax must lie as close to
    the float64 run as diffusers' float32 run does (within 2×): at least as accurate as the reference."""
    ref = make_ref()
    r32 = _run_ode_reference(ref, n, net_torch)
    r64 = _run_ode_reference(make_ref(), n, net_torch, torch.float64).numpy()
    scale = np.max(np.abs(r64))
    ref_err = np.max(np.abs(r32.numpy() - r64)) / scale
    if ref_err < 0.1 * RTOL:
        _close(ours, r32, _ve_rtol(ref.sigmas))
    else:
        assert np.max(np.abs(np.asarray(ours) - r64)) / scale <= max(2 * ref_err, RTOL)


@pytest.mark.parametrize("ours,theirs,pt,spacing,karras", [
    LIN + ("eps", "linspace", False), SCL + ("v", "leading", False), COS + ("x0", "trailing", False),
    SCL + ("eps", "linspace", True), LIN + ("v", "trailing", True), COS + ("eps", "linspace", False),
    LIN + ("x0", "leading", True)])
def test_dpmpp_2m_matches(ours, theirs, pt, spacing, karras):
    s = _schedule(ours)
    for n in (8, 20):
        ref = _diffusers(diffusers.DPMSolverMultistepScheduler, s, theirs, pt, timestep_spacing=spacing,
                         algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                         use_karras_sigmas=karras)
        out = samplers.sample(net_jax, _x_T(), s, "dpmpp_2m", n, prediction_type=pt, timestep_spacing=spacing,
                              use_karras_sigmas=karras)
        _close(out, _run_ode_reference(ref, n, net_torch))


@pytest.mark.parametrize("name,cls", [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
@pytest.mark.parametrize("ours,theirs,pt,spacing,karras", [
    LIN + ("eps", "linspace", False), SCL + ("v", "leading", False), COS + ("v", "linspace", False),
    SCL + ("eps", "trailing", True), COS + ("eps", "linspace", True), LIN + ("v", "linspace", True)])
def test_euler_heun_match(name, cls, ours, theirs, pt, spacing, karras):
    s, n = _schedule(ours), 15
    out = samplers.sample(net_jax, _x_T(), s, name, n, prediction_type=pt, timestep_spacing=spacing,
                          use_karras_sigmas=karras)
    _close_ode(out, lambda: _diffusers(getattr(diffusers, cls), s, theirs, pt, timestep_spacing=spacing,
                                       use_karras_sigmas=karras), n)


def test_zero_terminal_snr_v_prediction_matches():
    s = _schedule("scaled_linear", rescale_to_zero_snr=True)
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                  beta_start=0.00085, beta_end=0.012,
                                  prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(10)
    x = torch.from_numpy(np.asarray(_x_T()))
    for t in ref.timesteps:
        x = ref.step(net_torch(x, t), t, x).prev_sample
    out = samplers.sample(net_jax, _x_T(), s, "ddim", 10, prediction_type="v", timestep_spacing="trailing")
    _close(out, x)
    ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012,
                                           rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                           timestep_spacing="trailing")
    x = _run_ode_reference(ref, 10, net_torch)
    out = samplers.sample(net_jax, _x_T(), s, "euler", 10, prediction_type="v", timestep_spacing="trailing",
                          use_karras_sigmas=False)
    _close(out, x, _ve_rtol(ref.sigmas))
