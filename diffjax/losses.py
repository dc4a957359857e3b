"""The denoising training objective as a pure function of a key, a model function and a batch.

For x0 from the data, t ~ U{0..T-1}, ε ~ N(0, I) and x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, the loss is

    L = E_t,ε [ w(t) ‖target - f(x_t, t, c)‖² ],

where the target is ε, x0 or v = √ᾱ_t ε - √(1-ᾱ_t) x0 (``prediction_type``; Ho et al. 2020, eq. 14 is ε with
w = 1) and w(t) one of the weightings below. The squared error is averaged over all non-batch axes.

Weightings are defined on the ε scale and converted, using ‖ε - ε̂‖² = SNR ‖x0 - x̂0‖² and
‖v - v̂‖² = (1 + SNR) ‖x0 - x̂0‖², so that a weighting means the same thing for every prediction type:
- ``none``: w = 1 on the chosen target (the "simple" loss of each parameterisation);
- ``min_snr``: Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  eq. 9): w_x0 = min(SNR, γ), i.e. w_ε = min(SNR, γ)/SNR and w_v = min(SNR, γ)/(SNR + 1);
- ``p2``: perception-prioritised weighting (Choi et al. 2022, eq. 8): w_ε = 1 / (k + SNR)^γ.

The timesteps need not be uniform (``timestep_sampler``): ``log_normal`` draws the noise level as EDM does
(Karras et al. 2022, §5, Table 1: ln σ ~ N(P_mean, P_std²), σ = √((1-ᾱ)/ᾱ)) and takes the schedule's nearest
timestep, spending the steps on the middle noise levels that matter most for sample quality.

Classifier-free guidance needs a model that also knows the unconditional case: with probability
``cond_drop_prob`` an example's conditioning is replaced by the unconditional one (Ho & Salimans 2021).

A network that also outputs its reverse-process variance (``learned_variance``: twice the channels, as
``DiTConfig(learn_sigma=True)``) is trained with the hybrid objective of Nichol & Dhariwal 2021 (§3.1):
L_simple + λ L_vlb with λ = 0.001, i.e. per example ``vlb_term · T / 1000``, the variational-bound term seeing
the mean prediction under a stop-gradient, so that it trains the variance alone.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffjax import schedules as sch
from diffjax.schedules import NoiseSchedule

Array = jax.Array
WEIGHTINGS = ("none", "min_snr", "p2")
TIMESTEP_SAMPLERS = ("uniform", "log_normal")


class LossOutput(NamedTuple):
    loss: Array  # scalar: mean over the batch of w(t) · mse (+ the rescaled vlb term of a learned variance)
    mse: Array  # (B,) unweighted squared error per example
    weights: Array  # (B,) w(t)
    t: Array  # (B,) sampled timesteps
    vlb: Optional[Array] = None  # (B,) the variational-bound term L_t in bits/dim (learned variance only)
    x0_pred: Optional[Array] = None  # (B, ...) the model's x̂0 (differentiable; the alignment term's input; for ε
    # at a zero-SNR endpoint the division by α uses max(α, 1e-3), so that it stays finite)


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(μ₁, e^{logvar₁}) ‖ N(μ₂, e^{logvar₂})) elementwise, in nats:
    ½ (logvar₂ - logvar₁ + e^{logvar₁ - logvar₂} + (μ₁ - μ₂)² e^{-logvar₂} - 1)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _std_normal_cdf(x: Array) -> Array:
    """Φ(x) in the tanh approximation of the DDPM / IDDPM reference code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log-probability, elementwise, of 8-bit data x ∈ [-1, 1] under N(mean, e^{2 log_scale}) integrated over each
    value's bin of width 2/255, the outermost bins extended to ±∞ (Ho et al. 2020, eq. 13)."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term(schedule: NoiseSchedule, x0: Array, x_t: Array, t: Array, x0_pred: Array, v: Array) -> Array:
    """L_t of the variational bound, per example, in bits per dimension (Nichol & Dhariwal 2021, eqs. 4-6, 15):

        Σ_θ = exp(f log β_t + (1 - f) log β̃_t),  f = (v + 1) / 2,   μ_θ = μ̃_t(x̂0, x_t),
        L_t = KL(q(x_{t-1} | x_t, x0) ‖ N(μ_θ, Σ_θ))  for t > 0,   L_0 = -log p(x0 | x_1) (discretised).

    β̃ is the posterior variance with β̃_0 clipped to β̃_1 (``schedules.q_posterior``)."""
    axes = tuple(range(1, x0.ndim))
    true_mean, _, true_logvar = sch.q_posterior(schedule, x0, x_t, t)
    model_mean, _, min_log = sch.q_posterior(schedule, x0_pred, x_t, t)
    max_log = jnp.log(jnp.asarray(schedule.betas)[t]).reshape((-1,) + (1,) * (x0.ndim - 1))
    frac = (v + 1.0) / 2.0
    model_logvar = frac * max_log + (1.0 - frac) * min_log
    kl = jnp.mean(normal_kl(true_mean, true_logvar, model_mean, model_logvar), axis=axes) / math.log(2.0)
    nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar), axis=axes) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def loss_weight(snr: Array, prediction_type: str = "eps", weighting: str = "none", *,
                min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0) -> Array:
    """w(t) for the loss on ``prediction_type`` given SNR(t) (see the module docstring for the formulas)."""
    p = sch.canonical_prediction_type(prediction_type)
    snr = jnp.asarray(snr, jnp.float32)
    if weighting == "none":
        return jnp.ones_like(snr)
    if weighting == "min_snr":
        g = jnp.asarray(min_snr_gamma, jnp.float32)
        if p == "x0":
            return jnp.minimum(snr, g)
        if p == "v":
            return jnp.minimum(snr, g) / (snr + 1.0)
        # min(SNR, γ)/SNR = min(1, γ/SNR): finite at SNR = 0 (zero terminal SNR) and SNR = ∞.
        return jnp.minimum(1.0, g / snr)
    if weighting == "p2":
        w_eps = 1.0 / (p2_k + snr) ** p2_gamma
        if p == "eps":
            return w_eps
        if p == "x0":
            return w_eps * snr
        return w_eps * snr / (snr + 1.0)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def timestep_sampler(schedule: NoiseSchedule, name: str = "uniform", mean: float = -1.2,
                     std: float = 1.2) -> Callable[[Array], Array]:
    """``sample(key) -> t`` (int32 scalar) for training: ``uniform`` t ~ U{0..T-1}, or ``log_normal``: ln σ ~
    N(mean, std²) mapped to the timestep of the nearest noise level (log σ interpolated over the schedule's σ_t,
    rounded, clipped to 0..T-1)."""
    num_timesteps = schedule.num_timesteps
    if name == "uniform":
        return lambda key: jax.random.randint(key, (), 0, num_timesteps)
    if name != "log_normal":
        raise ValueError(f"timestep sampling {name!r}: expected one of {', '.join(TIMESTEP_SAMPLERS)}")
    if not std > 0:
        raise ValueError(f"the log-normal timestep sampling needs std > 0, got {std}")
    log_sigmas = jnp.log(jnp.asarray(schedule.sigmas, jnp.float32))  # increasing in t

    def sample(key: Array) -> Array:
        log_sigma = mean + std * jax.random.normal(key, (), jnp.float32)
        t = jnp.interp(log_sigma, log_sigmas, jnp.arange(num_timesteps, dtype=jnp.float32))
        return jnp.clip(jnp.round(t), 0, num_timesteps - 1).astype(jnp.int32)

    return sample


