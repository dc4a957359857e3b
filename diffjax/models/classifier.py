"""A small convolutional image classifier: the feature network of the embedded data's quality metrics.

Stages of 3×3 conv → GroupNorm → SiLU → 2×2 average pool, then a dense layer whose activations
are the *features* (the role Inception-v3's pool3 plays in FID, Heusel et al. 2017) and a linear layer to
the class logits. On Fashion-MNIST (28×28) it is trained by ``diffjax.evaluation.train_classifier`` in a
couple of minutes on two CPU cores (4.2M multiply-adds per 28×28 image with the default widths).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.layers import conv_general_dilated


class ImageClassifier(nn.Module):
    """``apply(params, images) -> (logits (B, num_classes), features (B, feature_dim))``; images in [-1, 1]."""

    num_classes: int = 10
    channels: Sequence[int] = (32, 64)
    feature_dim: int = 128
    norm_groups: int = 8
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        h = jnp.asarray(x, jnp.float32)
        for ch in self.channels:
            h = nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=conv_general_dilated())(h)
            h = nn.silu(nn.GroupNorm(num_groups=min(self.norm_groups, ch))(h))
            h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        features = nn.silu(nn.Dense(self.feature_dim)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(features)
        return nn.Dense(self.num_classes)(h), features
