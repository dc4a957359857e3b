"""Quality metrics of generated images, computed in JAX: the Fréchet distance, FID's Inception features and the
CLIP score. Pure functions of arrays (and, for FID and the CLIP score, weights the user provides).

* ``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule", eq. 6; Dowson & Landau 1982):

      FD = ‖μ₁ - μ₂‖² + tr Σ₁ + tr Σ₂ - 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.

  The cross term is computed from symmetric eigendecompositions in float64: Σ₁^{1/2} = V √Λ Vᵀ, and the
  trace of the square root of the symmetric PSD matrix M = Σ₁^{1/2} Σ₂ Σ₁^{1/2} is Σᵢ √λᵢ(M) (eigenvalues
  clipped at 0). It equals tr (Σ₁Σ₂)^{1/2} (same spectrum), but never takes the square root of a
  non-symmetric matrix, so there is no imaginary residue to discard and no ε-regularisation to tune.
* ``inception_features`` (FID with the pytorch-fid Inception weights, when the user has them) and
  ``clip_score`` (Hessel et al. 2021: 100 · max(cos(E_image, E_text), 0), with any local or hub CLIP).

The feature network of the Fashion-MNIST metrics is in :mod:`diffjax.evaluation.classifier`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import inception


# ------------------------------------------------------------------------------------------------------
# Fréchet distance.
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Mean (D,) and covariance (D, D) of N feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def feature_statistics(features) -> FeatureStatistics:
    """Mean and unbiased covariance (divisor N - 1, as numpy's ``cov``) of features (N, D), in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    with jax.enable_x64(True):
        x = jnp.asarray(f)
        mu = jnp.mean(x, axis=0)
        d = x - mu
        sigma = d.T @ d / (x.shape[0] - 1)
        return FeatureStatistics(np.asarray(mu), np.asarray(sigma), int(f.shape[0]))


def _sqrt_psd(a: jax.Array) -> jax.Array:
    w, v = jnp.linalg.eigh(a)
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FD between N(μ_a, Σ_a) and N(μ_b, Σ_b) (module docstring), float64."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    with jax.enable_x64(True):
        mu_a, mu_b = jnp.asarray(a.mu, jnp.float64), jnp.asarray(b.mu, jnp.float64)
        s_a = jnp.asarray(a.sigma, jnp.float64)
        s_b = jnp.asarray(b.sigma, jnp.float64)
        s_a, s_b = 0.5 * (s_a + s_a.T), 0.5 * (s_b + s_b.T)
        root_a = _sqrt_psd(s_a)
        m = root_a @ s_b @ root_a
        cross = jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(0.5 * (m + m.T)), 0.0)))
        fd = jnp.sum((mu_a - mu_b) ** 2) + jnp.trace(s_a) + jnp.trace(s_b) - 2.0 * cross
        return float(jnp.maximum(fd, 0.0))


# ------------------------------------------------------------------------------------------------------
# Inception FID and CLIP score (need weights the user provides).
# ------------------------------------------------------------------------------------------------------


def inception_features(images: np.ndarray, params: Any, batch_size: int = 50) -> np.ndarray:
    """2048-d pool3 features of the FID Inception-v3 (``diffjax.models.inception``) for uint8 images."""
    feats = []
    for s in range(0, len(images), batch_size):
        feats.append(np.asarray(inception.fid_features(params, np.asarray(images[s:s + batch_size]))))
    return np.concatenate(feats)


def clip_score(images: np.ndarray, prompts: Sequence[str], model: str, batch_size: int = 50) -> float:
    """CLIP score (Hessel et al. 2021) of uint8 images (N, H, W, C) against their prompts:
    mean over images of 100 · max(cos(E_I(image), E_T(prompt)), 0), with the Flax CLIP model and processor
    loaded from ``model`` (a local directory, or a hub id such as ``openai/clip-vit-base-patch32`` when online)."""
    from transformers import CLIPProcessor, FlaxCLIPModel  # heavy: loaded only when a CLIP score is asked for

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    clip = FlaxCLIPModel.from_pretrained(model)
    processor = CLIPProcessor.from_pretrained(model)
    max_length = int(clip.config.text_config.max_position_embeddings)

    @jax.jit  # one program per batch shape (transformers' Flax models otherwise run op by op)
    def scores_of(params, pixel_values, input_ids, attention_mask):
        e_i = clip.get_image_features(pixel_values=pixel_values, params=params)
        e_t = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, params=params)
        e_i = e_i / jnp.linalg.norm(e_i, axis=-1, keepdims=True)
        e_t = e_t / jnp.linalg.norm(e_t, axis=-1, keepdims=True)
        return 100.0 * jnp.maximum(jnp.sum(e_i * e_t, -1), 0.0)

    scores = []
    for s in range(0, len(images), batch_size):
        imgs = np.asarray(images[s:s + batch_size])
        if imgs.shape[-1] == 1:
            imgs = np.repeat(imgs, 3, axis=-1)
        inputs = processor(text=list(prompts[s:s + batch_size]), images=list(imgs), return_tensors="np",
                           padding="max_length", truncation=True, max_length=max_length)
        scores.append(np.asarray(scores_of(clip.params, inputs["pixel_values"], inputs["input_ids"],
                                           inputs["attention_mask"])))
    return float(np.mean(np.concatenate(scores)))
