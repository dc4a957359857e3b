"""Input data: tfds builders (array_record, no TensorFlow) and the grain pipeline.

* :func:`make_dataset` - batches for training/evaluation from a ``data`` config
  (:func:`default_data_config` documents every key);
* :class:`CaptionedFashionMnist` - Fashion-MNIST from the local IDX files, captioned at load time;
* :class:`CaptionedImageFolder` - a folder of images plus a JSONL/CSV captions file;
* any labelled tfds dataset prepared as array_record, captioned from its class names;
* :mod:`diffjax.data.captions` - templates, class phrases and :func:`caption_for` for prompts.
"""

from diffjax.data.captions import (
    CLASS_NAMES,
    CLASS_PHRASES,
    DEFAULT_TEMPLATES,
    HELD_OUT_TEMPLATES,
    VARIED_TEMPLATES,
    LabelCaptioner,
    caption_for,
    class_prompts,
    format_caption,
)
from diffjax.data.fashion_mnist import CaptionedFashionMnist, prepare_fashion_mnist, read_idx, write_idx
from diffjax.data.image_folder import (
    CaptionedImageFolder,
    ImageFolderConfig,
    prepare_image_folder,
    read_captions_file,
)
from diffjax.data.input_pipeline import (
    DatasetSummary,
    default_data_config,
    describe_dataset,
    make_dataset,
    make_grain_dataset,
    validate_data_config,
)
from diffjax.data.sources import DataSource, load_source

__all__ = [
    "CLASS_NAMES",
    "CLASS_PHRASES",
    "CaptionedFashionMnist",
    "CaptionedImageFolder",
    "DEFAULT_TEMPLATES",
    "DataSource",
    "HELD_OUT_TEMPLATES",
    "DatasetSummary",
    "ImageFolderConfig",
    "LabelCaptioner",
    "VARIED_TEMPLATES",
    "caption_for",
    "class_prompts",
    "default_data_config",
    "describe_dataset",
    "format_caption",
    "load_source",
    "make_dataset",
    "make_grain_dataset",
    "prepare_fashion_mnist",
    "prepare_image_folder",
    "read_captions_file",
    "read_idx",
    "validate_data_config",
    "write_idx",
]
