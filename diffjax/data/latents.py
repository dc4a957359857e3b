"""Latents precomputed once into a tfds dataset (``data.precompute_latents``): a latent model then reads the
frozen autoencoder's posterior moments instead of encoding every batch.

A latent diffusion model trains on z = (E(x) − shift) · scaling with z drawn from the autoencoder's posterior
q(z | x) = N(μ(x), diag σ²(x)) (Rombach et al. 2022, §3).  The encoder is frozen, so μ and log σ² of an image
never change: at scale they are computed once and stored, and each step draws z = μ + σ·ε from the stored
moments.  This is exactly what encoding in the step computes (the same ε, the same formula,
:func:`diffjax.models.autoencoder.scale_latents`); stored as float32 the two paths give the same batches.

The :class:`PrecomputedLatents` builder writes, for every example of the source dataset's splits, in the
source's order (tfds split slicing such as ``train[:95%]`` then selects the same examples)::

    mean, logvar                   (h, w, c) in data.latents_dtype: the posterior of the image
    mean_flipped, logvar_flipped   the same for the mirrored image (only with data.random_flip: the
                                   autoencoder is not equivariant to flips, so they are encoded too)
    label | caption                as in the source

under ``<dataset dir>/diffjax_latents`` (or ``data.latents_dir``), in a config named after a hash of the source
(its prepared directory, split, image shape and resize mode), the autoencoder (its config and every parameter's
bytes), the dtype and the flips: another autoencoder, resolution or dataset builds another copy, and an
unchanged one is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from diffjax.data._builder import LocalBuilder, prepare_once
from diffjax.data.sources import DataSource, as_text, prepare_image, split_names
from diffjax.pixels import from_uint8

__all__ = ["InMemoryLatents", "LatentEncoder", "PrecomputedLatents", "latent_source"]

log = logging.getLogger(__name__)

LATENTS_DTYPES = ("float32", "float16")
MOMENTS = ("mean", "logvar", "mean_flipped", "logvar_flipped")  # the record keys of the posterior moments


class LatentEncoder:
    """The posterior moments of a frozen autoencoder, for precomputing: ``encoder(uint8 images) -> (mean,
    logvar)`` as float32 numpy arrays, computed ``batch_size`` images at a time over this process's devices
    (data-parallel; the last batch is padded, so one program is compiled).

    Args:
      vae: a :class:`diffjax.models.autoencoder.AutoencoderKL`.
      params: its parameters (numpy or jax arrays).
      batch_size: images per call of the compiled encoder (rounded up to a multiple of the local devices).
    """

    def __init__(self, vae, params, batch_size: int = 32):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.vae = vae
        devices = jax.local_devices()
        self.batch_size = -(-max(int(batch_size), 1) // len(devices)) * len(devices)
        self.fingerprint = _fingerprint(vae.config, params)
        mesh = Mesh(np.array(devices), ("batch",))
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._params, self._on_devices = params, None  # placed when first used, dropped by release()

        def moments(p, x):
            posterior = vae.apply({"params": p}, x, method=vae.encode)
            return posterior.mean, posterior.logvar

        self._moments = jax.jit(moments, out_shardings=self._batch_sharding)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        f, c = self.vae.config.downsample_factor, self.vae.config.latent_channels
        return int(image_shape[0]) // f, int(image_shape[1]) // f, c

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import jax

        n = len(images)
        x = from_uint8(images)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n,) + x.shape[1:], x.dtype)])
        if self._on_devices is None:
            self._on_devices = jax.device_put(self._params, self._replicated)
        mean, logvar = self._moments(self._on_devices, jax.device_put(x, self._batch_sharding))
        return np.asarray(mean)[:n], np.asarray(logvar)[:n]

    def release(self) -> None:
        """Frees the devices' copy of the parameters (a training run needs it only while it builds)."""
        self._on_devices = None


