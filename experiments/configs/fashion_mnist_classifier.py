"""The feature network of the Fashion-MNIST metrics (conditioning accuracy, Fréchet distance): a small CNN
(diffjax.models.classifier) trained for 3 epochs (minutes on 2 CPU cores; docs/standings.md).

    python -m experiments.main --mode=train_classifier --config=experiments/configs/fashion_mnist_classifier.py \
        --workdir=runs/fashion_mnist_classifier
"""

import ml_collections

from diffjax.data import default_data_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters and batch order

    config.data = default_data_config()  # the classifier's data: images and labels (captions unused)
    config.data.name = "fashion_mnist"
    config.data.image_size = 28
    config.data.channels = 1

    config.model = ml_collections.ConfigDict()
    config.model.num_classes = 10  # classes of the dataset
    config.model.channels = (32, 64)  # conv widths of the two stages (28 → 14 → 7)
    config.model.feature_dim = 128  # width of the feature layer (the Fréchet distance's space)
    config.model.norm_groups = 8  # GroupNorm groups
    config.model.dropout = 0.1  # dropout on the features during training

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128  # examples per step
    config.training.num_epochs = 3  # passes over the train split
    config.training.learning_rate = 3e-3  # peak AdamW learning rate (warmup, then cosine decay to 0)
    config.training.weight_decay = 1e-4  # AdamW decoupled weight decay
    config.training.label_smoothing = 0.1  # cross-entropy label smoothing
    return config
