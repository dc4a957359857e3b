"""Discrete-time noise schedules and the forward process, as pure functions over a pytree.

A schedule is fixed by its betas β_1..β_T (stored 0-indexed, t = 0..T-1 as in diffusers). Everything else
follows (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eqs. 4, 6, 7):

    α_t = 1 - β_t,        ᾱ_t = ∏_{s≤t} α_s,
    q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I),
    SNR(t) = ᾱ_t / (1 - ᾱ_t)                       (Kingma et al. 2021, "Variational Diffusion Models").

Schedules are computed in float64 with numpy and stored as float32 arrays, so the scheduler math stays in
float32 whatever dtype the network runs in. ``NoiseSchedule`` is a ``flax.struct`` pytree: it can be passed
through ``jax.jit`` as an argument, sharded, or closed over.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PREDICTION_TYPES = ("eps", "x0", "v")
# diffusers' names for the same parameterisations.
_PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


@flax.struct.dataclass
class NoiseSchedule:
    """β_t and ᾱ_t for t = 0..T-1 (float32). ``num_timesteps`` and ``name`` are static metadata."""

    betas: Array
    alphas_cumprod: Array
    num_timesteps: int = flax.struct.field(pytree_node=False)
    name: str = flax.struct.field(pytree_node=False, default="custom")

    @property
    def alphas(self) -> Array:
        """α_t = 1 - β_t."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self) -> Array:
        """ᾱ_{t-1}, with ᾱ_{-1} = 1."""
        return jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]])

    @property
    def sigmas(self) -> np.ndarray:
        """The variance-exploding noise levels σ_t = √((1 - ᾱ_t) / ᾱ_t) (Karras et al. 2022, eq. 2), t = 0..T-1,
        in float64 on the host (the samplers build their step grids from them; not usable inside a trace).
        A zero ᾱ_{T-1} (zero terminal SNR) is replaced by 2⁻²⁴, as diffusers does, so that σ_max stays
        finite."""
        ab = np.asarray(self.alphas_cumprod, dtype=np.float64)
        ab = np.where(ab == 0.0, 2.0**-24, ab)
        return np.sqrt((1.0 - ab) / ab)

    @property
    def snr(self) -> Array:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t) for every t."""
        return snr(self, jnp.arange(self.num_timesteps))


# --------------------------------------------------------------------------------------------------------
# Beta schedules (float64 numpy).
# --------------------------------------------------------------------------------------------------------


def betas_from_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], num_timesteps: int,
                         max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ᾱ(τ), τ ∈ [0, 1], into betas (Nichol & Dhariwal 2021, eq. 17 and §3.2):

        β_i = min(1 - ᾱ((i + 1) / T) / ᾱ(i / T), max_beta),   i = 0..T-1.
    """
    tau = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    ab = alpha_bar(tau)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020, §4: 1e-4 → 0.02 for T = 1000)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """√β linear from √beta_start to √beta_end (Rombach et al. 2022, Stable Diffusion: 0.00085 → 0.012)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ(τ) = cos²((τ + s) / (1 + s) · π/2), β ≤ 0.999.

    The ratio form ᾱ(τ)/ᾱ(0) of the paper equals the ratio of consecutive ᾱ used by ``betas_from_alpha_bar``.
    """
    return betas_from_alpha_bar(lambda tau: np.cos((tau + s) / (1 + s) * math.pi / 2) ** 2, num_timesteps,
                                max_beta)


def sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> np.ndarray:
    """Sigmoid schedule (Jabri et al. 2022, "Scalable Adaptive Computation for Iterative Generation", Alg. 8):

        ᾱ(τ) = (σ(end/tau) - σ((τ (end - start) + start) / tau)) / (σ(end/tau) - σ(start/tau)),

    with σ the logistic function, discretised like the cosine schedule.
    """
    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = sig(start / tau), sig(end / tau)

    def alpha_bar(t):
        return (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta)


