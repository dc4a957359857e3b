"""Random-access sources for the input pipeline: which dataset ``data.name`` means and where it is.

``data.name`` selects one of three kinds of dataset, all read through tfds's array_record data
sources (random access, no TensorFlow):

* ``"fashion_mnist"``: the captioned Fashion-MNIST builder (:mod:`diffjax.data.fashion_mnist`),
  prepared from the local IDX files on first use;
* ``"image_folder"``: a user's images and captions file (:mod:`diffjax.data.image_folder`),
  prepared on first use;
* any other name (``"cifar10"``, ``"mnist"``, ``"oxford_flowers102"``, ``"my_ds/config:1.0.0"``; a
  ``"tfds:"`` prefix forces this reading, e.g. ``"tfds:fashion_mnist"`` for tfds's own builder): a
  labelled tfds dataset already prepared in array_record format under ``data.data_dir``, captioned
  from its class names (``info.features[label_key].names``) with the caption templates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from diffjax.data.captions import CLASS_PHRASES, LabelCaptioner, phrases_from_names
from diffjax.data.fashion_mnist import prepare_fashion_mnist
from diffjax.data.image_folder import prepare_image_folder
from diffjax.data.images import fit_image, set_channels

__all__ = ["DataSource", "InMemorySource", "as_text", "load_source", "split_names"]

log = logging.getLogger(__name__)

_PREPARE_HINT = (
    "prepare it in array_record format first, e.g. `tfds build {name} --data_dir={dir} "
    "--file_format=array_record`, or set data.data_dir to where it is"
)


@dataclasses.dataclass
class DataSource:
    """A random-access source of records and what the pipeline needs to know about it."""

    source: Any  # len() and [i] -> dict of numpy values (tfds ArrayRecordDataSource or InMemorySource)
    name: str  # the dataset, as configured
    split: str
    image_key: str
    label_key: str | None  # None: no labels (image folders)
    caption_key: str | None  # records carry their caption (image folders)
    captioner: LabelCaptioner | None  # label -> caption (labelled datasets)
    class_names: tuple[str, ...] | None
    image_shape: tuple[int, int, int]  # (H, W, C) of the pipeline's images
    resize_mode: str
    data_dir: str  # where the prepared dataset is
    latents: bool = False  # records are an autoencoder's posterior moments (diffjax.data.latents), not images

    def __len__(self) -> int:
        return len(self.source)


class InMemorySource:
    """A split decoded once into numpy arrays (images already at the pipeline's size)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, captions: Sequence[str] | None,
                 image_key: str = "image", label_key: str | None = "label", caption_key: str | None = None):
        self.images, self.labels, self.captions = images, labels, captions
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        record = {self.image_key: self.images[index]}
        if self.labels is not None:
            record[self.label_key] = self.labels[index]
        if self.captions is not None:
            record[self.caption_key] = self.captions[index]
        return record

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"InMemorySource({len(self)} images of shape {self.images.shape[1:]})"


def _data_dir(config) -> str | None:
    return os.path.expanduser(config.data_dir) if config.data_dir else None


def split_names(split: str) -> list[str]:
    """The base split names of a tfds split string: ``"train[:95%]+test"`` -> ``["train", "test"]``."""
    return [re.match(r"\s*([\w\-]+)", part).group(1) for part in split.split("+") if re.match(r"\s*[\w\-]+", part)]


def _check_split(builder, name: str, split: str) -> None:
    available = list(builder.info.splits.keys())
    for base in split_names(split) or [split]:
        if base not in available:
            raise ValueError(
                f"split {split!r} is not in dataset {name!r} (data.name); available splits: {', '.join(available)}"
            )


def _data_source(builder, name: str, split: str):
    _check_split(builder, name, split)
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:  # prepared as tfrecord: random access needs array_record/parquet
        raise ValueError(
            f"tfds dataset {name!r} in {builder.data_dir} is stored as tfrecord, which tfds.data_source cannot "
            f"read: rebuild it with --file_format=array_record (or `tfds convert_format`)"
        ) from None


