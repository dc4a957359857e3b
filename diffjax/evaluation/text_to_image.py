"""Text-to-image evaluation on a labelled dataset: a pipeline's images of every class, generated from prompts
in the dataset's caption wordings (or one's own), measured with the feature classifier
(:mod:`diffjax.evaluation.classifier`: conditioning accuracy, Fréchet distance against the test split and its
train↔test floor) and, with weights, FID and the CLIP score (:mod:`diffjax.evaluation.metrics`), optionally
along a sweep of guidance scales; and the same written where ``--mode=eval`` writes it
(:func:`write_text2image_evaluation`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from diffjax.data import describe_dataset, validate_data_config
from diffjax.data.captions import check_templates, class_prompts
from diffjax.evaluation.classifier import FeatureNet, load_split
from diffjax.evaluation.metrics import clip_score, feature_statistics, frechet_distance, inception_features
from diffjax.evaluation.report import write_frontier
from diffjax.loop import MetricWriter
from diffjax.models import inception
from diffjax.pixels import image_grid, save_image
from diffjax.pixels import to_uint8


def class_conditioned_prompts(info, images_per_class: int,
                              templates: Optional[Sequence[str]] = None) -> tuple[list[str], np.ndarray]:
    """Prompts for ``images_per_class`` images of each class, cycling through the caption templates (image j
    of class c uses template j mod T with c's canonical phrase), and their labels. ``templates``: wordings of
    one's own (e.g. held out from training) instead of the dataset's."""
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
        params = inception.load_pytorch_fid_weights(inception_weights)
        gen = feature_statistics(inception_features(images, params))
        real = feature_statistics(inception_features(to_uint8(test_images), params))
        metrics["fid"] = frechet_distance(gen, real)
    if clip_model:
        metrics["clip_score"] = clip_score(images, prompts, clip_model)
    return metrics, images, prompts


def check_guidance_scales(scales: Sequence, what: str = "guidance_scales") -> list[float]:
    """The guidance scales of a sweep as floats; a one-line ``ValueError`` unless each is finite and >= 0."""
    floats = [float(w) for w in scales]
    if any(not math.isfinite(w) or w < 0 for w in floats):
        raise ValueError(f"{what} must be finite numbers >= 0, got {','.join(map(str, scales))}")
    return floats


def check_tag(tag: str, what: str = "tag") -> str:
    """``tag`` names a folder (``eval/step_N_TAG``): letters, digits and ``- _ . =`` only (one-line ``ValueError``)."""
    if tag and not all(c.isalnum() or c in "-_.=" for c in tag):
        raise ValueError(f"{what}={tag!r}: use letters, digits and - _ . = only (it names a folder)")
    return tag


@dataclasses.dataclass(frozen=True)
class Text2ImageEvaluation:
    """What :func:`write_text2image_evaluation` measured and where it wrote it."""

    metrics: dict  # evaluate_text2image's metrics, the checkpoint step and the sampling settings used
    images: np.ndarray  # uint8 (N, H, W, C), images_per_class of each class in label order
    prompts: list[str]
    directory: str  # WORKDIR/eval/step_N[_TAG] (or eval/model[_TAG] for a model folder)
    frontier_paths: list[str]  # frontier.md (and frontier.png with matplotlib) of a guidance sweep; [] without

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.directory, "metrics.json")

    @property
    def grid_path(self) -> str:
        return os.path.join(self.directory, "grid.png")

    def summary_lines(self, name: str) -> list[str]:
        """What ``--mode=eval`` prints: the metrics of ``name`` (e.g. ``step 4``), the sweep, the files."""
        m = self.metrics
        lines = [f"{name}: conditioning accuracy {m['conditioning_accuracy']:.4f} "
                 f"(classifier on real test images {m['classifier_test_accuracy']:.4f}; relative "
                 f"{m['relative_conditioning_accuracy']:.4f}), Fréchet distance {m['fd']:.3f} "
                 f"(train-vs-test floor {m['fd_train_floor']:.3f})"
                 + (f", FID {m['fid']:.2f}" if "fid" in m else "")
                 + (f", CLIP score {m['clip_score']:.2f}" if "clip_score" in m else "")]
        lines += [f"frontier: {path}" for path in self.frontier_paths]
        lines += [f"  guidance {row['guidance_scale']:g}: relative accuracy "
                  f"{row['relative_conditioning_accuracy']:.4f}, Fréchet distance {row['fd']:.3f}"
                  for row in m.get("frontier", ())]
        lines.append(f"metrics: {self.metrics_path}; grid: {self.grid_path}")
        return lines


def write_text2image_evaluation(pipe, data_config, eval_config, workdir: str, *, tag: str = "", seed: int = 0,
                                guidance_scales: Sequence[float] = (), ema_sigma_rel: Optional[float] = None,
                                **generate_kwargs) -> Text2ImageEvaluation:
    """:func:`evaluate_text2image` of ``pipe`` on ``data_config``'s dataset with the settings of ``eval_config``
    (an experiment's ``evaluation`` section: classifier_workdir, images_per_class, batch_size,
    inception_weights, clip_model, prompt_templates), written where ``--mode=eval`` writes it:

    * ``WORKDIR/eval/step_N[_TAG]/metrics.json``: the metrics, the step, the sampling settings used (the
      ``generate_kwargs`` given, the pipeline's defaults for the others) and ``ema_sigma_rel`` when given;
    * ``grid.png`` beside it: one row per class, up to ten of its images; with ``guidance_scales``, the
      frontier's ``frontier.md`` and ``frontier.png`` (:func:`diffjax.evaluation.report.write_frontier`);
    * the float metrics and the grid as TensorBoard events in ``WORKDIR/tensorboard`` under ``eval[_TAG]/``.

    The inputs (tag, data config, classifier checkpoint, prompt wordings, scales) are checked, with one-line
    errors, before anything is generated.
    """
    check_tag(tag)
    data_config = validate_data_config(data_config)
    classifier = FeatureNet.from_checkpoint(eval_config.classifier_workdir)
    templates = tuple(eval_config.get("prompt_templates", ()))
    if templates:
        check_templates(templates, "config.evaluation.prompt_templates")
    scales = check_guidance_scales(guidance_scales)
    per_class = int(eval_config.images_per_class)
    metrics, images, prompts = evaluate_text2image(
        pipe, data_config, classifier, images_per_class=per_class, seed=seed, batch_size=int(eval_config.batch_size),
        inception_weights=eval_config.inception_weights, clip_model=eval_config.clip_model, guidance_scales=scales,
        prompt_templates=templates, **generate_kwargs)
    metrics.update(step=pipe.step, **_sampling_settings(pipe, generate_kwargs))
    if ema_sigma_rel is not None:
        metrics["ema_sigma_rel"] = ema_sigma_rel
    name = f"step_{pipe.step:06d}" if pipe.step is not None else "model"
    out = os.path.join(workdir, "eval", name + (f"_{tag}" if tag else ""))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    cols = min(per_class, 10)
    n_classes = len(images) // per_class
    grid_rows = images.reshape(n_classes, per_class, *images.shape[1:])[:, :cols]
    grid = image_grid(grid_rows.reshape(-1, *images.shape[1:]), rows=n_classes)
    save_image(grid, os.path.join(out, "grid.png"), scale=2)
    writer = MetricWriter(os.path.join(workdir, "tensorboard"))
    step = pipe.step or 0
    prefix = f"eval_{tag}/" if tag else "eval/"
    writer.write_scalars(step, {k: v for k, v in metrics.items() if isinstance(v, float)}, prefix=prefix)
    writer.write_image(step, prefix + "grid", grid)
    writer.close()
    frontier_paths = []
    if scales:
        title = (f"{metrics['sampler']}, {metrics['num_steps']} steps, schedule {metrics['guidance_schedule']}, "
                 f"interval {metrics['guidance_interval'] or 'all'}")
        frontier_paths = write_frontier(metrics["frontier"], metrics["fd_train_floor"], out, title)
    return Text2ImageEvaluation(metrics, images, prompts, out, frontier_paths)


def _sampling_settings(pipe, generate_kwargs: dict) -> dict:
    """The sampling settings ``pipe.generate(**generate_kwargs)`` used: those given, else the pipeline's."""
    kw, defaults = generate_kwargs, pipe.defaults
    return dict(sampler=kw.get("sampler") or defaults["sampler"],
                num_steps=kw.get("num_steps") or defaults["num_steps"],
                guidance_scale=kw.get("guidance_scale", defaults["guidance_scale"]),
                timestep_spacing=kw.get("timestep_spacing") or pipe.timestep_spacing,
                guidance_schedule=kw.get("guidance_schedule", defaults["guidance_schedule"]),
                guidance_interval=kw.get("guidance_interval", defaults["guidance_interval"]),
                alignment_guidance_scale=kw.get("alignment_guidance_scale", defaults["alignment_guidance_scale"]))
