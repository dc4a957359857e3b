"""A tfds builder for a user's own captioned images: a folder of images plus a captions file.

The captions file is either JSON Lines, one object per line::

    {"file": "cats/001.jpg", "caption": "a cat asleep on a sofa"}

or CSV (TSV for ``.tsv``) with a header naming the columns ``file,caption``.  (Hugging Face's
``metadata.jsonl`` names, ``file_name`` and ``text``, are accepted too.)  Paths are relative to
``images_dir`` (default: the captions file's directory).  Several rows may name the same image
(several captions: one example each).

Images of any size and mode are converted to grayscale or RGB (``channels``; transparency is
composited over white; EXIF orientation applied), their shorter side resized and center-cropped to
``image_size`` (or, with ``resize_mode="pad"``, padded/cropped without resampling) and stored as PNG.
Every row is checked before anything is written: a row naming a missing image raises a one-line
``FileNotFoundError`` with the captions file's line number.

The prepared data lives under ``<data_dir>/captioned_image_folder/<config name>/1.0.0``; the config
name combines the captions file's name, the resolution, the channels and a hash of the captions
file's contents and the options, so editing the captions file or changing the resolution builds a
new copy.  Changing image files in place is not detected: delete that directory to rebuild.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
import re

import tensorflow_datasets as tfds

from diffjax.data._builder import LocalBuilder, prepare_once
from diffjax.data.images import RESIZE_MODES, encode_png, fit_image, load_image

__all__ = ["CaptionRow", "CaptionedImageFolder", "ImageFolderConfig", "prepare_image_folder", "read_captions_file"]

_FILE_KEYS = ("file", "file_name", "image")
_CAPTION_KEYS = ("caption", "text")


@dataclasses.dataclass(frozen=True)
class CaptionRow:
    path: str  # absolute path of the image
    file: str  # as written in the captions file
    caption: str
    line: int  # line of the captions file (1-based)


def _pick(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in row:
            return row[key]
    return None


def read_captions_file(captions_file: str, images_dir: str | None = None) -> list[CaptionRow]:
    """Rows of a JSONL or CSV/TSV captions file, each image checked to exist.

    Raises a one-line ``FileNotFoundError``/``ValueError`` naming the file (and line) at the first
    problem: missing captions file, unreadable line, missing field, missing image.
    """
    captions_file = os.path.abspath(os.path.expanduser(captions_file))
    if not os.path.isfile(captions_file):
        raise FileNotFoundError(f"captions file {captions_file} does not exist (data.captions_file)")
    images_dir = os.path.abspath(os.path.expanduser(images_dir or os.path.dirname(captions_file)))
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"images directory {images_dir} does not exist (data.images_dir)")
    name = os.path.basename(captions_file)
    ext = os.path.splitext(captions_file)[1].lower()
    raw: list[tuple[int, dict]] = []
    with open(captions_file, encoding="utf-8-sig", newline="") as f:
        if ext in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            fields = reader.fieldnames or []
            if not any(k in fields for k in _FILE_KEYS) or not any(k in fields for k in _CAPTION_KEYS):
                raise ValueError(
                    f"{captions_file}:1: the header must name the columns 'file' and 'caption', got {fields}"
                )
            for row in reader:
                raw.append((reader.line_num, row))
        elif ext in (".jsonl", ".json", ".ndjson"):
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{captions_file}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{captions_file}:{line_no}: expected a JSON object with 'file' and 'caption'")
                raw.append((line_no, row))
        else:
            raise ValueError(f"captions file {captions_file} must end in .jsonl or .csv (or .tsv), got {ext!r}")
    rows = []
    for line_no, row in raw:
        file, caption = _pick(row, _FILE_KEYS), _pick(row, _CAPTION_KEYS)
        if not file:
            raise ValueError(f"{captions_file}:{line_no}: no image file ('file' field) in this row")
        if caption is None:
            raise ValueError(f"{captions_file}:{line_no}: no 'caption' field in this row")
        if not isinstance(caption, str):
            raise ValueError(f"{captions_file}:{line_no}: the caption must be a string, got {type(caption).__name__}")
        path = os.path.normpath(os.path.join(images_dir, os.path.expanduser(str(file))))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} line {line_no}: image {file!r} not found (looked for {path})")
        rows.append(CaptionRow(path=path, file=str(file), caption=caption, line=line_no))
    if not rows:
        raise ValueError(f"captions file {captions_file} has no rows")
    return rows


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """Where the images and captions are and how they are stored (see the module docstring)."""

    captions_file: str = ""
    images_dir: str = ""
    image_size: int = 64
    channels: int = 3
    resize_mode: str = "crop"

    @classmethod
    def create(
        cls, captions_file: str, images_dir: str | None = None, *, image_size: int = 64, channels: int = 3,
        resize_mode: str = "crop",
    ) -> "ImageFolderConfig":
        """A config named after the captions file, the options and a hash of the captions' contents."""
        captions_file = os.path.abspath(os.path.expanduser(captions_file))
        images_dir = os.path.abspath(os.path.expanduser(images_dir or os.path.dirname(captions_file)))
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"data.resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if int(image_size) <= 0:
            raise ValueError(f"data.image_size must be positive for an image folder, got {image_size}")
        digest = hashlib.sha256(f"{images_dir}\n{image_size}\n{channels}\n{resize_mode}\n".encode())
        if os.path.isfile(captions_file):
            with open(captions_file, "rb") as f:
                digest.update(f.read())
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.splitext(os.path.basename(captions_file))[0]).strip("_")
        name = f"{stem or 'captions'}_{image_size}px_{'rgb' if channels == 3 else 'gray'}_{digest.hexdigest()[:10]}"
        return cls(
            name=name,
            description=f"{captions_file} ({images_dir}) at {image_size}x{image_size}x{channels}",
            captions_file=captions_file,
            images_dir=images_dir,
            image_size=int(image_size),
            channels=int(channels),
            resize_mode=resize_mode,
        )


