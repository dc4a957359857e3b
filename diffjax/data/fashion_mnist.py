"""Captioned Fashion-MNIST as a tfds builder (array_record), built from the original IDX files.

The IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) are read from a local directory:
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package) unless
``idx_dir`` (``data.manual_dir``) names another.  They are downloaded from the official URLs only
when absent *and* ``allow_download=True``.

Each example stores ``image`` (28x28x1 uint8, PNG-encoded with PIL: tfds's numpy encoder needs
TensorFlow), ``label`` (``ClassLabel`` with :data:`CLASS_NAMES`) and ``index`` (the example's
position in the IDX file).  Captions are not stored: the input pipeline picks one per example at
load time from the label, with a seeded RNG, from templates x class phrases
(:mod:`diffjax.data.captions`), so the wording varies and can change without a rebuild::

    builder = prepare_fashion_mnist(data_dir="~/tensorflow_datasets")   # written the first time only
    source = builder.as_data_source(split="train")                       # random access, no TF
    source[0]  # {"image": uint8 (28, 28, 1), "label": 9, "index": ...}
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import urllib.request

import numpy as np
import tensorflow_datasets as tfds

from diffjax.data._builder import LocalBuilder, prepare_once
from diffjax.data.captions import CLASS_NAMES
from diffjax.data.images import encode_png

__all__ = [
    "DEFAULT_IDX_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_URL",
    "CaptionedFashionMnist",
    "find_idx_files",
    "prepare_fashion_mnist",
    "read_idx",
    "write_idx",
]

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = (
    "install them with `apt-get install dataset-fashion-mnist`, set data.manual_dir to a directory "
    "holding them, or set data.allow_download=True"
)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes are used by (Fashion-)MNIST.
_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip'ed or not) as a uint8 array of its stored shape."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX element type 0x{dtype_code:02x} is not supported (only unsigned bytes)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says shape {shape} but holds {body.size} bytes (truncated?)")
    return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzip'ed when ``path`` ends in ``.gz`` (tests use this)."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _missing_files(directory: str) -> list[str]:
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    return [n for n in names if not os.path.isfile(os.path.join(directory, n))]


def _download(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name in _missing_files(directory):
        url = FASHION_MNIST_URL + name
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, out)
            read_idx(tmp)  # a truncated or non-IDX download fails here, before it takes the name
            os.replace(tmp, os.path.join(directory, name))
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise OSError(f"could not download Fashion-MNIST file {url}: {e}") from None


def find_idx_files(idx_dir: str | None = None, *, allow_download: bool = False, download_dir: str | None = None) -> str:
    """The directory holding the four Fashion-MNIST IDX files.

    Looks in ``idx_dir`` (default :data:`DEFAULT_IDX_DIR`).  When files are missing and
    ``allow_download`` is set, downloads them into ``idx_dir`` if writable, else ``download_dir``;
    otherwise raises a one-line ``FileNotFoundError`` naming the directory and the fix.
    """
    directory = os.path.abspath(os.path.expanduser(idx_dir or DEFAULT_IDX_DIR))
    missing = _missing_files(directory)
    if not missing:
        return directory
    if download_dir is not None:
        download_dir = os.path.abspath(os.path.expanduser(download_dir))
        if not _missing_files(download_dir):
            return download_dir
    if not allow_download:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {directory} (missing {', '.join(missing)}): {_INSTALL_HINT}"
        )
    target = directory
    if download_dir is not None and not _writable(directory):
        target = download_dir
    _download(target)
    return target


def _writable(directory: str) -> bool:
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return os.access(probe, os.W_OK)


class CaptionedFashionMnist(LocalBuilder):
    """Fashion-MNIST (Xiao et al., 2017) with labels for captioning; written as array_record.

    Constructor options beyond tfds's: ``idx_dir`` (where the IDX files are; default
    :data:`DEFAULT_IDX_DIR`) and ``allow_download`` (fetch missing IDX files from the official URLs).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Image, label and IDX index; captions are chosen at load time."}

    def __init__(self, *, idx_dir: str | None = None, allow_download: bool = False, **kwargs):
        self._idx_dir = idx_dir
        self._allow_download = allow_download
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST 28x28 grayscale clothing images with class labels; "
            "diffjax captions them from templates at load time.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation="@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for "
            "Benchmarking Machine Learning Algorithms}, author={Xiao, Han and Rasul, Kashif and "
            "Vollgraf, Roland}, journal={arXiv:1708.07747}, year={2017}}",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the IDX files are local (or fetched by find_idx_files)
        directory = find_idx_files(
            self._idx_dir,
            allow_download=self._allow_download,
            download_dir=os.path.join(str(self.data_dir_root), "downloads", "fashion_mnist"),
        )
        return {
            split: self._generate_examples(os.path.join(directory, images), os.path.join(directory, labels))
            for split, (images, labels) in FASHION_MNIST_FILES.items()
        }

    def _generate_examples(self, images_path: str, labels_path: str):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{images_path} and {labels_path} do not hold N images and N labels "
                f"(shapes {images.shape} and {labels.shape})"
            )
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"{labels_path} holds label {labels.max()}, Fashion-MNIST has {len(CLASS_NAMES)} classes")
        for i in range(len(images)):
            yield i, {"image": encode_png(images[i]), "label": int(labels[i]), "index": i}


def prepare_fashion_mnist(
    data_dir: str | None = None, *, idx_dir: str | None = None, allow_download: bool = False
) -> CaptionedFashionMnist:
    """The prepared builder, building it (array_record, both splits) on first use.

    The IDX files are located (or the one-line error raised) before anything is written.
    """
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
    found = {"dir": idx_dir}

    def make_builder():
        return CaptionedFashionMnist(data_dir=data_dir, idx_dir=found["dir"], allow_download=allow_download)

    builder = make_builder()
    if builder.is_prepared():
        return builder
    download_dir = os.path.join(str(builder.data_dir_root), "downloads", "fashion_mnist")

    def locate_idx_files():  # the one-line error comes before anything is written
        found["dir"] = find_idx_files(idx_dir, allow_download=allow_download, download_dir=download_dir)

    locate_idx_files()
    return prepare_once(make_builder, locate_idx_files)
