"""Samplers for discrete-time diffusion models, each one ``lax.scan`` over its steps.

Every sampler is a pure function

    sampler(model_fn, x_T, schedule, num_steps, *, rng, prediction_type, timestep_spacing, ...) -> x_0

where ``model_fn(x_t, t) -> prediction`` is the (guided) network on the variance-preserving scale the model
was trained on (x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε), ``t`` a float32 vector of timesteps (fractional for the Karras
σ samplers), and ``x_T`` standard normal noise. Everything that can change between calls without changing
shapes (the noise, ``rng``, η, values closed over by ``model_fn`` such as the guidance scale) is traced, so one
compiled program serves them all; ``num_steps`` and the choice of sampler fix the program.

Timesteps follow diffusers' conventions exactly (``timestep_spacing`` = ``leading``, ``trailing`` or
``linspace``, with ``steps_offset``), as do the per-sampler defaults, so that a diffusers run with the same
schedule and settings is reproduced step for step (the tests check this against diffusers' schedulers).
One deliberate difference: DDIM steps to the next timestep of the sequence, where diffusers' DDIMScheduler
steps to ``t - T // num_steps``; the two agree for ``leading`` and for ``trailing`` when num_steps divides T.

Scheduler arithmetic runs in float32 whatever dtype the network computes in.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import schedules as sch
from diffjax.schedules import NoiseSchedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
DenoisedFn = Optional[Callable[[Array], Array]]

SPACINGS = ("leading", "trailing", "linspace")

SAMPLERS: dict[str, Callable] = {}


def register_sampler(name: str):
    """Register a sampler under ``name`` for ``sample`` (score_sde style)."""

    def decorator(fn):
        SAMPLERS[name] = fn
        return fn

    return decorator


def get_sampler(name: str) -> Callable:
    """The sampler registered as ``name``; a one-line ValueError lists the valid names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


# --------------------------------------------------------------------------------------------------------
# Timesteps and noise levels (numpy, computed once at trace time).
# --------------------------------------------------------------------------------------------------------