class CaptionedImageFolder(LocalBuilder):
    """Captioned images from a folder and a captions file, as array_record (one ``train`` split).

    Build it with ``config=ImageFolderConfig.create(captions_file, images_dir, image_size=...,
    channels=...)``; hold out data with tfds split slicing, e.g. ``train[:95%]`` / ``train[95%:]``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "image, caption, file."}

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        size, channels = (cfg.image_size, cfg.channels) if cfg is not None else (None, 3)
        return tfds.core.DatasetInfo(
            builder=self,
            description="A user's images with captions, resized and center-cropped.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, channels)),
                    "caption": tfds.features.Text(),
                    "file": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if cfg is None or not cfg.captions_file:
            raise ValueError("CaptionedImageFolder needs config=ImageFolderConfig.create(captions_file, ...)")
        rows = read_captions_file(cfg.captions_file, cfg.images_dir)  # all checked before writing
        return {"train": self._generate_examples(rows)}

    def _generate_examples(self, rows):
        cfg = self.builder_config

        def encode(row: CaptionRow):
            try:
                image = load_image(row.path, cfg.channels, cfg.image_size)
            except Exception as e:  # PIL's errors are long; keep one line naming the file
                raise ValueError(f"cannot read image {row.path} (captions line {row.line}): {e}") from None
            return encode_png(fit_image(image, cfg.image_size, cfg.resize_mode))

        # PIL releases the GIL while decoding and resizing: a few threads help with large photos.
        workers = min(8, (os.cpu_count() or 1) + 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(rows), 256):  # bounded: at most 256 encoded images wait
                chunk = rows[start : start + 256]
                for row, png in zip(chunk, pool.map(encode, chunk)):
                    yield f"{row.line:09d}", {"image": png, "caption": row.caption, "file": row.file}


def prepare_image_folder(
    captions_file: str,
    images_dir: str | None = None,
    *,
    data_dir: str | None = None,
    image_size: int = 64,
    channels: int = 3,
    resize_mode: str = "crop",
) -> CaptionedImageFolder:
    """The prepared builder for these captions and options, building it on first use.

    The captions file is read and every image checked before anything is written.
    """
    config = ImageFolderConfig.create(
        captions_file, images_dir, image_size=image_size, channels=channels, resize_mode=resize_mode
    )
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    make_builder = lambda: CaptionedImageFolder(config=config, data_dir=data_dir)  # noqa: E731
    builder = make_builder()
    if builder.is_prepared():
        return builder
    read_captions_file(config.captions_file, config.images_dir)  # fail before anything is written
    return prepare_once(make_builder, lambda: read_captions_file(config.captions_file, config.images_dir))
