"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", section 3).

Any EMA of the parameters is a weighted sum of the iterates: with θ_0 the initialisation, θ_{k+1} the
parameters after update k (``state.step = k`` before it) and d_k the decay used there,

    e_0 = θ_0,    e_{k+1} = d_k e_k + (1 - d_k) θ_{k+1}
    ⇒  e_n = Σ_{s=0..n} w_n(s) θ_s,   w_n(s) = (1 - d_{s-1}) Π_{k=s..n-1} d_k  (s ≥ 1),  w_n(0) = Π_{k<n} d_k.

``ema_profile`` computes w_n for any decay sequence (the configs' ``min(decay, (1 + k) / (10 + k))``, a
constant decay, or a power function).

The power-function EMA uses d_k = (1 - 1/(k + 1))^(γ + 1): its profile is w_n(s) ≈ (γ + 1) s^γ / n^(γ + 1), the
same shape at every n (an average over the last fraction of training, not over a fixed number of steps). Its
width relative to the length of training, σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))) (the standard deviation of
the density ∝ s^γ on [0, 1]), names it: Karras et al. found σ_rel around 0.05–0.15 best, and that the best value
depends on the model, the training length and the guidance scale.

Post-hoc: a run that saves snapshots of its parameters and EMA every few steps (``config.ema.snapshot_every``)
can build the power-function EMA of *any* σ_rel afterwards, as the linear combination Σ_i x_i θ^(i) of the
snapshots whose profiles best match the target's profile in least squares (``reconstruction_weights``, with Σ x_i
= 1 so that the result is an average). Sweeping σ_rel then costs evaluations only, not training runs. Profiles
assume every update was applied (a skipped update, ``training.on_nonfinite='skip'``, shifts them slightly).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.checkpoints import Checkpointer

SNAPSHOT_DIR = "ema_snapshots"  # under the run's workdir
SIGMA_REL_MAX = float(np.sqrt(1.0 / 12.0))  # γ = 0: the uniform average over all of training