def _fingerprint(vae_config, params) -> str:
    """A hash of the autoencoder's config and the bytes (with names, shapes and dtypes) of every parameter."""
    import jax

    digest = hashlib.blake2b(repr(vae_config).encode(), digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.shape}|{value.dtype}".encode())
        digest.update(value.view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


@dataclasses.dataclass(eq=False)
class LatentsConfig(tfds.core.BuilderConfig):
    """What a copy of the latents holds (see the module docstring); made by :func:`latent_source`."""

    latent_shape: tuple = ()
    dtype: str = "float32"
    flips: bool = False
    has_label: bool = False
    has_caption: bool = False
    splits: tuple = ()


class PrecomputedLatents(LocalBuilder):
    """A dataset's posterior moments under a frozen autoencoder, one split per source split, in the source's
    order (``disable_shuffling``).  Built by :func:`latent_source` with the image sources and the encoder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mean, logvar (and of the mirrored image), label or caption."}

    def __init__(self, *, sources: dict[str, DataSource] | None = None, encoder: LatentEncoder | None = None,
                 **kwargs):
        self._sources, self._encoder = sources, encoder
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        shape, dtype = (tuple(cfg.latent_shape), np.dtype(cfg.dtype)) if cfg else ((None, None, None), np.float32)
        names = ["mean", "logvar"] + (["mean_flipped", "logvar_flipped"] if cfg is not None and cfg.flips else [])
        features = {k: tfds.features.Tensor(shape=shape, dtype=dtype) for k in names}
        if cfg is not None and cfg.has_label:
            features["label"] = tfds.features.Tensor(shape=(), dtype=np.int64)
        if cfg is not None and cfg.has_caption:
            features["caption"] = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, description="Posterior moments of a frozen autoencoder.",
                                     features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._sources is None or self._encoder is None:
            raise ValueError("PrecomputedLatents is built by diffjax.data.latents.latent_source (it needs the images "
                             "and the autoencoder)")
        return {split: self._generate_examples(src) for split, src in self._sources.items()}

    def _generate_examples(self, src: DataSource):
        cfg, encode = self.builder_config, self._encoder
        start, n = time.perf_counter(), len(src)
        getitems = getattr(src.source, "__getitems__", None)
        for lo in range(0, n, encode.batch_size):
            indices = list(range(lo, min(n, lo + encode.batch_size)))
            records = getitems(indices) if getitems else [src.source[i] for i in indices]
            images = np.stack([prepare_image(r[src.image_key], src.image_shape, src.resize_mode) for r in records])
            moments = dict(zip(("mean", "logvar"), encode(images)))
            if cfg.flips:
                moments.update(zip(("mean_flipped", "logvar_flipped"), encode(images[:, :, ::-1])))
            for j, (i, record) in enumerate(zip(indices, records)):
                example = {k: v[j].astype(cfg.dtype) for k, v in moments.items()}
                if cfg.has_label:
                    example["label"] = np.int64(record[src.label_key])
                if cfg.has_caption:
                    example["caption"] = as_text(record[src.caption_key])
                yield i, example  # integer keys: written in this order
        log.info("encoded %s[%s] (%d images) in %.1fs", src.name, src.split, n, time.perf_counter() - start)


class InMemoryLatents:
    """A split of precomputed latents read once into numpy arrays (``take`` is vectorized)."""

    def __init__(self, arrays: dict[str, np.ndarray], captions: Sequence[str] | None):
        self.arrays, self.captions = arrays, captions

    def __len__(self) -> int:
        return len(self.arrays["mean"])

    def take(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], list[str] | None]:
        arrays = {k: v[indices] for k, v in self.arrays.items()}
        return arrays, ([self.captions[i] for i in indices] if self.captions is not None else None)

    def __repr__(self) -> str:
        return f"InMemoryLatents({len(self)} latents of shape {self.arrays['mean'].shape[1:]})"


def latent_source(images: DataSource, config, split: str, encoder: LatentEncoder, load) -> DataSource:
    """The precomputed latents of ``split`` (slicing allowed) of the image source ``images``, built on first use.

    ``load(split)`` opens another whole split of the image dataset (the builder encodes every split that
    ``split`` names, unsliced).  Returns a :class:`DataSource` whose records are latents (``latents=True``),
    with the image source's labels, captions and captioner.
    """
    bases = tuple(dict.fromkeys(split_names(split))) or (split,)
    flips = bool(config.random_flip)
    dtype = str(config.latents_dtype)
    latent_shape = encoder.latent_shape(images.image_shape)
    key = "\n".join([os.path.abspath(images.data_dir), images.name, ",".join(bases), str(images.image_shape),
                     images.resize_mode, images.image_key, str(images.label_key), str(images.caption_key),
                     encoder.fingerprint, dtype, str(flips)])
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", f"{images.name}_{'_'.join(bases)}").strip("_")
    builder_config = LatentsConfig(
        name=f"{stem}_{'x'.join(map(str, latent_shape))}_{hashlib.sha256(key.encode()).hexdigest()[:12]}",
        description=f"{images.name} {'+'.join(bases)} ({images.data_dir}) through an autoencoder "
                    f"{encoder.fingerprint[:12]}",
        latent_shape=latent_shape, dtype=dtype, flips=flips, has_label=images.label_key is not None,
        has_caption=images.caption_key is not None, splits=bases)
    root = os.path.expanduser(str(config.latents_dir)) if config.latents_dir else os.path.join(
        images.data_dir, "diffjax_latents")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write precomputed latents in {root} ({e.strerror}): set data.latents_dir to a "
                      f"writable directory") from None

    def make_builder(sources=None):
        return PrecomputedLatents(config=builder_config, data_dir=root, sources=sources, encoder=encoder)

    builder = make_builder()
    if not builder.is_prepared():
        if not os.access(root, os.W_OK):
            raise OSError(f"cannot write precomputed latents in {root} (not writable): set data.latents_dir to a "
                          f"writable directory")
        sources = {b: (images if images.split == b else load(b)) for b in bases}
        log.info("precomputing the latents of %s[%s] into %s", images.name, "+".join(bases), root)
        try:
            builder = prepare_once(lambda: make_builder(sources))
        finally:
            encoder.release()
    source = builder.as_data_source(split=split)
    ds = dataclasses.replace(images, source=source, split=split, image_key="mean", image_shape=latent_shape,
                             label_key="label" if builder_config.has_label else None,
                             caption_key="caption" if builder_config.has_caption else None,
                             data_dir=str(builder.data_dir), latents=True)
    per_example = int(np.prod(latent_shape)) * 4 * (4 if flips else 2)  # held as float32 in memory
    limit = int(config.cache_max_mb) * 2**20
    if limit > 0 and 0 < len(ds) * per_example <= limit:
        ds.source = _in_memory(ds)
    return ds


def _in_memory(ds: DataSource, chunk: int = 1024) -> InMemoryLatents:
    """The whole split read with :func:`read_latents`, ``chunk`` records at a time."""
    parts = [read_latents(ds.source, np.arange(lo, min(len(ds), lo + chunk)), ds.label_key, ds.caption_key)
             for lo in range(0, len(ds), chunk)]
    arrays = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    if ds.label_key:
        arrays["label"] = np.concatenate([p[1] for p in parts])
    return InMemoryLatents(arrays, [c for p in parts for c in p[2]] if ds.caption_key else None)


def read_latents(source: Any, indices: np.ndarray, label_key, caption_key):
    """(moments dict, labels, captions) of ``indices`` of a latents source (in memory or array_record)."""
    if isinstance(source, InMemoryLatents):
        arrays, captions = source.take(indices)
        return arrays, arrays.pop("label", None), captions
    records = source.__getitems__(indices.tolist())
    keys = [k for k in MOMENTS if k in records[0]]
    arrays = {k: np.stack([np.asarray(r[k], np.float32) for r in records]) for k in keys}
    labels = np.array([r[label_key] for r in records], np.int32) if label_key else None
    captions = [as_text(r[caption_key]) for r in records] if caption_key else None
    return arrays, labels, captions