_BETA_FNS = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}
SCHEDULES = tuple(_BETA_FNS)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale √ᾱ_t so that ᾱ_{T-1} = 0 and ᾱ_0 is unchanged (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1):

        √ᾱ'_t = (√ᾱ_t - √ᾱ_{T-1}) · √ᾱ_0 / (√ᾱ_0 - √ᾱ_{T-1}).

    The last step then has β = 1 (pure noise); models trained on it should predict v (or x0), since ε
    carries no information about x0 at zero SNR.
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def from_betas(betas, name: str = "custom") -> NoiseSchedule:
    """Build a ``NoiseSchedule`` from any betas in (0, 1]; ᾱ is accumulated in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must lie in (0, 1]")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(betas=jnp.asarray(betas, jnp.float32),
                         alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
                         num_timesteps=int(betas.size), name=name)


def get_schedule(name: str, num_timesteps: int = 1000, *, rescale_to_zero_snr: bool = False,
                 **options) -> NoiseSchedule:
    """The schedule called ``name`` (one of ``SCHEDULES``) with ``num_timesteps`` steps.

    ``options`` go to the beta function (e.g. ``beta_start``/``beta_end`` for ``linear`` and
    ``scaled_linear``; ``s`` for ``cosine``; ``start``/``end``/``tau`` for ``sigmoid``).
    ``rescale_to_zero_snr`` applies Lin et al. (2023)'s rescaling (see ``rescale_zero_terminal_snr``).
    """
    if name not in _BETA_FNS:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    try:
        betas = _BETA_FNS[name](int(num_timesteps), **options)
    except TypeError as e:
        raise ValueError(f"bad option for noise schedule {name!r}: {e}") from None
    if rescale_to_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
        name = name + "+zero_snr"
    return from_betas(betas, name=name)


# --------------------------------------------------------------------------------------------------------
# The forward process and its posterior.
# --------------------------------------------------------------------------------------------------------


def check_timesteps(schedule: NoiseSchedule, t) -> None:
    """Raise a one-line ValueError when concrete timesteps fall outside [0, T-1]. Traced values pass (under
    ``jit`` the check must happen where the timesteps are made, as the samplers and losses do)."""
    if isinstance(t, jax.core.Tracer):
        return
    t = np.asarray(t)
    if t.size and (t.min() < 0 or t.max() > schedule.num_timesteps - 1):
        raise ValueError(f"timestep out of range: got values in [{t.min()}, {t.max()}], the schedule "
                         f"{schedule.name!r} has timesteps 0..{schedule.num_timesteps - 1}")


def _gather(values: Array, t, ndim: int) -> Array:
    """values[t] reshaped to broadcast against an array of rank ``ndim`` with batch axis first."""
    out = jnp.asarray(values)[jnp.asarray(t)]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def alpha_sigma(schedule: NoiseSchedule, t, ndim: int = 1) -> tuple[Array, Array]:
    """The VP coefficients (α_t, σ_t) = (√ᾱ_t, √(1 - ᾱ_t)) at integer timesteps t, broadcastable to rank ``ndim``."""
    ab = _gather(schedule.alphas_cumprod, t, ndim)
    return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def q_sample(schedule: NoiseSchedule, x0: Array, t, noise: Array) -> Array:
    """Sample x_t ~ q(x_t | x_0) by reparameterisation (Ho et al. 2020, eq. 4):

        x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε,   ε ~ N(0, I).

    ``t`` is an integer timestep per batch element (shape (B,)) or a scalar.
    """
    check_timesteps(schedule, t)
    a, s = alpha_sigma(schedule, t, x0.ndim)
    return (a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(jnp.result_type(x0, jnp.float32))


def q_posterior(schedule: NoiseSchedule, x0: Array, x_t: Array, t) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7):

        μ̃_t = √ᾱ_{t-1} β_t / (1 - ᾱ_t) · x_0 + √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t,
        β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t.

    The log-variance is clipped at t = 0 (where β̃ = 0) to log β̃_1, as in the DDPM reference code.
    """
    check_timesteps(schedule, t)
    ndim = x_t.ndim
    ab = _gather(schedule.alphas_cumprod, t, ndim)
    ab_prev = _gather(schedule.alphas_cumprod_prev, t, ndim)
    beta = _gather(schedule.betas, t, ndim)
    alpha = 1.0 - beta
    mean = (jnp.sqrt(ab_prev) * beta / (1.0 - ab)) * x0 + (jnp.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab)) * x_t
    var_all = posterior_variance(schedule)
    var = _gather(var_all, t, ndim)
    log_var = _gather(jnp.log(jnp.concatenate([var_all[1:2], var_all[1:]])), t, ndim)
    return mean, var, log_var