def select_condition(drop: Array, cond: Any, uncond: Any) -> Any:
    """Per example, ``uncond`` where ``drop`` (bool, shape (B,)) is set and ``cond`` elsewhere. ``cond`` is a
    pytree with a leading batch axis B on every leaf; ``uncond`` has the same structure with batch 1 or B."""
    b = drop.shape[0]

    def pick(c, u):
        mask = drop.reshape((b,) + (1,) * (c.ndim - 1))
        return jnp.where(mask, jnp.broadcast_to(u, c.shape).astype(c.dtype), c)

    return jax.tree_util.tree_map(pick, cond, uncond)


def drop_condition(rng: Array, cond: Any, uncond: Any, drop_prob) -> Any:
    """Replace each example's conditioning by the unconditional one with probability ``drop_prob``
    (Ho & Salimans 2021, Algorithm 1); see ``select_condition`` for the shapes."""
    leaves = jax.tree_util.tree_leaves(cond)
    if not leaves:
        return cond
    drop = jax.random.uniform(rng, (leaves[0].shape[0],)) < drop_prob
    return select_condition(drop, cond, uncond)


def diffusion_loss(rng: Array, model_fn: Callable[[Array, Array, Any], Array], schedule: NoiseSchedule,
                   x0: Array, cond: Any = None, *, uncond: Any = None, prediction_type: str = "eps",
                   weighting: str = "none", min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0,
                   cond_drop_prob=0.0, t: Optional[Array] = None, noise: Optional[Array] = None,
                   learned_variance: bool = False) -> LossOutput:
    """The weighted denoising loss for a batch x0 (B, ...), with ``model_fn(x_t, t, cond) -> prediction``.

    t and ε are drawn from ``rng`` unless given. ``uncond`` is needed when ``cond_drop_prob > 0``. With
    ``learned_variance`` the model outputs the prediction and the variance interpolation v (twice the channels)
    and the loss adds ``vlb_term · T / 1000`` (the hybrid objective, see the module docstring).
    The arithmetic is float32 whatever the model's compute dtype.
    """
    p = sch.canonical_prediction_type(prediction_type)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    b = x0.shape[0]
    x0 = x0.astype(jnp.float32)
    if t is None:
        t = jax.random.randint(t_rng, (b,), 0, schedule.num_timesteps)
    else:
        sch.check_timesteps(schedule, t)
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    if cond is not None and not (isinstance(cond_drop_prob, (int, float)) and cond_drop_prob == 0):
        if uncond is None:
            raise ValueError("cond_drop_prob > 0 needs the unconditional conditioning `uncond`")
        cond = drop_condition(drop_rng, cond, uncond, cond_drop_prob)
    alpha, sigma = sch.alpha_sigma(schedule, t, x0.ndim)
    x_t = alpha * x0 + sigma * noise
    target = sch.prediction_target(x0, noise, alpha, sigma, p)
    pred = model_fn(x_t, t, cond).astype(jnp.float32)
    v = None
    if learned_variance:
        c = target.shape[-1]
        if pred.shape[:-1] != target.shape[:-1] or pred.shape[-1] != 2 * c:
            raise ValueError(f"a learned-variance model must output {target.shape[:-1] + (2 * c,)} (prediction and "
                             f"variance), got {pred.shape}")
        pred, v = pred[..., :c], pred[..., c:]
    if pred.shape != target.shape:
        raise ValueError(f"model output shape {pred.shape} does not match the target shape {target.shape}")
    mse = jnp.mean((pred - target) ** 2, axis=tuple(range(1, x0.ndim)))
    w = loss_weight(sch.snr(schedule, t), p, weighting, min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma, p2_k=p2_k)
    x0_pred = sch.x0_from_prediction(pred, x_t, jnp.maximum(alpha, 1e-3), sigma, p)
    if v is None:
        return LossOutput(loss=jnp.mean(w * mse), mse=mse, weights=w, t=t, x0_pred=x0_pred)
    vlb = vlb_term(schedule, x0, x_t, t, sch.x0_from_prediction(jax.lax.stop_gradient(pred), x_t, alpha, sigma, p), v)
    return LossOutput(loss=jnp.mean(w * mse + vlb * (schedule.num_timesteps / 1000.0)), mse=mse, weights=w, t=t,
                      vlb=vlb, x0_pred=x0_pred)