def _prepared_tfds_builder(name: str, data_dir: str | None):
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"dataset directory {data_dir} (data.data_dir) does not exist; "
            + _PREPARE_HINT.format(name=name, dir=data_dir)
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        where = data_dir or "the default tfds data directory"
        raise ValueError(
            f"unknown dataset {name!r} (data.name): use 'fashion_mnist', 'image_folder' or a tfds dataset "
            f"name prepared in {where}"
        ) from None
    except Exception as e:  # pylint: disable=broad-except
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot open tfds dataset {name!r} (data.name) in {data_dir}: {text}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir_root} (no {builder.data_dir}); "
            + _PREPARE_HINT.format(name=name, dir=builder.data_dir_root)
        )
    return builder


def _native_shape(feature) -> tuple:
    shape = tuple(feature.shape)
    if len(shape) == 2:
        shape = shape + (1,)
    return shape


def _target_shape(config, native: tuple, name: str) -> tuple[int, int, int]:
    size, channels = int(config.image_size), int(config.channels)
    if size <= 0:
        h, w = native[0], native[1]
        if h is None or w is None or h != w:
            raise ValueError(
                f"data.image_size=0 keeps the native size, but {name!r} images are {native[:2]} "
                f"(not fixed and square): set data.image_size"
            )
        size = h
    if channels <= 0:
        channels = native[2] if native[2] in (1, 3) else 3
    return size, size, channels


def load_source(config, split: str) -> DataSource:
    """The random-access source of ``split`` for a ``data`` config, preparing the dataset if needed.

    Raises one-line errors for an unknown ``data.name``, a missing or unprepared dataset directory,
    missing IDX files, a captions file naming a missing image, or an unknown split.
    """
    name = str(config.name)
    data_dir = _data_dir(config)
    if name == "fashion_mnist":
        builder = prepare_fashion_mnist(
            data_dir, idx_dir=config.manual_dir or None, allow_download=bool(config.allow_download)
        )
        phrases = config.class_names or CLASS_PHRASES
        kind = dict(image_key="image", label_key="label", caption_key=None, class_names=tuple(
            builder.info.features["label"].names))
    elif name == "image_folder":
        if not config.captions_file:
            raise ValueError("data.name='image_folder' needs data.captions_file (a .jsonl or .csv file)")
        builder = prepare_image_folder(
            config.captions_file,
            config.images_dir or None,
            data_dir=data_dir,
            image_size=int(config.image_size),
            channels=int(config.channels) or 3,
            resize_mode=str(config.resize_mode),
        )
        phrases = None
        kind = dict(image_key="image", label_key=None, caption_key="caption", class_names=None)
    else:
        tfds_name = name[len("tfds:") :] if name.startswith("tfds:") else name
        builder = _prepared_tfds_builder(tfds_name, data_dir)
        features = builder.info.features
        image_key, label_key = str(config.image_key), str(config.label_key)
        if image_key not in features:
            raise ValueError(
                f"dataset {tfds_name!r} has no feature {image_key!r} (data.image_key); features: {', '.join(features)}"
            )
        label_feature = features[label_key] if label_key in features else None
        names = getattr(label_feature, "names", None)
        if label_feature is None or not (names or config.class_names):
            raise ValueError(
                f"dataset {tfds_name!r} has no class-label feature {label_key!r} (data.label_key) with names; "
                f"features: {', '.join(features)}"
            )
        class_names = tuple(names) if names else tuple(str(c) for c in config.class_names)
        phrases = config.class_names or phrases_from_names(class_names)
        kind = dict(image_key=image_key, label_key=label_key, caption_key=None, class_names=class_names)
    source = _data_source(builder, name, split)
    native = _native_shape(builder.info.features[kind["image_key"]])
    captioner = None
    if phrases is not None:
        captioner = LabelCaptioner(phrases, tuple(config.caption_templates))
        if kind["class_names"] is not None and captioner.num_classes != len(kind["class_names"]):
            raise ValueError(
                f"data.class_names has {captioner.num_classes} entries but {name!r} has "
                f"{len(kind['class_names'])} classes"
            )
    ds = DataSource(
        source=source,
        name=name,
        split=split,
        captioner=captioner,
        image_shape=_target_shape(config, native, name),
        resize_mode=str(config.resize_mode),
        data_dir=str(builder.data_dir),
        **kind,
    )
    limit = int(config.cache_max_mb) * 2**20
    if limit > 0 and len(ds) * int(np.prod(ds.image_shape)) <= limit:
        ds.source = _in_memory(ds)
    return ds