def sigma_rel_of_gamma(gamma: float) -> float:
    """σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))), the relative width of the profile ∝ s^γ (Karras 2024, eq. 3)."""
    g = float(gamma)
    return float(np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0))))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ ≥ 0 whose power-function profile has relative width ``sigma_rel`` in (0, sqrt(1/12)]: the
    real root of (γ + 1) = σ² (γ + 2)² (γ + 3), i.e. σ² γ³ + 7σ² γ² + (16σ² - 1) γ + 12σ² - 1 = 0."""
    s2 = float(sigma_rel) ** 2
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX + 1e-12:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {SIGMA_REL_MAX:.4f}] (sqrt(1/12): the uniform "
                         f"average)")
    roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(max(real.max(), 0.0))  # σ_rel decreases with γ ≥ 0: one root there


def warmup_decays(num_updates: int, decay: float, warmup: bool) -> np.ndarray:
    """d_k for k = 0..num_updates-1 of ``train.ema_decay`` (float64 here)."""
    k = np.arange(num_updates, dtype=np.float64)
    return np.minimum(decay, (1.0 + k) / (10.0 + k)) if warmup else np.full(num_updates, float(decay))


def power_decays(num_updates: int, gamma: float) -> np.ndarray:
    """d_k = (1 - 1/(k + 1))^(γ + 1) for k = 0..num_updates-1 (d_0 = 0: the first update replaces θ_0)."""
    k = np.arange(num_updates, dtype=np.float64)
    return (1.0 - 1.0 / (k + 1.0)) ** (gamma + 1.0)


def config_gamma(config_ema) -> Optional[float]:
    """The power-function exponent γ of a run with ``config.ema``: None unless ``sigma_rel`` > 0."""
    sigma_rel = float(config_ema.get("sigma_rel", 0.0) or 0.0)
    return gamma_of_sigma_rel(sigma_rel) if sigma_rel > 0 else None


def ema_decays(config_ema, num_updates: int) -> np.ndarray:
    """The decays a run with ``config.ema`` used: a power function when ``sigma_rel`` > 0, else decay/warmup."""
    gamma = config_gamma(config_ema)
    if gamma is not None:
        return power_decays(num_updates, gamma)
    return warmup_decays(num_updates, float(config_ema["decay"]), bool(config_ema.get("warmup", True)))


def ema_profile(decays: np.ndarray) -> np.ndarray:
    """w_n(s), s = 0..n, of the EMA after n = len(decays) updates with these decays (sums to 1)."""
    d = np.asarray(decays, np.float64)
    n = d.shape[0]
    # suffix[s] = Π_{k=s..n-1} d_k, computed as a reversed cumulative product (suffix[n] = 1).
    suffix = np.ones(n + 1)
    suffix[:n] = np.cumprod(d[::-1])[::-1]
    w = np.empty(n + 1)
    w[0] = suffix[0]
    w[1:] = (1.0 - d) * suffix[1:]
    return w


def delta_profile(step: int, length: int) -> np.ndarray:
    """The raw parameters θ_step as a profile over s = 0..length-1."""
    w = np.zeros(length)
    w[step] = 1.0
    return w


def snapshot_profiles(steps: Sequence[int], decays: np.ndarray, target_step: int,
                      with_raw: bool = True) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """(P, names): row i of P is the profile over s = 0..target_step of snapshot i, the EMA saved at each step
    (and, ``with_raw``, the raw parameters), for a run whose update k used decay ``decays[k]``."""
    rows, names = [], []
    for step in steps:
        if step > target_step:
            continue
        ema = np.zeros(target_step + 1)
        ema[:step + 1] = ema_profile(decays[:step])
        rows.append(ema)
        names.append((int(step), "ema_params"))
        if with_raw:
            rows.append(delta_profile(step, target_step + 1))
            names.append((int(step), "params"))
    return np.stack(rows), names


def reconstruction_weights(profiles: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """(x, relative residual): the weights with Σ x_i = 1 that minimise ‖Σ_i x_i profiles[i] - target‖₂ (the
    Lagrangian's linear system, solved in least squares since nearby snapshots are nearly collinear), and
    ‖Σ_i x_i profiles[i] - target‖₂ / ‖target‖₂."""
    a = np.asarray(profiles, np.float64)
    p = np.asarray(target, np.float64)
    m = a.shape[0]
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = 2.0 * a @ a.T
    kkt[:m, m] = kkt[m, :m] = 1.0
    rhs = np.concatenate([2.0 * a @ p, [1.0]])
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    x = sol[:m]
    return x, float(np.linalg.norm(x @ a - p) / np.linalg.norm(p))


def plan(snapshot_steps: Sequence[int], config_ema, target_step: int, sigma_rel: float,
         with_raw: bool = True) -> tuple[list[tuple[int, str, float]], float]:
    """([(step, "ema_params" | "params", weight)], relative residual) that build the power-function EMA of width
    ``sigma_rel`` at ``target_step`` from the snapshots of a run with ``config_ema``."""
    if target_step not in snapshot_steps:
        raise FileNotFoundError(f"no EMA snapshot at step {target_step}; snapshots: "
                                f"{_describe_steps(sorted(snapshot_steps))}")
    decays = ema_decays(config_ema, target_step)
    profiles, names = snapshot_profiles(sorted(snapshot_steps), decays, target_step, with_raw)
    target = ema_profile(power_decays(target_step, gamma_of_sigma_rel(sigma_rel)))
    x, residual = reconstruction_weights(profiles, target)
    return [(step, which, float(w)) for (step, which), w in zip(names, x) if w != 0.0], residual


def _describe_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def reconstruct(workdir: str, step: int, sigma_rel: float, abstract_params: Any, config_ema,
                with_raw: bool = True) -> tuple[Any, float]:
    """(parameters, relative residual): the power-function EMA of width ``sigma_rel`` at ``step``, built from the
    snapshots in ``workdir/ema_snapshots`` (``config.ema.snapshot_every``). ``abstract_params`` is the subtree of
    ``TrainState.params`` to build (``jax.ShapeDtypeStruct`` leaves with their target shardings); the snapshots
    are read one at a time (only that subtree) and summed in float32."""
    directory = os.path.join(workdir, SNAPSHOT_DIR)
    snaps = Checkpointer.existing(directory)
    if snaps is None:
        raise FileNotFoundError(f"no EMA snapshots in {os.path.abspath(directory)} (train with "
                                f"config.ema.snapshot_every > 0 to build a post-hoc EMA)")
    try:
        weights, residual = plan(snaps.steps(), config_ema, int(step), float(sigma_rel), with_raw)
        by_step: dict[int, list[tuple[str, float]]] = {}
        for s, which, w in weights:
            by_step.setdefault(s, []).append((which, w))
        total = None
        for s, parts in sorted(by_step.items()):
            restored = snaps.restore_subtree({which: abstract_params for which, _ in parts}, s)
            for which, w in parts:
                term = jax.tree_util.tree_map(lambda x, w=w: jnp.float32(w) * x.astype(jnp.float32), restored[which])
                total = term if total is None else jax.tree_util.tree_map(jnp.add, total, term)
    finally:
        snaps.close()
    out = jax.tree_util.tree_map(lambda t, a: t.astype(a.dtype), total, abstract_params)
    return out, residual


def snapshot_state(state) -> dict:
    """What a snapshot saves of a TrainState: the trainable parameters and their EMA."""
    return {"params": state.params, "ema_params": state.ema_params}


def check_sigma_rel(sigma_rel: Optional[float], what: str) -> Optional[float]:
    """``sigma_rel`` if None or in (0, sqrt(1/12)], else a one-line ValueError naming ``what``."""
    if sigma_rel is None:
        return None
    if not (np.isfinite(sigma_rel) and 0.0 < sigma_rel <= SIGMA_REL_MAX):
        raise ValueError(f"{what}={sigma_rel} must be in (0, {SIGMA_REL_MAX:.4f}] (Karras et al. use 0.05-0.15)")
    return float(sigma_rel)
