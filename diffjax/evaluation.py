"""Quality metrics of generated images, computed in JAX.

* ``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule", eq. 6; Dowson & Landau 1982):

      FD = ‖μ₁ - μ₂‖² + tr Σ₁ + tr Σ₂ - 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.

  The cross term is computed from symmetric eigendecompositions in float64: Σ₁^{1/2} = V √Λ Vᵀ, and the
  trace of the square root of the symmetric PSD matrix M = Σ₁^{1/2} Σ₂ Σ₁^{1/2} is Σᵢ √λᵢ(M) (eigenvalues
  clipped at 0). It equals tr (Σ₁Σ₂)^{1/2} (same spectrum), but never takes the square root of a
  non-symmetric matrix, so there is no imaginary residue to discard and no ε-regularisation to tune.
* a feature network for the embedded data: ``ImageClassifier`` trained on Fashion-MNIST by
  ``train_classifier`` (own config, orbax checkpoint), giving the *conditioning accuracy* (the fraction of
  generated images classified as their prompt's class, also reported relative to the classifier's accuracy
  on real test images) and a Fréchet distance in its feature space against the test split, reported beside
  the floor of real training images against the same test split;
* ``inception_statistics`` (FID with the pytorch-fid Inception weights, when the user has them) and
  ``clip_score`` (Hessel et al. 2021: 100 · max(cos(E_image, E_text), 0), with any local or hub CLIP).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffjax.models.classifier import ImageClassifier
from diffjax.pixels import from_uint8, to_uint8


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
# Data as arrays.
# ------------------------------------------------------------------------------------------------------


def load_split(data_config, split: str, max_examples: Optional[int] = None, seed: int = 0,
               max_batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, H, W, C) in [-1, 1], labels int32 (N,)) of a labelled split: all of it in file
    order, or ``max_examples`` drawn at random (seeded)."""
    from diffjax.data import describe_dataset, make_dataset

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
        from diffjax.checkpoints import Checkpointer

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
    from diffjax.checkpoints import Checkpointer

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


# ------------------------------------------------------------------------------------------------------
# Inception FID and CLIP score (need weights the user provides).
# ------------------------------------------------------------------------------------------------------


def inception_features(images: np.ndarray, params: Any, batch_size: int = 50) -> np.ndarray:
    """2048-d pool3 features of the FID Inception-v3 (``diffjax.models.inception``) for uint8 images."""
    from diffjax.models import inception

    feats = []
    for s in range(0, len(images), batch_size):
        feats.append(np.asarray(inception.fid_features(params, np.asarray(images[s:s + batch_size]))))
    return np.concatenate(feats)


def clip_score(images: np.ndarray, prompts: Sequence[str], model: str, batch_size: int = 50) -> float:
    """CLIP score (Hessel et al. 2021) of uint8 images (N, H, W, C) against their prompts:
    mean over images of 100 · max(cos(E_I(image), E_T(prompt)), 0), with the Flax CLIP model and processor
    loaded from ``model`` (a local directory, or a hub id such as ``openai/clip-vit-base-patch32`` when online)."""
    from transformers import CLIPProcessor, FlaxCLIPModel

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


# ------------------------------------------------------------------------------------------------------
# Evaluating a text-to-image pipeline on a labelled dataset.
# ------------------------------------------------------------------------------------------------------


def class_conditioned_prompts(info, images_per_class: int,
                              templates: Optional[Sequence[str]] = None) -> tuple[list[str], np.ndarray]:
    """Prompts for ``images_per_class`` images of each class, cycling through the caption templates (image j
    of class c uses template j mod T with c's canonical phrase), and their labels. ``templates``: wordings of
    one's own (e.g. held out from training) instead of the dataset's."""
    from diffjax.data.captions import check_templates, class_prompts

    templates = check_templates(templates, "evaluation.prompt_templates") if templates else info.captioner.templates
    per_template = [class_prompts(t, templates=templates, phrases=info.captioner.phrases)
                    for t in range(len(templates))]
    prompts, labels = [], []
    for c in range(len(info.class_names)):
        for j in range(images_per_class):
            prompts.append(per_template[j % len(templates)][c])
            labels.append(c)
    return prompts, np.asarray(labels, np.int32)


