"""A tfds ``GeneratorBasedBuilder`` base for builders that live inside diffjax (array_record)."""

from __future__ import annotations

import fcntl
import inspect
import os
from typing import Callable

import tensorflow_datasets as tfds
from etils import epath


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of diffjax's builders: array_record files by default, no checksums file.

    tfds 4.9.10 locates a builder's checksums file through ``code_path``, which for a class defined
    in an installed package needs the ``importlib_resources`` backport (declared by tfds only for
    Python < 3.9).  diffjax's builders download nothing through tfds, so the plain source path is
    enough and the backport is not needed.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:  # pytype: disable=signature-mismatch
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)


def prepare_once(
    make_builder: Callable[[], tfds.core.DatasetBuilder], before_writing: Callable[[], None] = lambda: None
):
    """``make_builder()``, prepared (array_record) unless it already is.

    Several local processes (e.g. a multi-process run on one host) may call this at once: a lock
    file in the data directory lets one of them build while the others wait, then they reopen the
    finished dataset.  ``before_writing`` runs (under the lock) just before a build starts, for
    checks that must fail before anything is written.
    """
    builder = make_builder()
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{builder.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            builder = make_builder()  # another process may have built it meanwhile
            if not builder.is_prepared():
                before_writing()
                builder.download_and_prepare(file_format="array_record")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return builder
