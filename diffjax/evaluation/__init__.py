"""Evaluation of generated images, one job a module:

* :mod:`diffjax.evaluation.metrics` - the Fréchet distance, FID's Inception features and the CLIP score
  (functions of arrays);
* :mod:`diffjax.evaluation.classifier` - the feature classifier of the class-based metrics: its training
  (``--mode=train_classifier``), checkpoint and features, and labelled splits as arrays;
* :mod:`diffjax.evaluation.text_to_image` - a pipeline's images of every class measured (conditioning
  accuracy, Fréchet distance, FID, CLIP score, a guidance sweep), and written as ``--mode=eval`` writes them;
* :mod:`diffjax.evaluation.report` - the guidance sweep's table and plots.

"Evaluation" here is always of generated images. The held-out loss during training is ``Trainer.eval_step``
(:mod:`diffjax.train`), and the classifier's own accuracy is ``FeatureNet.accuracy``.

The modules' public names are re-exported here, so that ``from diffjax import evaluation`` then
``evaluation.frechet_distance`` (or ``evaluation.write_text2image_evaluation``) works as well as importing
from the module; importing any of them imports the package, and with it every module above.
"""

from diffjax.evaluation.classifier import FeatureNet, classifier_from_config, load_split, train_classifier
from diffjax.evaluation.metrics import (
    FeatureStatistics,
    clip_score,
    feature_statistics,
    frechet_distance,
    inception_features,
)
from diffjax.evaluation.report import plot_frontiers, write_frontier
from diffjax.evaluation.text_to_image import (
    Text2ImageEvaluation,
    check_guidance_scales,
    check_tag,
    class_conditioned_prompts,
    evaluate_text2image,
    write_text2image_evaluation,
)

__all__ = [
    "FeatureNet",
    "FeatureStatistics",
    "Text2ImageEvaluation",
    "check_guidance_scales",
    "check_tag",
    "class_conditioned_prompts",
    "classifier_from_config",
    "clip_score",
    "evaluate_text2image",
    "feature_statistics",
    "frechet_distance",
    "inception_features",
    "load_split",
    "plot_frontiers",
    "train_classifier",
    "write_frontier",
    "write_text2image_evaluation",
]
