"""The feature network of the class-based metrics: an ``ImageClassifier`` trained on a labelled dataset
(Fashion-MNIST) by :func:`train_classifier` (its own config, AdamW, an orbax checkpoint), and read back as a
:class:`FeatureNet` whose logits give the *conditioning accuracy* of generated images and whose features give a
Fréchet distance (:mod:`diffjax.evaluation.metrics`). :func:`load_split` reads a labelled split as arrays, for
the training here and for the real images the text-to-image evaluation compares against.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffjax.checkpoints import Checkpointer
from diffjax.data import describe_dataset, make_dataset
from diffjax.models.classifier import ImageClassifier
from diffjax.pixels import from_uint8


def load_split(data_config, split: str, max_examples: Optional[int] = None, seed: int = 0,
               max_batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, H, W, C) in [-1, 1], labels int32 (N,)) of a labelled split: all of it in file
    order, or ``max_examples`` drawn at random (seeded)."""
    n_total = describe_dataset(data_config, split).num_examples
    batch_size = max(d for d in range(1, min(max_batch, n_total) + 1) if n_total % d == 0)  # drop nothing
    it = make_dataset(data_config, None, split=split, global_batch_size=batch_size, seed=seed, process_index=0,
                      process_count=1, shuffle=max_examples is not None, num_epochs=1)
    images, labels, n = [], [], 0
    for batch in it:
        if "label" not in batch:
            raise ValueError(f"dataset {data_config.name!r} has no labels: class-based metrics need a labelled one")
        images.append(batch["image"])
        labels.append(batch["label"])
        n += len(batch["label"])
        if max_examples is not None and n >= max_examples:
            break
    images, labels = np.concatenate(images), np.concatenate(labels)
    return (images[:max_examples], labels[:max_examples]) if max_examples else (images, labels)


# ------------------------------------------------------------------------------------------------------
# The classifier: training, checkpoint, features.
# ------------------------------------------------------------------------------------------------------


def classifier_from_config(model_config) -> ImageClassifier:
    """The ``ImageClassifier`` of a classifier config's ``model`` section."""
    m = model_config
    return ImageClassifier(num_classes=int(m.num_classes), channels=tuple(m.channels), feature_dim=int(m.feature_dim),
                           norm_groups=int(m.norm_groups), dropout=float(m.dropout))


@dataclasses.dataclass
class FeatureNet:
    """A trained classifier as a feature network: ``logits_and_features(images)`` in batches (jitted)."""

    model: ImageClassifier
    params: Any
    config: ml_collections.ConfigDict
    test_accuracy: Optional[float] = None

    def __post_init__(self):
        self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

    def logits_and_features(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """images uint8 [0, 255] or float [-1, 1], (N, H, W, C) → (logits (N, K), features (N, D))."""
        x = np.asarray(images)
        x = from_uint8(x) if x.dtype == np.uint8 else x.astype(np.float32)
        logits, feats = [], []
        for s in range(0, len(x), batch_size):
            chunk = x[s:s + batch_size]
            pad = batch_size - len(chunk) if len(x) > batch_size else 0  # one compiled shape
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            lg, ft = self._apply(self.params, chunk)
            logits.append(np.asarray(lg)[: len(chunk) - pad])
            feats.append(np.asarray(ft)[: len(chunk) - pad])
        return np.concatenate(logits), np.concatenate(feats)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        logits, _ = self.logits_and_features(images)
        return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))

    @classmethod
    def from_checkpoint(cls, workdir: str) -> "FeatureNet":
        """The classifier trained by ``train_classifier`` into ``workdir``."""
        ckpt_dir = os.path.join(workdir, "checkpoints")
        ckpt = Checkpointer.existing(ckpt_dir)
        if ckpt is None:
            raise FileNotFoundError(f"no classifier checkpoint in {os.path.abspath(ckpt_dir)} (train one with "
                                    f"--mode=train_classifier --config=experiments/configs/fashion_mnist_classifier.py)")
        config = ml_collections.ConfigDict(ckpt.restore_config())
        model = classifier_from_config(config.model)
        shape = (1, int(config.data.image_size), int(config.data.image_size), int(config.data.channels))
        abstract = jax.eval_shape(lambda: {"params": model.init(jax.random.PRNGKey(0), jnp.zeros(shape))["params"]})
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
        state, _, _ = ckpt.restore(abstract)
        ckpt.close()
        acc = None
        metrics_path = os.path.join(workdir, "metrics.json")
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                acc = json.load(f).get("test_accuracy")
        return cls(model, state["params"], config, acc)


def train_classifier(config: ml_collections.ConfigDict, workdir: str) -> FeatureNet:
    """Train ``ImageClassifier`` on ``config.data``'s train split (AdamW, cosine decay, cross-entropy with
    label smoothing), report the test-split accuracy, and save params + config (orbax) and
    ``metrics.json`` in ``workdir``."""
    tc = config.training
    model = classifier_from_config(config.model)
    images, labels = load_split(config.data, config.data.train_split)
    n, bs = len(images), int(tc.batch_size)
    steps_per_epoch = n // bs
    total = steps_per_epoch * int(tc.num_epochs)
    lr = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, min(100, total // 10), total)
    tx = optax.adamw(lr, weight_decay=tc.weight_decay)
    rng = jax.random.PRNGKey(config.seed)
    params = model.init(rng, jnp.asarray(images[:1]))["params"]
    opt_state = tx.init(params)
    k = int(config.model.num_classes)

    @jax.jit
    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            target = optax.smooth_labels(jax.nn.one_hot(y, k), tc.label_smoothing)
            return optax.softmax_cross_entropy(logits, target).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    perm_rng = np.random.default_rng(config.seed)
    i = 0
    for epoch in range(int(tc.num_epochs)):
        perm = perm_rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            params, opt_state, loss = step(params, opt_state, images[idx], labels[idx], jax.random.fold_in(rng, i))
            i += 1
        logging.info("classifier epoch %d: loss %.4f", epoch + 1, float(loss))
    net = FeatureNet(model, params, config)
    test_images, test_labels = load_split(config.data, config.data.eval_split)
    net.test_accuracy = net.accuracy(test_images, test_labels)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
    ckpt.save(total, {"params": params}, None, config, force=True)
    ckpt.close()
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump({"test_accuracy": net.test_accuracy, "steps": total, "final_loss": float(loss)}, f, indent=1)
    logging.info("classifier test accuracy %.4f (%s)", net.test_accuracy, config.data.eval_split)
    return net