def evaluate_text2image(pipe, data_config, classifier: FeatureNet, *, images_per_class: int = 50, seed: int = 0,
                        batch_size: int = 100, inception_weights: str = "", clip_model: str = "",
                        progress: bool = True, guidance_scales: Sequence[float] = (),
                        prompt_templates: Sequence[str] = (), **generate_kwargs) -> tuple[dict, np.ndarray, list[str]]:
    """Generate ``images_per_class`` images for every class of ``data_config`` and measure them.

    Returns (metrics, images uint8, prompts). Metrics: ``conditioning_accuracy`` (classifier's argmax equals
    the prompt's class), ``relative_conditioning_accuracy`` (divided by the classifier's accuracy on the
    real test split), ``per_class_accuracy``, ``fd`` (classifier features of the generated images vs the
    test split) and ``fd_train_floor`` (the same number of random real training images vs the test split),
    and when weights are given ``fid`` and ``clip_score``.

    ``guidance_scales``: also generate the same prompts from the same noise at each of these scales (one
    compiled sampler: the scale is traced) and add ``frontier``, one row per scale with its accuracy,
    relative accuracy and Fréchet distance: the accuracy–distance trade-off that guidance moves along.
    ``prompt_templates``: prompt wordings instead of the dataset's caption templates (e.g. held out from
    training, to measure how the conditioning generalises).
    """
    from diffjax.data import describe_dataset

    info = describe_dataset(data_config, data_config.eval_split)
    if info.class_names is None:
        raise ValueError(f"dataset {data_config.name!r} has no class labels: class-based evaluation needs them")
    prompts, labels = class_conditioned_prompts(info, images_per_class, prompt_templates)
    test_images, test_labels = load_split(data_config, data_config.eval_split)
    test_logits, test_feats = classifier.logits_and_features(test_images)
    real_acc = float(np.mean(np.argmax(test_logits, -1) == test_labels))
    test_stats = feature_statistics(test_feats)

    def measure(images):
        logits, feats = classifier.logits_and_features(images)
        pred = np.argmax(logits, -1)
        acc = float(np.mean(pred == labels))
        return pred, {"conditioning_accuracy": acc, "relative_conditioning_accuracy": acc / real_acc,
                      "fd": frechet_distance(feature_statistics(feats), test_stats)}

    images = pipe.generate(prompts, seed=seed, batch_size=batch_size, progress=progress, **generate_kwargs)
    pred, measured = measure(images)
    train_images, _ = load_split(data_config, data_config.train_split, max_examples=len(images), seed=seed + 1)
    _, train_feats = classifier.logits_and_features(train_images)
    metrics = {
        "num_images": len(images),
        "conditioning_accuracy": measured["conditioning_accuracy"],
        "classifier_test_accuracy": real_acc,
        "relative_conditioning_accuracy": measured["relative_conditioning_accuracy"],
        "per_class_accuracy": {name: float(np.mean(pred[labels == c] == c)) for c, name in enumerate(info.class_names)},
        "fd": measured["fd"],
        "fd_train_floor": frechet_distance(feature_statistics(train_feats), test_stats),
        "prompt_templates": list(prompt_templates or info.captioner.templates),
    }
    if guidance_scales:
        sweep = {k: v for k, v in generate_kwargs.items() if k != "guidance_scale"}
        main_scale = float(generate_kwargs.get("guidance_scale", pipe.defaults["guidance_scale"]))
        metrics["frontier"] = []
        for w in map(float, guidance_scales):
            if w != main_scale:  # the main scale's images are measured already
                at_w = pipe.generate(prompts, seed=seed, batch_size=batch_size, progress=progress, guidance_scale=w,
                                     **sweep)
            metrics["frontier"].append({"guidance_scale": w, **(measured if w == main_scale else measure(at_w)[1])})
    if inception_weights:
        from diffjax.models import inception

        params = inception.load_pytorch_fid_weights(inception_weights)
        gen = feature_statistics(inception_features(images, params))
        real = feature_statistics(inception_features(to_uint8(test_images), params))
        metrics["fid"] = frechet_distance(gen, real)
    if clip_model:
        metrics["clip_score"] = clip_score(images, prompts, clip_model)
    return metrics, images, prompts


def write_frontier(frontier: Sequence[dict], floor: float, directory: str, title: str = "") -> list[str]:
    """The guidance sweep of :func:`evaluate_text2image` as ``frontier.md`` (a table) and, with matplotlib,
    ``frontier.png`` (relative conditioning accuracy against Fréchet distance, one point per scale, the
    train↔test floor marked) in ``directory``; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    lines = ["| guidance scale | conditioning accuracy | relative | Fréchet distance | / floor |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for row in frontier:
        lines.append(f"| {row['guidance_scale']:g} | {row['conditioning_accuracy']:.4f} | "
                     f"{row['relative_conditioning_accuracy']:.4f} | {row['fd']:.3f} | {row['fd'] / floor:.2f} |")
    table = os.path.join(directory, "frontier.md")
    with open(table, "w") as f:
        f.write((f"{title}\n\n" if title else "") + f"train↔test floor of the Fréchet distance: {floor:.3f}\n\n"
                + "\n".join(lines) + "\n")
    plot = plot_frontiers({"": frontier}, floor, os.path.join(directory, "frontier.png"), title)
    return [table] + ([plot] if plot else [])


def plot_frontiers(curves: dict, floor: float, path: str, title: str = "") -> Optional[str]:
    """Relative conditioning accuracy against Fréchet distance, one curve per entry of ``curves`` (label → the
    rows of a guidance sweep, one point per scale), the train↔test floor marked, written as a PNG at ``path``;
    returns ``path``, or None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plot at %s", path)
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for label, rows in curves.items():
        fd = [r["fd"] for r in rows]
        acc = [r["relative_conditioning_accuracy"] for r in rows]
        ax.plot(fd, acc, "o-", label=label or None)
        for r, x, y in zip(rows, fd, acc):
            ax.annotate(f"w={r['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(floor, color="gray", linestyle="--", label=f"train↔test floor {floor:.2f}")
    ax.set_xlabel("Fréchet distance (classifier features)")
    ax.set_ylabel("relative conditioning accuracy")
    ax.set_title(title or "guidance sweep", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