# --------------------------------------------------------------------------------------------------------
# The image–text alignment term (config.alignment; the heads are diffjax.models.alignment).
# --------------------------------------------------------------------------------------------------------

ALIGNMENT_LOSSES = ("contrastive", "cosine")
ALIGNMENT_WEIGHTINGS = ("none", "alpha_cumprod")
ALIGNMENT_POSITIVES = ("prompt", "label", "none")


def l2_normalize(x: Array) -> Array:
    """x / ‖x‖ along the last axis, in float32 (0 stays 0)."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def contrastive_alignment_loss(image_emb: Array, text_emb: Array, logit_scale, valid: Optional[Array] = None,
                               positives: Optional[Array] = None) -> Array:
    """Per example, the symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3) over the batch:

        s_ij = e^τ cos(u_i, v_j),   ℓ_i = ½ [ -Σ_j p_ij log softmax_j(s_i·) - Σ_j p_ji log softmax_j(s_·i) ],

    u the image embeddings (B, D), v the text embeddings (B, D), τ the learned log inverse temperature
    (``logit_scale``), and p_i· the target distribution over the batch: one-hot on i, or uniform over the
    examples whose prompt is the same as i's when ``positives`` (B, B) bool says which (identical captions in a
    batch are not negatives of each other; the diagonal must be set). Examples with ``valid`` False (prompts
    dropped for classifier-free guidance) are neither anchors nor candidates: their ℓ is 0 and they appear in
    no softmax. Returns ℓ, shape (B,)."""
    u, v = l2_normalize(image_emb), l2_normalize(text_emb)
    b = u.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
    pos = jnp.eye(b, dtype=bool) if positives is None else positives.astype(bool)
    pair = valid[:, None] & valid[None, :]
    logits = jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * (u @ v.T)
    logits = jnp.where(pair, logits, -jnp.inf)
    target = jnp.where(pair & pos, 1.0, 0.0)
    target = target / jnp.maximum(jnp.sum(target, axis=1, keepdims=True), 1.0)
    target_t = jnp.where(pair & pos.T, 1.0, 0.0)
    target_t = target_t / jnp.maximum(jnp.sum(target_t, axis=1, keepdims=True), 1.0)

    def cross_entropy(lg, tg):  # rows of logits with -inf outside the valid pairs; rows of invalid anchors: 0
        safe = jnp.where(valid[:, None], lg, 0.0)
        logp = jax.nn.log_softmax(safe, axis=1)
        return -jnp.sum(jnp.where(tg > 0, tg * logp, 0.0), axis=1)

    per = 0.5 * (cross_entropy(logits, target) + cross_entropy(logits.T, target_t))
    return jnp.where(valid, per, 0.0)


def cosine_alignment_loss(image_emb: Array, text_emb: Array, valid: Optional[Array] = None) -> Array:
    """Per example, 1 - cos(u_i, v_i): the distance of each image embedding from its own prompt's (B,); 0 where
    ``valid`` is False."""
    per = 1.0 - jnp.sum(l2_normalize(image_emb) * l2_normalize(text_emb), axis=-1)
    return per if valid is None else jnp.where(valid.astype(bool), per, 0.0)


def alignment_weight(schedule: NoiseSchedule, t: Array, weighting: str = "alpha_cumprod") -> Array:
    """w(t) of the alignment term: ``none`` 1, or ``alpha_cumprod`` ᾱ_t = SNR / (1 + SNR), the fraction of
    x_t's variance that is signal: ~1 where x̂0 is recoverable, → 0 where it is not (pure noise)."""
    if weighting == "none":
        return jnp.ones(jnp.shape(t), jnp.float32)
    if weighting == "alpha_cumprod":
        return jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t]
    raise ValueError(f"config.alignment.weighting={weighting!r}: expected one of {', '.join(ALIGNMENT_WEIGHTINGS)}")


def same_prompt(token_ids: Array) -> Array:
    """(B, B) bool: whether examples i and j have the same token ids (the positives of
    :func:`contrastive_alignment_loss`)."""
    return jnp.all(token_ids[:, None, :] == token_ids[None, :, :], axis=-1)