def _cache_path(ds: DataSource) -> str:
    h, w, c = ds.image_shape
    key = hashlib.sha1(f"{ds.split}|{ds.image_key}|{ds.label_key}|{ds.caption_key}".encode()).hexdigest()[:8]
    split = re.sub(r"[^A-Za-z0-9]+", "_", ds.split).strip("_")
    return os.path.join(ds.data_dir, "diffjax_decoded", f"{split}-{key}-{h}x{w}x{c}-{ds.resize_mode}.npz")


def _in_memory(ds: DataSource) -> InMemorySource:
    """The split decoded into memory, from the copy kept beside the prepared dataset when there is
    one (``<dataset dir>/diffjax_decoded/*.npz``, written on first use where the directory is
    writable; it goes when the dataset directory is deleted)."""
    path = _cache_path(ds)
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                images = f["images"]
                labels = f["labels"] if "labels" in f else None
                captions = [str(c) for c in f["captions"]] if "captions" in f else None
            if len(images) == len(ds.source) and images.shape[1:] == tuple(ds.image_shape):
                return InMemorySource(images, labels, captions, ds.image_key, ds.label_key, ds.caption_key)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale: decode again
    cached = _decode_to_memory(ds)
    arrays = {"images": cached.images}
    if cached.labels is not None:
        arrays["labels"] = cached.labels
    if cached.captions is not None:
        arrays["captions"] = np.array(cached.captions, dtype=str)
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:  # read-only dataset directory: keep it in memory only
        log.info("not keeping a decoded copy at %s: %s", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return cached


def _decode_to_memory(ds: DataSource, chunk: int = 1024) -> InMemorySource:
    """Decode every record once, images fitted to the pipeline's shape (see ``data.cache_max_mb``)."""
    start = time.perf_counter()
    n = len(ds.source)
    images = np.empty((n, *ds.image_shape), np.uint8)
    labels = np.empty((n,), np.int32) if ds.label_key else None
    captions = [] if ds.caption_key else None
    getitems = getattr(ds.source, "__getitems__", None)
    for lo in range(0, n, chunk):
        indices = list(range(lo, min(n, lo + chunk)))
        records = getitems(indices) if getitems else [ds.source[i] for i in indices]
        for i, record in zip(indices, records):
            images[i] = prepare_image(record[ds.image_key], ds.image_shape, ds.resize_mode)
            if labels is not None:
                labels[i] = record[ds.label_key]
            if captions is not None:
                captions.append(as_text(record[ds.caption_key]))
    log.info("decoded %s[%s] (%d images) into memory in %.1fs", ds.name, ds.split, n, time.perf_counter() - start)
    return InMemorySource(images, labels, captions, ds.image_key, ds.label_key, ds.caption_key)


def prepare_image(image: np.ndarray, shape: tuple[int, int, int], resize_mode: str) -> np.ndarray:
    """A decoded uint8 image brought to ``shape`` (H, W, C): channels, then size (see ``fit_image``)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    image = set_channels(image, shape[2])
    if image.shape != shape:
        image = fit_image(image, shape[0], resize_mode)
    return image


def as_text(value) -> str:
    """A caption field as ``str``: tfds text features come back as bytes or 0-d object arrays."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        value = value.item()
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return str(value)
