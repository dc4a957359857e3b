"""Classifier-free guidance and the x0 post-processing that samplers accept as ``denoised_fn``.

Classifier-free guidance (Ho & Salimans 2021, "Classifier-Free Diffusion Guidance", eq. 6) extrapolates from
the unconditional towards the conditional prediction,

    ε̃(x_t, c) = ε(x_t, ∅) + w (ε(x_t, c) - ε(x_t, ∅)),

with w = 1 the conditional model alone and w = 0 the unconditional one. Both branches are evaluated in one
batched network call. The guidance scale is an ordinary (traced) argument: changing it does not recompile.

The scale may vary with the noise level (:func:`guidance_scale_fn`): applied only in an interval of noise
levels σ ∈ (σ_lo, σ_hi] and w = 1 outside it (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality in Diffusion Models": guidance at high noise collapses the
diversity of the layouts, at low noise it does little), and/or following a schedule over the timesteps whose
mean over t is w (Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight Schedulers": schedules that
grow as the noise falls)::

    constant  w(t) = w
    linear    w(t) = 1 + 2 (w - 1) (1 - u)          u = t / (T - 1): 0 at the data, 1 at pure noise
    cosine    w(t) = 1 + (w - 1) (1 + cos(π u))
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffjax import schedules as sch

Array = jax.Array
# denoiser(x_t, t, cond) -> prediction; cond is any pytree whose leaves have a leading batch axis.
Denoiser = Callable[[Array, Array, Any], Array]


def _batch_concat(a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def _check_batch(x_t: Array, tree, what: str) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.ndim(leaf) == 0 or leaf.shape[0] != x_t.shape[0]:
            raise ValueError(f"{what} leaves need a leading batch axis of size {x_t.shape[0]} (the batch of x_t), "
                             f"got shape {jnp.shape(leaf)}")


def cfg_combine(pred_uncond: Array, pred_cond: Array, guidance_scale, guidance_rescale=0.0) -> Array:
    """uncond + w (cond - uncond), then optionally the guidance rescale of Lin et al. 2023 (§3.4, eqs. 15-16):

        x_rescaled = x_cfg · std(x_cond) / std(x_cfg),    x_final = φ x_rescaled + (1 - φ) x_cfg,

    with std over all non-batch axes and φ = ``guidance_rescale`` (0 disables it).
    """
    w = jnp.asarray(guidance_scale, jnp.float32)
    guided = pred_uncond + w * (pred_cond - pred_uncond)
    phi = jnp.asarray(guidance_rescale, jnp.float32)
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(pred_cond, axis=axes, keepdims=True)
    std_cfg = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / jnp.maximum(std_cfg, 1e-12))
    return jnp.where(phi == 0.0, guided, phi * rescaled + (1.0 - phi) * guided)


GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


def check_guidance_schedule(name) -> str:
    """``name`` if it is one of :data:`GUIDANCE_SCHEDULES`, else a one-line ValueError naming them."""
    if name not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {name!r}")
    return name


def check_guidance_interval(interval, what: str = "guidance_interval") -> Optional[tuple[float, float]]:
    """(σ_lo, σ_hi) as floats with 0 ≤ σ_lo < σ_hi (σ_hi may be inf), from a pair or a ``"lo,hi"`` string; None
    (or ``""``) for guidance at every noise level. A one-line ValueError naming ``what`` otherwise."""
    if interval is None or (isinstance(interval, str) and not interval.strip()):
        return None
    try:
        parts = interval.split(",") if isinstance(interval, str) else list(interval)
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two noise levels 'sigma_lo,sigma_hi', got {interval!r}") from None
    if not (math.isfinite(lo) and 0.0 <= lo < hi) or math.isnan(hi):
        raise ValueError(f"{what} must satisfy 0 <= sigma_lo < sigma_hi, got {interval!r}")
    return lo, hi


def guidance_scale_fn(guidance_scale, noise_schedule, guidance_schedule: str = "constant",
                      interval=None) -> Callable[[Array], Array]:
    """``w(t)``: the guidance scale of each example at (possibly fractional) timesteps ``t`` (shape (B,)).

    ``guidance_schedule`` (static) is one of :data:`GUIDANCE_SCHEDULES`; ``interval`` (traced, may be None) is
    (σ_lo, σ_hi): outside σ_lo < σ(t) ≤ σ_hi the scale is 1 (the conditional model alone), with σ(t) =
    √((1 - ᾱ_t) / ᾱ_t) interpolated between integer timesteps as the samplers do.
    """
    check_guidance_schedule(guidance_schedule)
    num_timesteps = noise_schedule.num_timesteps
    sigmas = jnp.asarray(noise_schedule.sigmas, jnp.float32)

    def scale_at(t: Array) -> Array:
        t = jnp.asarray(t, jnp.float32)
        w = jnp.asarray(guidance_scale, jnp.float32)
        u = t / max(num_timesteps - 1, 1)
        if guidance_schedule == "linear":
            w = 1.0 + 2.0 * (w - 1.0) * (1.0 - u)
        elif guidance_schedule == "cosine":
            w = 1.0 + (w - 1.0) * (1.0 + jnp.cos(jnp.pi * u))
        w = jnp.broadcast_to(w, t.shape)
        if interval is not None:
            lo, hi = jnp.asarray(interval[0], jnp.float32), jnp.asarray(interval[1], jnp.float32)
            sigma = jnp.interp(t, jnp.arange(num_timesteps, dtype=jnp.float32), sigmas)
            w = jnp.where((sigma > lo) & (sigma <= hi), w, 1.0)
        return w

    return scale_at


def classifier_free_guidance(denoiser: Denoiser, cond: Any, uncond: Any, guidance_scale,
                             guidance_rescale=0.0, scale_fn: Callable[[Array], Array] | None = None,
                             skip_unguided: bool = False) -> Callable[[Array, Array], Array]:
    """Wrap ``denoiser(x_t, t, cond)`` into the ``model_fn(x_t, t)`` the samplers call, guided with scale w.

    ``cond`` and ``uncond`` are pytrees of the same structure (e.g. text states and mask for the prompts and
    for the empty prompt), batched like x_t. Each call evaluates the network once on the concatenated batch
    [x_t; x_t] with [uncond; cond] and combines the halves with ``cfg_combine``. A learned-variance output
    (twice the channels of x_t) is guided on its prediction channels only; the variance channels are the
    conditional model's (as DiT's sampling does). ``scale_fn(t)`` (:func:`guidance_scale_fn`), when given, is
    the scale of each example at its timestep, in place of ``guidance_scale``; with ``skip_unguided`` a call
    where every example's scale is 1 (outside a guidance interval) runs the conditional branch alone
    (``lax.cond``: half the network's work; the network is compiled twice).
    """

    def model_fn(x_t: Array, t: Array) -> Array:
        _check_batch(x_t, cond, "cond")
        _check_batch(x_t, uncond, "uncond")
        b = x_t.shape[0]
        if scale_fn is None:
            return guided(x_t, t, guidance_scale)
        w = scale_fn(jnp.broadcast_to(t, (b,)))
        per_example = w.reshape((b,) + (1,) * (x_t.ndim - 1))
        if not skip_unguided:
            return guided(x_t, t, per_example)
        return jax.lax.cond(jnp.all(w == 1.0), lambda: denoiser(x_t, t, cond).astype(jnp.float32),
                            lambda: guided(x_t, t, per_example))

    def guided(x_t: Array, t: Array, w) -> Array:
        b, c = x_t.shape[0], x_t.shape[-1]
        out = denoiser(jnp.concatenate([x_t, x_t], 0), jnp.concatenate([t, t], 0), _batch_concat(uncond, cond))
        out = out.astype(jnp.float32)
        if out.shape[-1] == 2 * c:
            mixed = cfg_combine(out[:b, ..., :c], out[b:, ..., :c], w, guidance_rescale)
            return jnp.concatenate([mixed, out[b:, ..., c:]], axis=-1)
        return cfg_combine(out[:b], out[b:], w, guidance_rescale)

    return model_fn


# Below this α_t the ε form leaves x̂0 undetermined (a zero-SNR endpoint): alignment guidance skips such steps.
MIN_ALPHA = 1e-3


def vp_coefficients(noise_schedule, t: Array, ndim: int = 4) -> tuple[Array, Array]:
    """(α_t, σ_t) = (√ᾱ_t, √(1 - ᾱ_t)) at (possibly fractional) timesteps ``t`` (B,), at the noise level the
    samplers give a fractional t (VE σ_t = √((1-ᾱ)/ᾱ) interpolated in log σ, as ``samplers.sigma_to_t`` inverts;
    exact at integer t; α = 0 where σ = ∞); shaped (B, 1, ...) to broadcast against x of rank ``ndim``."""
    t = jnp.asarray(t, jnp.float32)
    log_sigmas = jnp.log(jnp.asarray(noise_schedule.sigmas, jnp.float32))
    sigma = jnp.exp(jnp.interp(t, jnp.arange(noise_schedule.num_timesteps, dtype=jnp.float32), log_sigmas))
    alpha = jax.lax.rsqrt(sigma**2 + 1.0).reshape(t.shape + (1,) * (ndim - t.ndim))
    return alpha, jnp.sqrt(1.0 - alpha**2)


def alignment_guidance(model_fn: Callable[[Array, Array], Array], similarity_fn: Callable[[Array, Array], Array],
                       noise_schedule, prediction_type: str, scale) -> Callable[[Array, Array], Array]:
    """Wrap the (guided) ``model_fn(x_t, t)`` the samplers call so that it also ascends an image–text similarity,
    as GLIDE's CLIP guidance (Nichol et al. 2022, §2.4) in the ε form of classifier guidance (Dhariwal & Nichol
    2021, eq. 14, Algorithm 2):

        ε̃ = ε̂ - s σ_t ∇_{x_t} sim(x_t, t),

    ``similarity_fn(x_t, t) -> (B,)`` a differentiable similarity of each noisy sample with its prompt (e.g. the
    logit e^τ cos(g_img(x̂0(x_t)), g_txt(c)) of the jointly trained alignment heads, which see x̂0 from noisy
    inputs, or of a CLIP model on the decoded x̂0) and s = ``scale`` (traced: changing it does not recompile).
    The output keeps the model's parameterisation (``prediction_type``): x̂0 moves by s σ_t²/α_t ∇ sim, v̂ by
    -s (σ_t/α_t) ∇ sim. Steps with α_t < :data:`MIN_ALPHA` (a zero-SNR endpoint, where x̂0 is undetermined) are
    left unguided. Works with every sampler and with classifier-free guidance inside ``model_fn``."""
    p = sch.canonical_prediction_type(prediction_type)

    def guided(x_t: Array, t: Array) -> Array:
        pred = model_fn(x_t, t).astype(jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        grad = jax.grad(lambda x: jnp.sum(similarity_fn(x, t)))(x_t.astype(jnp.float32))
        alpha, sigma = vp_coefficients(noise_schedule, t, x_t.ndim)
        ok = alpha >= MIN_ALPHA
        alpha = jnp.where(ok, alpha, 1.0)
        c = pred.shape[-1] - x_t.shape[-1]  # learned-variance channels ride along unchanged
        mean, var = (pred[..., :x_t.shape[-1]], pred[..., x_t.shape[-1]:]) if c else (pred, None)
        eps = sch.eps_from_prediction(mean, x_t, alpha, sigma, p) - jnp.asarray(scale, jnp.float32) * sigma * grad
        x0 = (x_t - sigma * eps) / alpha
        out = jnp.where(ok, sch.prediction_target(x0, eps, alpha, sigma, p), mean)
        return out if var is None else jnp.concatenate([out, var], axis=-1)

    return guided


def clip_x0(x0: Array, clip_range: float = 1.0) -> Array:
    """Clip the predicted x0 to [-r, r] (Ho et al. 2020's sampler clips to the data range [-1, 1])."""
    return jnp.clip(x0, -clip_range, clip_range)


def dynamic_threshold(x0: Array, percentile: float = 0.995, max_value: float = 1.0) -> Array:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", §2.3): per sample, s = max(1, quantile_p(|x0|)),
    clipped to ``max_value``; then x0 ← clip(x0, -s, s) / s. It keeps saturated pixels from building up at
    high guidance scales."""
    b = x0.shape[0]
    flat = jnp.abs(x0.reshape(b, -1)).astype(jnp.float32)
    s = jnp.quantile(flat, percentile, axis=1)
    s = jnp.clip(s, 1.0, max_value).reshape((b,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)