def posterior_variance(schedule: NoiseSchedule) -> Array:
    """β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t for all t (Ho et al. 2020, eq. 7)."""
    return (1.0 - schedule.alphas_cumprod_prev) / (1.0 - schedule.alphas_cumprod) * schedule.betas


def snr(schedule: NoiseSchedule, t) -> Array:
    """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021, eq. 1); +inf where ᾱ_t = 1."""
    ab = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    return ab / (1.0 - ab)


def log_snr(schedule: NoiseSchedule, t) -> Array:
    """λ_t = log SNR(t) = log ᾱ_t - log(1 - ᾱ_t)."""
    ab = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    return jnp.log(ab) - jnp.log1p(-ab)


# --------------------------------------------------------------------------------------------------------
# Conversions between ε-, x0- and v-prediction (Salimans & Ho 2022, "Progressive Distillation", §4 and App. D).
# With x_t = α x0 + σ ε and α² + σ² = 1, the velocity is v = α ε - σ x0, so that
#     x0 = α x_t - σ v,   ε = σ x_t + α v,   x0 = (x_t - σ ε) / α,   ε = (x_t - α x0) / σ.
# The general (α, σ) forms below also serve the samplers at interpolated noise levels.
# --------------------------------------------------------------------------------------------------------


def canonical_prediction_type(prediction_type: str) -> str:
    """'eps', 'x0' or 'v' (diffusers' 'epsilon', 'sample', 'v_prediction' are accepted as aliases)."""
    p = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if p not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return p


def x0_from_prediction(prediction: Array, x_t: Array, alpha: Array, sigma: Array, prediction_type: str) -> Array:
    """x0 implied by a model output: ε → (x_t - σ ε) / α;  x0 → itself;  v → α x_t - σ v."""
    p = canonical_prediction_type(prediction_type)
    if p == "eps":
        return (x_t - sigma * prediction) / alpha
    if p == "x0":
        return prediction
    return alpha * x_t - sigma * prediction


def eps_from_prediction(prediction: Array, x_t: Array, alpha: Array, sigma: Array, prediction_type: str) -> Array:
    """ε implied by a model output: ε → itself;  x0 → (x_t - α x0) / σ;  v → σ x_t + α v."""
    p = canonical_prediction_type(prediction_type)
    if p == "eps":
        return prediction
    if p == "x0":
        return (x_t - alpha * prediction) / sigma
    return sigma * x_t + alpha * prediction


def prediction_target(x0: Array, noise: Array, alpha: Array, sigma: Array, prediction_type: str) -> Array:
    """The regression target for a parameterisation: ε, x0, or v = α ε - σ x0."""
    p = canonical_prediction_type(prediction_type)
    if p == "eps":
        return noise
    if p == "x0":
        return x0
    return alpha * noise - sigma * x0


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: Array, t, eps: Array) -> Array:
    """x0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t (Ho et al. 2020, eq. 15)."""
    a, s = alpha_sigma(schedule, t, x_t.ndim)
    return x0_from_prediction(eps, x_t, a, s, "eps")


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: Array, t, x0: Array) -> Array:
    """ε = (x_t - √ᾱ_t x0) / √(1 - ᾱ_t)."""
    a, s = alpha_sigma(schedule, t, x_t.ndim)
    return eps_from_prediction(x0, x_t, a, s, "x0")


def get_v(schedule: NoiseSchedule, x0: Array, t, noise: Array) -> Array:
    """v = √ᾱ_t ε - √(1 - ᾱ_t) x0 (Salimans & Ho 2022, §4)."""
    a, s = alpha_sigma(schedule, t, x0.ndim)
    return prediction_target(x0, noise, a, s, "v")


def predict_x0_from_v(schedule: NoiseSchedule, x_t: Array, t, v: Array) -> Array:
    """x0 = √ᾱ_t x_t - √(1 - ᾱ_t) v."""
    a, s = alpha_sigma(schedule, t, x_t.ndim)
    return x0_from_prediction(v, x_t, a, s, "v")


def predict_eps_from_v(schedule: NoiseSchedule, x_t: Array, t, v: Array) -> Array:
    """ε = √(1 - ᾱ_t) x_t + √ᾱ_t v."""
    a, s = alpha_sigma(schedule, t, x_t.ndim)
    return eps_from_prediction(v, x_t, a, s, "v")