def _check_num_steps(num_steps, num_timesteps: int) -> int:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the schedule's num_timesteps={num_timesteps}")
    return int(num_steps)


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0,
                     integer: bool = True) -> np.ndarray:
    """Descending timesteps for ``num_steps`` sampling steps, as diffusers' schedulers define them
    (Lin et al. 2023, Table 2, for ``trailing``):

        linspace:  round(linspace(0, T-1, N))                    (float, unrounded, when ``integer=False``)
        leading:   arange(N) · (T // N) + steps_offset
        trailing:  round(arange(T, 0, -T/N)) - 1

    Timesteps outside [0, T-1] (e.g. from a large ``steps_offset``) raise a ValueError.
    """
    num_steps = _check_num_steps(num_steps, num_timesteps)
    T, N = num_timesteps, num_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N, dtype=np.float64)[::-1]
        ts = ts.round() if integer else ts.astype(np.float32).astype(np.float64)
    elif spacing == "leading":
        ts = (np.arange(N) * (T // N)).round()[::-1].astype(np.float64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)) - 1.0
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    ts = np.ascontiguousarray(ts)
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"timestep_spacing={spacing!r} with steps_offset={steps_offset} gives timesteps "
                         f"outside 0..{T - 1}")
    return ts.astype(np.int64) if integer else ts


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: σ_i = (σ_max^{1/ρ} + i/(N-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ."""
    ramp = np.linspace(0, 1, num_steps)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def sigma_to_t(sigma: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep whose noise level is σ: linear interpolation of t in log σ over the schedule."""
    log_sigmas = np.log(sigmas)
    return np.interp(np.log(np.maximum(sigma, 1e-10)), log_sigmas, np.arange(len(sigmas), dtype=np.float64))


def _sigma_schedule(schedule: NoiseSchedule, num_steps: int, spacing: str, steps_offset: int,
                    use_karras_sigmas: bool, rho: float, integer_timesteps: bool):
    """(timesteps, σ) for the VE-form samplers, as diffusers' Euler, Heun and DPM-Solver schedulers pick them:
    σ interpolated at the spaced timesteps, or Karras σ between their ends and the timesteps mapped back."""
    all_sigmas = schedule.sigmas
    ts = spaced_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset, integer=integer_timesteps)
    sigmas = np.interp(ts.astype(np.float64), np.arange(len(all_sigmas)), all_sigmas)
    if use_karras_sigmas:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps, rho)
        ts = sigma_to_t(sigmas, all_sigmas)
    return ts, sigmas


def step_noise(rng: Array, step: Array, shape, dtype=jnp.float32) -> Array:
    """The Gaussian noise that a stochastic sampler adds at scan step ``step``: N(0, I) from
    ``fold_in(rng, step)``. Exposed so that tests can hand the same noise to a reference implementation."""
    return jax.random.normal(jax.random.fold_in(rng, step), shape, dtype)


def _call_model(model_fn: ModelFn, x: Array, t) -> Array:
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return model_fn(x, t).astype(jnp.float32)


def _denoise(x0: Array, denoised_fn: DenoisedFn) -> Array:
    return x0 if denoised_fn is None else denoised_fn(x0)


def _validate(model_fn, x_T, schedule, num_steps, prediction_type):
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable as model_fn(x_t, t), got {type(model_fn).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a diffjax NoiseSchedule, got {type(schedule).__name__}")
    if jnp.ndim(x_T) < 1:
        raise ValueError("x_T must have a leading batch axis")
    sch.canonical_prediction_type(prediction_type)
    return _check_num_steps(num_steps, schedule.num_timesteps)



# --------------------------------------------------------------------------------------------------------
# Starting part-way (image-to-image) and per-step hooks (inpainting), shared by every sampler.
# --------------------------------------------------------------------------------------------------------

PostStepFn = Optional[Callable[[Array, Array, Array, Array], Array]]


def _initial_state(x_T: Array, x0_init: Optional[Array], start_step: int, start_level, num_steps: int,
                   default_scale=1.0) -> Array:
    """The state a sampler starts from. From the first step: ``default_scale · x_T`` (x_T standard normal).
    From step k > 0 (SDEdit, Meng et al. 2022): ``x0_init`` forward-noised to the level of step k in the
    sampler's own state space, ``scale · x0_init + σ · x_T`` with (scale, σ) = ``start_level(k)``; from step
    k = ``num_steps`` (no step left to take): ``x0_init`` itself."""
    x_T = jnp.asarray(x_T, jnp.float32)
    if start_step == 0:
        return x_T * default_scale
    if x0_init is None:
        raise ValueError(f"start_step={start_step} needs x0_init, the image to start from")
    if jnp.shape(x0_init) != x_T.shape:
        raise ValueError(f"x0_init has shape {jnp.shape(x0_init)}, x_T has shape {x_T.shape}")
    if start_step == num_steps:
        return jnp.asarray(x0_init, jnp.float32)
    scale, sigma = start_level(start_step)
    return scale * jnp.asarray(x0_init, jnp.float32) + sigma * x_T


def _run_steps(body, carry, xs, levels, start_step: int, post_step: PostStepFn):
    """``lax.scan`` of ``body(carry, step_inputs) -> carry`` over the steps ``start_step..N-1``.

    ``levels`` = (scale, σ), each (N,): the state after step i is scale_i · x0 + σ_i · ε in the sampler's
    state space (VP for DDPM/DDIM/DPM-Solver++, VE with scale 1 for Euler/Heun). After each step
    ``post_step(x, scale_i, σ_i, i)`` may replace the state (inpainting: re-impose the known pixels at that
    noise level, Lugmayr et al. 2022)."""
    n = int(np.shape(levels[0])[0])
    if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step <= n:
        raise ValueError(f"start_step must be an integer in [0, num_steps={n}], got {start_step!r}")
    if start_step == n:
        return carry
    idx = jnp.arange(n)[start_step:]
    scale = jnp.asarray(levels[0], jnp.float32)[start_step:]
    sigma = jnp.asarray(levels[1], jnp.float32)[start_step:]
    xs = jax.tree_util.tree_map(lambda a: a[start_step:], xs)

    def step(c, inp):
        step_in, (i, sc, sg) = inp
        c = body(c, step_in)
        if post_step is not None:
            c = (post_step(c[0], sc, sg, i),) + tuple(c[1:]) if isinstance(c, tuple) else post_step(c, sc, sg, i)
        return c, None

    carry, _ = jax.lax.scan(step, carry, (xs, (idx, scale, sigma)))
    return carry


def _vp_levels(alphas_cumprod: Array) -> tuple[Array, Array]:
    ab = jnp.asarray(alphas_cumprod, jnp.float32)
    return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def _alphas_cumprod_at(schedule: NoiseSchedule, ts, final: float = 1.0) -> Array:
    """ᾱ at integer timesteps, with ᾱ_{-1} = ``final`` (after the last step)."""
    ts = jnp.asarray(ts, jnp.int32)
    return jnp.where(ts >= 0, schedule.alphas_cumprod[jnp.maximum(ts, 0)], final)


# --------------------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020), ancestral sampling on a subsequence of timesteps.
# --------------------------------------------------------------------------------------------------------


def ddpm_step(schedule: NoiseSchedule, x_t: Array, model_output: Array, t, t_prev, noise: Array, *,
              prediction_type: str = "eps", variance_type: str = "fixed_small",
              denoised_fn: DenoisedFn = None) -> Array:
    """One ancestral step x_t → x_{t'} (t' = ``t_prev`` < t, -1 after the last), the DDPM posterior between two
    timesteps of a subsequence (Ho et al. 2020, eqs. 6-7, with α_t replaced by ᾱ_t / ᾱ_{t'}):

        x̂0 = f(model_output),      β = 1 - ᾱ_t / ᾱ_{t'},
        μ = √ᾱ_{t'} β / (1 - ᾱ_t) · x̂0 + √(ᾱ_t / ᾱ_{t'}) (1 - ᾱ_{t'}) / (1 - ᾱ_t) · x_t,
        x_{t'} = μ + s ε,   s² = (1 - ᾱ_{t'}) / (1 - ᾱ_t) β  ("fixed_small")  or  β  ("fixed_large"),

    with no noise at t = 0 and ᾱ_{-1} = 1. With ``"learned_range"`` the model output has twice the channels of
    x_t (a learned-variance network such as ``DiTConfig(learn_sigma=True)``): the prediction, then v ∈ [-1, 1]
    with log s² = f log β + (1 - f) log β̃, f = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15; diffusers'
    ``variance_type="learned_range"``).
    """
    if variance_type == "learned_range":
        c = x_t.shape[-1]
        if model_output.shape[-1] != 2 * c:
            raise ValueError(f"variance_type 'learned_range' needs a model output of {2 * c} channels (prediction "
                             f"and variance), got {model_output.shape[-1]}")
        model_output, v = model_output[..., :c], model_output[..., c:]
    ab = schedule.alphas_cumprod
    ab_t = ab[t]
    ab_prev = jnp.where(t_prev >= 0, ab[jnp.maximum(t_prev, 0)], 1.0)
    alpha = ab_t / ab_prev
    beta = 1.0 - alpha
    x0 = sch.x0_from_prediction(model_output, x_t, jnp.sqrt(ab_t), jnp.sqrt(1.0 - ab_t), prediction_type)
    x0 = _denoise(x0, denoised_fn)
    mean = (jnp.sqrt(ab_prev) * beta / (1.0 - ab_t)) * x0 + (jnp.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t)) * x_t
    small = jnp.maximum((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20)
    if variance_type == "fixed_small":
        var = small
    elif variance_type == "fixed_large":
        var = beta
    elif variance_type == "learned_range":
        frac = (v + 1.0) / 2.0
        var = jnp.exp(frac * jnp.log(beta) + (1.0 - frac) * jnp.log(small))
    else:
        raise ValueError(f"unknown variance_type {variance_type!r}; expected 'fixed_small', 'fixed_large' or "
                         f"'learned_range'")
    return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise


def _prev_timesteps(ts: np.ndarray) -> np.ndarray:
    return np.concatenate([ts[1:], [-1]]).astype(np.int64)


@register_sampler("ddpm")
def ddpm(model_fn: ModelFn, x_T: Array, schedule: NoiseSchedule, num_steps: int, *, rng: Array,
         prediction_type: str = "eps", timestep_spacing: str = "leading", steps_offset: int = 0,
         variance_type: str = "fixed_small", denoised_fn: DenoisedFn = None, start_step: int = 0,
         x0_init: Optional[Array] = None, post_step: PostStepFn = None) -> Array:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over ``num_steps`` spaced timesteps; with
    ``num_steps == T`` it is the original sampler. Matches diffusers' DDPMScheduler (``clip_sample`` there is
    ``denoised_fn=guidance.clip_x0`` here). ``start_step``/``x0_init``/``post_step``: see ``sample``."""
    num_steps = _validate(model_fn, x_T, schedule, num_steps, prediction_type)
    ts = spaced_timesteps(schedule.num_timesteps, num_steps, timestep_spacing, steps_offset)
    prev = _prev_timesteps(ts)
    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32), jnp.arange(num_steps))

    def body(x, step):
        t, t_prev, i = step
        out = _call_model(model_fn, x, t)
        noise = step_noise(rng, i, x.shape)
        return ddpm_step(schedule, x, out, t, t_prev, noise, prediction_type=prediction_type,
                         variance_type=variance_type, denoised_fn=denoised_fn)

    x = _initial_state(x_T, x0_init, start_step, lambda k: _vp_levels(_alphas_cumprod_at(schedule, ts[k])),
                       num_steps)
    return _run_steps(body, x, xs, _vp_levels(_alphas_cumprod_at(schedule, prev)), start_step, post_step)


# --------------------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021).
# --------------------------------------------------------------------------------------------------------


def ddim_step(schedule: NoiseSchedule, x_t: Array, model_output: Array, t, t_prev, noise: Array, eta=0.0, *,
              prediction_type: str = "eps", denoised_fn: DenoisedFn = None,
              final_alpha_cumprod: float = 1.0) -> Array:
    """One DDIM step x_t → x_{t'} (Song et al. 2021, "Denoising Diffusion Implicit Models", eqs. 12 and 16):

        x_{t'} = √ᾱ_{t'} x̂0 + √(1 - ᾱ_{t'} - s²) ε̂ + s z,
        s = η √((1 - ᾱ_{t'}) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_{t'}),

    η = 0 is deterministic DDIM, η = 1 the DDPM posterior. After the last step ᾱ_{-1} = ``final_alpha_cumprod``
    (diffusers' ``set_alpha_to_one``). When ``denoised_fn`` alters x̂0, ε̂ is recomputed from it.
    """
    ab = schedule.alphas_cumprod
    ab_t = ab[t]
    ab_prev = jnp.where(t_prev >= 0, ab[jnp.maximum(t_prev, 0)], final_alpha_cumprod)
    a_t, s_t = jnp.sqrt(ab_t), jnp.sqrt(1.0 - ab_t)
    x0 = sch.x0_from_prediction(model_output, x_t, a_t, s_t, prediction_type)
    if denoised_fn is None:
        eps = sch.eps_from_prediction(model_output, x_t, a_t, s_t, prediction_type)
    else:
        x0 = denoised_fn(x0)
        eps = sch.eps_from_prediction(x0, x_t, a_t, s_t, "x0")
    var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    std = eta * jnp.sqrt(var)
    return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - std**2, 0.0)) * eps + std * noise


@register_sampler("ddim")
def ddim(model_fn: ModelFn, x_T: Array, schedule: NoiseSchedule, num_steps: int, *, rng: Optional[Array] = None,
         eta=0.0, prediction_type: str = "eps", timestep_spacing: str = "leading", steps_offset: int = 0,
         denoised_fn: DenoisedFn = None, final_alpha_cumprod: float = 1.0, start_step: int = 0,
         x0_init: Optional[Array] = None, post_step: PostStepFn = None) -> Array:
    """DDIM sampling (Song et al. 2021) with stochasticity η (a traced value: changing it does not recompile).
    ``rng`` is needed only when η may be non-zero. ``start_step``/``x0_init``/``post_step``: see ``sample``."""
    num_steps = _validate(model_fn, x_T, schedule, num_steps, prediction_type)
    ts = spaced_timesteps(schedule.num_timesteps, num_steps, timestep_spacing, steps_offset)
    prev = _prev_timesteps(ts)
    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32), jnp.arange(num_steps))
    eta = jnp.asarray(eta, jnp.float32)
    if rng is None:
        if not isinstance(eta, jax.core.Tracer) and float(eta) != 0.0:
            raise ValueError("ddim with eta > 0 needs an rng key")
        rng = jax.random.key(0)  # multiplied by a zero std: the result does not depend on it

    def body(x, step):
        t, t_prev, i = step
        out = _call_model(model_fn, x, t)
        noise = step_noise(rng, i, x.shape)
        return ddim_step(schedule, x, out, t, t_prev, noise, eta, prediction_type=prediction_type,
                         denoised_fn=denoised_fn, final_alpha_cumprod=final_alpha_cumprod)

    x = _initial_state(x_T, x0_init, start_step, lambda k: _vp_levels(_alphas_cumprod_at(schedule, ts[k])),
                       num_steps)
    levels = _vp_levels(_alphas_cumprod_at(schedule, prev, final_alpha_cumprod))
    return _run_steps(body, x, xs, levels, start_step, post_step)


# --------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022).
# --------------------------------------------------------------------------------------------------------


def _vp_from_ve(sigma):
    """(α, σ_vp, λ) for a VE noise level σ: α = 1/√(σ²+1), σ_vp = σ α, λ = log α - log σ_vp = -log σ."""
    alpha = jax.lax.rsqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha, -jnp.log(sigma)


def dpm_solver_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str = "linspace",
                         steps_offset: int = 0, use_karras_sigmas: bool = False, rho: float = 7.0,
                         final_sigma: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """Timesteps (N,) and VE noise levels (N+1,) as diffusers' DPMSolverMultistepScheduler picks them: for
    ``linspace`` and ``leading`` the first N of N+1 spaced timesteps; the last σ is 0 (``final_sigma="zero"``)
    or σ at t = 0 (``"sigma_min"``). With Karras σ the mapped-back timesteps are rounded (diffusers leaves
    them fractional for its cosine schedule only)."""
    T = schedule.num_timesteps
    num_steps = _check_num_steps(num_steps, T)
    if spacing in ("linspace", "leading"):
        if num_steps + 1 > T:
            raise ValueError(f"num_steps={num_steps} exceeds num_timesteps - 1 for spacing {spacing!r}")
        ts = spaced_timesteps(T, num_steps + 1, spacing, steps_offset)[:-1]
    else:
        ts = spaced_timesteps(T, num_steps, spacing, steps_offset)
    all_sigmas = schedule.sigmas
    sigmas = all_sigmas[ts]
    if use_karras_sigmas:
        sigmas = karras_sigmas(all_sigmas[0], all_sigmas[-1], num_steps, rho)
        ts = np.round(sigma_to_t(sigmas, all_sigmas)).astype(np.int64)
    if final_sigma == "zero":
        last = 0.0
    elif final_sigma == "sigma_min":
        last = all_sigmas[0]
    else:
        raise ValueError(f"unknown final_sigma {final_sigma!r}; expected 'zero' or 'sigma_min'")
    return ts, np.concatenate([sigmas, [last]])


def dpmpp_2m_step(x: Array, x0: Array, x0_prev: Array, sigma_prev, sigma, sigma_next, second_order) -> Array:
    """One DPM-Solver++(2M) step from noise level σ to σ_next in VP form (Lu et al. 2022, "DPM-Solver++",
    Algorithm 2, with the midpoint variant of diffusers):

        h = λ_next - λ,  h₀ = λ - λ_prev,  r = h₀ / h,  D = x̂0 + (x̂0 - x̂0_prev) / (2r)  (first step: D = x̂0),
        x_next = (σ_vp,next / σ_vp) x - α_next (e^{-h} - 1) D,

    where λ = log α - log σ_vp is the half log-SNR. ``second_order`` (traced bool) selects D.
    """
    alpha_n, s_n, lam_n = _vp_from_ve(sigma_next)
    _, s_c, lam_c = _vp_from_ve(sigma)
    _, _, lam_p = _vp_from_ve(sigma_prev)
    h = lam_n - lam_c
    r = jnp.where(second_order, (lam_c - lam_p) / h, 1.0)
    d1 = jnp.where(second_order, (x0 - x0_prev) / r, 0.0)
    coef = alpha_n * jnp.expm1(-h)
    return (s_n / s_c) * x - coef * x0 - 0.5 * coef * d1


@register_sampler("dpmpp_2m")
def dpmpp_2m(model_fn: ModelFn, x_T: Array, schedule: NoiseSchedule, num_steps: int, *,
             rng: Optional[Array] = None, prediction_type: str = "eps", timestep_spacing: str = "linspace",
             steps_offset: int = 0, use_karras_sigmas: bool = False, rho: float = 7.0,
             final_sigma: str = "zero", lower_order_final: bool = True, denoised_fn: DenoisedFn = None,
             start_step: int = 0, x0_init: Optional[Array] = None, post_step: PostStepFn = None) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver, as diffusers'
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"): the
    first step is first order, and so is the last when it ends at σ = 0 (or when ``lower_order_final`` and
    fewer than 15 steps). Deterministic: ``rng`` is unused. Started part-way (``start_step``), the first step
    taken is first order. ``start_step``/``x0_init``/``post_step``: see ``sample``."""
    del rng
    num_steps = _validate(model_fn, x_T, schedule, num_steps, prediction_type)
    ts, sigmas = dpm_solver_timesteps(schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas,
                                      rho, final_sigma)
    second = np.arange(num_steps) > start_step
    if final_sigma == "zero" or (lower_order_final and num_steps < 15):
        second[-1] = False
    sig_prev = np.concatenate([sigmas[:1], sigmas[:-2]])
    xs = tuple(jnp.asarray(a, jnp.float32) for a in (ts, sig_prev, sigmas[:-1], sigmas[1:])) + (jnp.asarray(second),)

    def body(carry, step):
        x, x0_prev = carry
        t, s_prev, s, s_next, use_second = step
        alpha, s_vp, _ = _vp_from_ve(s)
        out = _call_model(model_fn, x, t)
        x0 = _denoise(sch.x0_from_prediction(out, x, alpha, s_vp, prediction_type), denoised_fn)
        return dpmpp_2m_step(x, x0, x0_prev, s_prev, s, s_next, use_second), x0

    def vp_level(sigma):
        alpha, s_vp, _ = _vp_from_ve(jnp.asarray(sigma, jnp.float32))
        return alpha, s_vp

    x = _initial_state(x_T, x0_init, start_step, lambda k: vp_level(sigmas[k]), num_steps)
    x, _ = _run_steps(body, (x, jnp.zeros_like(x)), xs, vp_level(sigmas[1:]), start_step, post_step)
    return x


# --------------------------------------------------------------------------------------------------------
# Euler and Heun on the probability-flow ODE in σ (Karras et al. 2022, EDM).
# --------------------------------------------------------------------------------------------------------


def euler_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str = "linspace", steps_offset: int = 0,
                    use_karras_sigmas: bool = True, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """Fractional timesteps (N,) and VE noise levels (N+1,) ending at σ = 0, as diffusers' Euler/Heun
    discrete schedulers pick them (``use_karras_sigmas``: EDM's ρ-spaced σ between the ends of the spaced
    ones, mapped back to fractional t)."""
    ts, sigmas = _sigma_schedule(schedule, num_steps, spacing, steps_offset, use_karras_sigmas, rho,
                                 integer_timesteps=False)
    return ts, np.concatenate([sigmas, [0.0]])


def _euler_step(x: Array, x0: Array, sigma, sigma_next) -> Array:
    """x + (σ' - σ)(x - x̂0)/σ, written as (σ'/σ) x + (1 - σ'/σ) x̂0: the same number without cancelling the
    large x against (σ' - σ) d when σ ≫ σ' (the first step from σ_max)."""
    r = sigma_next / sigma
    return r * x + (1.0 - r) * x0


def _init_sigma(sigmas: np.ndarray, spacing: str) -> float:
    # diffusers scales the initial noise by σ_max for linspace/trailing, √(σ_max² + 1) for leading.
    s = float(np.max(sigmas))
    return s if spacing in ("linspace", "trailing") else (s**2 + 1.0) ** 0.5


def _ve_denoiser(model_fn, prediction_type, denoised_fn):
    """D(x; σ, t): the model's x̂0 for a VE state x = x0 + σ ε. The network sees x / √(σ² + 1), and

        ε → D = x - σ ε̂,    x0 → D = x̂0,    v → D = x / (σ² + 1) - σ v̂ / √(σ² + 1),

    written in VE form (not via the VP conversions) to keep float32 rounding low when σ is large."""
    p = sch.canonical_prediction_type(prediction_type)

    def denoise(x, sigma, t):
        scale = sigma**2 + 1.0
        out = _call_model(model_fn, x * jax.lax.rsqrt(scale), t)
        if p == "eps":
            x0 = x - sigma * out
        elif p == "x0":
            x0 = out
        else:
            x0 = x / scale - sigma * jax.lax.rsqrt(scale) * out
        return _denoise(x0, denoised_fn)

    return denoise


@register_sampler("euler")
def euler(model_fn: ModelFn, x_T: Array, schedule: NoiseSchedule, num_steps: int, *, rng: Optional[Array] = None,
          prediction_type: str = "eps", timestep_spacing: str = "linspace", steps_offset: int = 0,
          use_karras_sigmas: bool = True, rho: float = 7.0, denoised_fn: DenoisedFn = None, start_step: int = 0,
          x0_init: Optional[Array] = None, post_step: PostStepFn = None) -> Array:
    """Euler's method on the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ (Karras et al. 2022, Alg. 1 with
    Euler steps), x_{i+1} = x_i + (σ_{i+1} - σ_i)(x_i - D(x_i; σ_i)) / σ_i, on Karras σ by default. Matches
    diffusers' EulerDiscreteScheduler (s_churn = 0). Deterministic: ``rng`` is unused. The state is VE,
    x = x0 + σ ε. ``start_step``/``x0_init``/``post_step``: see ``sample``."""
    del rng
    num_steps = _validate(model_fn, x_T, schedule, num_steps, prediction_type)
    ts, sigmas = euler_timesteps(schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas, rho)
    denoise = _ve_denoiser(model_fn, prediction_type, denoised_fn)
    xs = tuple(jnp.asarray(a, jnp.float32) for a in (ts, sigmas[:-1], sigmas[1:]))

    def body(x, step):
        t, s, s_next = step
        return _euler_step(x, denoise(x, s, t), s, s_next)

    x = _initial_state(x_T, x0_init, start_step, lambda k: (1.0, sigmas[k]), num_steps,
                       _init_sigma(sigmas, timestep_spacing))
    return _run_steps(body, x, xs, (np.ones(num_steps), sigmas[1:]), start_step, post_step)


@register_sampler("heun")
def heun(model_fn: ModelFn, x_T: Array, schedule: NoiseSchedule, num_steps: int, *, rng: Optional[Array] = None,
         prediction_type: str = "eps", timestep_spacing: str = "linspace", steps_offset: int = 0,
         use_karras_sigmas: bool = True, rho: float = 7.0, denoised_fn: DenoisedFn = None, start_step: int = 0,
         x0_init: Optional[Array] = None, post_step: PostStepFn = None) -> Array:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, S_churn = 0):

        d = (x_i - D(x_i; σ_i)) / σ_i,   x̃ = x_i + (σ_{i+1} - σ_i) d,
        x_{i+1} = x_i + (σ_{i+1} - σ_i) (d + (x̃ - D(x̃; σ_{i+1})) / σ_{i+1}) / 2     if σ_{i+1} > 0, else x̃.

    2N - 1 model evaluations for N steps; matches diffusers' HeunDiscreteScheduler. The state is VE.
    ``start_step``/``x0_init``/``post_step``: see ``sample``."""
    del rng
    num_steps = _validate(model_fn, x_T, schedule, num_steps, prediction_type)
    ts, sigmas = euler_timesteps(schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas, rho)
    ts_next = np.concatenate([ts[1:], ts[-1:]])
    denoise = _ve_denoiser(model_fn, prediction_type, denoised_fn)
    xs = tuple(jnp.asarray(a, jnp.float32) for a in (ts, ts_next, sigmas[:-1], sigmas[1:]))

    def body(x, step):
        t, t_next, s, s_next = step
        x0 = denoise(x, s, t)
        x_euler = _euler_step(x, x0, s, s_next)

        def correct(x_e):
            # x + h (d + d')/2 = x_euler + h (d' - d)/2, which avoids cancelling x against h d when σ_0 ≫ σ_1.
            d, d_next = (x - x0) / s, (x_e - denoise(x_e, s_next, t_next)) / s_next
            return x_e + 0.5 * (s_next - s) * (d_next - d)

        return jax.lax.cond(s_next > 0, correct, lambda x_e: x_e, x_euler)

    x = _initial_state(x_T, x0_init, start_step, lambda k: (1.0, sigmas[k]), num_steps,
                       _init_sigma(sigmas, timestep_spacing))
    return _run_steps(body, x, xs, (np.ones(num_steps), sigmas[1:]), start_step, post_step)


# --------------------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------------------


def sample(model_fn: ModelFn, x_T: Array, schedule: NoiseSchedule, sampler: str = "ddim", num_steps: int = 50,
           *, rng: Optional[Array] = None, **options) -> Array:
    """Run ``sampler`` (one of ``SAMPLERS``: ddpm, ddim, dpmpp_2m, euler, heun) for ``num_steps`` steps from the
    standard normal ``x_T`` and return x_0 in float32. ``options`` go to the sampler (``prediction_type``,
    ``timestep_spacing``, ``steps_offset``, ``eta``, ``denoised_fn``, ``use_karras_sigmas``, ...).

    Every sampler also takes
      ``start_step`` (static int, default 0) with ``x0_init``: skip the first ``start_step`` steps and start
        from ``x0_init`` forward-noised with ``x_T`` to the noise level of step ``start_step`` (SDEdit,
        Meng et al. 2022: image-to-image with strength 1 - start_step / num_steps); ``start_step =
        num_steps`` returns ``x0_init`` unchanged, ``start_step = 0`` ignores it;
      ``post_step(x, scale, σ, i) -> x``: applied to the state after step i, whose noise level is
        x = scale · x0 + σ · ε in the sampler's state space (inpainting re-imposes the known pixels there).

    Wrap the call in ``jax.jit`` (with ``num_steps`` and ``sampler`` static) to compile it once: the result is
    a single ``lax.scan`` whose compile time does not grow with ``num_steps``.
    """
    fn = get_sampler(sampler)
    if sampler == "ddpm" and rng is None:
        raise ValueError("sampler 'ddpm' needs an rng key")
    try:
        return fn(model_fn, x_T, schedule, num_steps, rng=rng, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"sampler {sampler!r}: {e}") from None
        raise
