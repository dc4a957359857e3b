"""The grain input pipeline: tfds data source -> shuffled, augmented, captioned, tokenized batches.

::

    from diffjax.data import default_data_config, make_dataset
    from diffjax.text import TextEncoder

    encoder, _ = TextEncoder.from_config("tiny")
    it = make_dataset(default_data_config(), encoder, split="train", global_batch_size=64, seed=0)
    batch = next(it)
    batch["image"]      # float32 (B_local, H, W, C) in [-1, 1]:  x = uint8 / 127.5 - 1
    batch["token_ids"]  # int32 (B_local, 77), encoder.tokenize(captions)[0]
    batch["mask"]       # bool (B_local, 77), encoder.tokenize(captions)[1]
    batch["label"]      # int32 (B_local,), for labelled datasets only

Order of operations (``grain.MapDataset`` over example indices, so each process reads and decodes
only the examples of its own shard)::

    range(N) -> shuffle(seed') -> [:steps_per_epoch * G]          # drop_remainder, per epoch
             -> batch(G / P) -> [process_index::P]                 # this process's share
             -> repeat(num_epochs)
             -> map_with_index(read, fit, caption, flip, scale, tokenize)
             -> to_iter_dataset(threads) [-> mp_prefetch(workers)]

Global batch ``j`` of an epoch is elements ``[j*G, (j+1)*G)`` of that epoch's permutation (a new
one each epoch); process ``p`` of ``P`` gets rows ``[p*G/P, (p+1)*G/P)`` of it.  The per-element
randomness (caption template and phrase, flip) comes from counter-based uniforms keyed on the seed
and the element's position in the stream of global batches, so the union of the process shards is
exactly the single-process global batch, whatever the number of processes, threads or workers.

Small splits (``data.cache_max_mb``) are decoded once into memory, and a decoded copy is kept beside
the prepared dataset for the next run; larger ones are read from the array_record files per batch.

Checkpointing the position
--------------------------
The iterator is a ``grain.DatasetIterator``: ``state = it.get_state()`` is a small JSON-able dict
(without worker processes, ``{"next_index": <batches consumed>, ...}``); ``it.set_state(state)`` on
a freshly made iterator with the same config, seed and batch size continues with the next batch.
With orbax, save it beside the train state through grain's handler, one file per process::

    import orbax.checkpoint as ocp, grain
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data_iter=grain.checkpoint.CheckpointRestore(it)))

(``grain.python.PyGrainCheckpointSave`` / ``PyGrainCheckpointRestore`` are the same classes.)
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

import grain
import ml_collections
import numpy as np

from diffjax.data.captions import DEFAULT_TEMPLATES, LabelCaptioner, check_templates, class_prompts
from diffjax.data.images import RESIZE_MODES
from diffjax.data.latents import LATENTS_DTYPES, LatentEncoder, latent_source, read_latents
from diffjax.data.sources import DataSource, InMemorySource, as_text, load_source, prepare_image
from diffjax.pixels import from_uint8

__all__ = [
    "DatasetSummary",
    "default_data_config",
    "describe_dataset",
    "make_dataset",
    "make_grain_dataset",
    "validate_data_config",
]


def default_data_config() -> ml_collections.ConfigDict:
    """The ``data`` section of an experiment config: every key the input pipeline reads."""
    c = ml_collections.ConfigDict()
    # "fashion_mnist" (captioned, built from local IDX files) | "image_folder" (your captioned images)
    # | a prepared tfds dataset name such as "cifar10" ("tfds:NAME" forces tfds's own builder).
    c.name = "fashion_mnist"
    c.data_dir = ""  # where tfds datasets are built and read ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.manual_dir = ""  # fashion_mnist: directory of the IDX .gz files ("" = /usr/share/datasets/fashion-mnist)
    c.allow_download = False  # fashion_mnist: fetch missing IDX files from the official URLs
    c.image_size = 28  # square side of the images fed to the model (0 = the dataset's native size)
    c.channels = 1  # 1 (grayscale) or 3 (RGB); 0 = the dataset's own
    c.resize_mode = "crop"  # "crop": resize shorter side + center crop; "pad": pad/crop, no resampling
    c.random_flip = False  # random horizontal flip (seeded, deterministic)
    c.captions_file = ""  # image_folder: .jsonl ({"file": ..., "caption": ...}) or .csv (file,caption)
    c.images_dir = ""  # image_folder: image paths are relative to this ("" = the captions file's dir)
    c.caption_templates = DEFAULT_TEMPLATES  # labelled datasets: "{}" is the class phrase
    c.class_names = ()  # labelled datasets: class phrases to use instead of the dataset's class names
    c.image_key = "image"  # tfds datasets: the image feature
    c.label_key = "label"  # tfds datasets: the ClassLabel feature
    c.train_split = "train"  # split used for training (tfds slicing allowed, e.g. "train[:95%]")
    c.eval_split = "test"  # held-out split for the evaluation loss
    c.cache_max_mb = 2048  # decode the split into memory once when it fits in this many MB (0 = never)
    c.num_threads = 2  # threads producing batches in each process
    c.prefetch_batches = 4  # batches buffered ahead by those threads
    c.num_workers = 0  # extra Python processes producing batches (0 = none; grain mp_prefetch)
    # A latent model (config.model.autoencoder / pretrained): encode every image once with the frozen autoencoder
    # and store the posterior moments in a tfds dataset (diffjax.data.latents), instead of in every step.
    c.precompute_latents = False
    c.latents_dtype = "float32"  # "float32" (the same batches as encoding in the step) or "float16" (half the disk)
    c.latents_dir = ""  # where the latents are stored ("" = beside the prepared dataset, <its dir>/diffjax_latents)
    return c


_ALLOWED = {
    "channels": (0, 1, 3),
    "resize_mode": RESIZE_MODES,
    "latents_dtype": LATENTS_DTYPES,
}


def validate_data_config(config) -> ml_collections.ConfigDict:
    """The ``data`` config with defaults for absent keys (:func:`default_data_config`); a one-line
    ``ValueError`` naming the first unknown key or bad value."""
    full = default_data_config()
    items = config.items() if hasattr(config, "items") else dict(config).items()
    for key, value in items:
        if key not in full:
            raise ValueError(f"unknown config key data.{key}; known keys: {', '.join(sorted(full.keys()))}")
        if isinstance(value, list):
            value = tuple(value)
        try:
            full[key] = value
        except TypeError as e:
            raise ValueError(f"data.{key}: {str(e).strip().splitlines()[0]}") from None
    config = full
    for key, allowed in _ALLOWED.items():
        if config[key] not in allowed:
            raise ValueError(f"data.{key} must be one of {allowed}, got {config[key]!r}")
    for key in ("image_size", "cache_max_mb", "num_threads", "prefetch_batches", "num_workers"):
        if int(config[key]) < 0:
            raise ValueError(f"data.{key} must be >= 0, got {config[key]!r}")
    check_templates(config.caption_templates, "data.caption_templates")
    if not str(config.name):
        raise ValueError("data.name is empty: use 'fashion_mnist', 'image_folder' or a tfds dataset name")
    return config


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    """What training and evaluation code needs to know about a configured dataset split."""

    name: str
    split: str
    num_examples: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the batches' images
    class_names: tuple[str, ...] | None
    captioner: LabelCaptioner | None

    def prompts(self, template_index: int = 0) -> list[str]:
        """One prompt per class (labelled datasets), in label order, e.g. for sample grids."""
        if self.captioner is None:
            raise ValueError(f"dataset {self.name!r} has no class labels to build prompts from")
        return class_prompts(template_index, templates=self.captioner.templates, phrases=self.captioner.phrases)

    def steps_per_epoch(self, global_batch_size: int) -> int:
        return self.num_examples // global_batch_size


def describe_dataset(config, split: str | None = None) -> DatasetSummary:
    """Size, image shape and classes of a configured split (preparing the dataset if needed)."""
    config = _without_cache(validate_data_config(config))
    src = load_source(config, split or config.train_split)
    return DatasetSummary(src.name, src.split, len(src), src.image_shape, src.class_names, src.captioner)


def _without_cache(config):
    config = config.copy_and_resolve_references()
    config.cache_max_mb = 0
    return config


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _uniforms(seed: int, positions: np.ndarray, streams: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1), shape (len(positions), streams): SplitMix64 of
    (seed, position, stream).  Keyed on an element's position in the stream of global batches, so
    they do not depend on how the batch is split over processes or threads."""
    counters = positions.astype(np.uint64)[:, None] * np.uint64(streams) + np.arange(streams, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = counters * _GOLDEN + np.uint64(seed) * np.uint64(0xD1B54A32D192ED03) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class _LoadBatch(grain.transforms.MapWithIndex):
    """(batch number k, source indices) -> batch dict.

    Images are brought to the configured shape, randomly flipped and scaled to [-1, 1] (precomputed latents:
    the moments of the image or of its mirror image, chosen by the same flip); labels are captioned (template
    and phrase chosen by the per-element uniforms); captions are tokenized, each distinct caption once
    (cached).
    """

    _CACHE_SIZE = 8192

    def __init__(self, src: DataSource, *, random_flip: bool, tokenize, keep_captions: bool, seed: int,
                 steps_per_epoch: int, global_batch: int, local_batch: int, process_index: int):
        self.source = src.source
        self.image_key, self.label_key, self.caption_key = src.image_key, src.label_key, src.caption_key
        self.captioner, self.shape, self.resize_mode = src.captioner, src.image_shape, src.resize_mode
        self.latents = src.latents
        self.random_flip, self.tokenize, self.keep_captions, self.seed = random_flip, tokenize, keep_captions, seed
        self.steps, self.global_batch, self.local_batch = steps_per_epoch, global_batch, local_batch
        self.offset = process_index * local_batch
        self._token_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray | dict, np.ndarray | None, list[str] | None]:
        src = self.source
        if self.latents:
            return read_latents(src, indices, self.label_key, self.caption_key)
        if isinstance(src, InMemorySource):  # vectorized
            labels = src.labels[indices] if src.labels is not None else None
            captions = [src.captions[i] for i in indices] if src.captions is not None else None
            return src.images[indices], labels, captions
        records = src.__getitems__(indices.tolist()) if hasattr(src, "__getitems__") else [src[int(i)] for i in indices]
        images = np.stack([prepare_image(r[self.image_key], self.shape, self.resize_mode) for r in records])
        labels = np.array([r[self.label_key] for r in records], np.int32) if self.label_key else None
        captions = [as_text(r[self.caption_key]) for r in records] if self.caption_key else None
        return images, labels, captions

    def __getstate__(self):  # for grain's worker processes: no lock, an empty cache
        state = dict(self.__dict__)
        state["_token_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        cache, rows = self._token_cache, {}
        missing = []
        for caption in dict.fromkeys(captions):
            hit = cache.get(caption)
            if hit is None:
                missing.append(caption)
            else:
                rows[caption] = hit
        if missing:
            with self._lock:  # Hugging Face fast tokenizers are not safe to call from several threads
                ids, mask = self.tokenize(missing)
            new = {c: (np.asarray(ids[i], np.int32), np.asarray(mask[i], bool)) for i, c in enumerate(missing)}
            rows.update(new)
            if len(cache) + len(new) > self._CACHE_SIZE:
                cache.clear()
            cache.update(new)
        return np.stack([rows[c][0] for c in captions]), np.stack([rows[c][1] for c in captions])

    def map_with_index(self, k: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        epoch, step = divmod(int(k), self.steps)
        first = (epoch * self.steps + step) * self.global_batch + self.offset
        u = _uniforms(self.seed, np.arange(first, first + len(indices), dtype=np.uint64), 3)
        images, labels, captions = self._read(indices)
        if captions is None:
            captions = [self.captioner.pick(l, a, b) for l, a, b in zip(labels, u[:, 0], u[:, 1])]
        flip = (u[:, 2] < 0.5)[:, None, None, None] if self.random_flip else None
        if self.latents:  # the moments of the mirrored image were encoded too
            pick = lambda k: images[k] if flip is None else np.where(flip, images[f"{k}_flipped"], images[k])  # noqa: E731
            batch = {"latent_mean": pick("mean"), "latent_logvar": pick("logvar")}
        else:
            if flip is not None:
                images = np.where(flip, images[:, :, ::-1], images)
            batch = {"image": from_uint8(images)}
        if self.tokenize is not None:
            batch["token_ids"], batch["mask"] = self._tokenize(captions)
        if labels is not None:
            batch["label"] = labels.astype(np.int32, copy=False)
        if self.keep_captions or self.tokenize is None:
            batch["caption"] = np.array(captions, dtype=object)
        return batch


def _tokenize_fn(tokenizer) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "tokenize"):
        return tokenizer.tokenize
    if callable(tokenizer):
        return tokenizer
    raise TypeError(
        f"tokenizer must have a .tokenize(list_of_str) method or be callable, got {type(tokenizer).__name__}"
    )


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (shuffle, per-element randomness) from one user seed."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    s = np.random.SeedSequence(int(seed) % 2**63).generate_state(2, np.uint32)
    return int(s[0]), int(s[1])


def _process_layout(global_batch_size, process_index, process_count) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults; the pipeline itself is numpy

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if int(global_batch_size) <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if not 0 <= int(process_index) < int(process_count):
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count {process_count}"
        )
    return int(process_index), int(process_count), global_batch_size // process_count


def make_grain_dataset(
    config,
    tokenizer,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    keep_captions: bool = False,
    latent_encoder: LatentEncoder | None = None,
) -> grain.IterDataset:
    # Long for its Args docstring; the body is one chain of grain stages, read in order.
    """The pipeline as a ``grain.IterDataset`` of this process's batches for a ``data`` config
    (:func:`default_data_config`); :func:`make_dataset` iterates it.

    Args:
      config: the ``data`` ConfigDict.
      tokenizer: a :class:`diffjax.text.TextEncoder` (anything with ``.tokenize(list_of_str) ->
        (ids, mask)``) or such a callable; ``None`` leaves the captions untokenized (``"caption"``).
      split: tfds split string, e.g. ``config.train_split`` or ``"train[:95%]"``.
      global_batch_size: batch size over all processes; each process yields
        ``global_batch_size // process_count`` rows (an error if it does not divide).
      seed: the same seed gives the same batches (order, captions, flips).
      process_index, process_count: this process's shard (default ``jax.process_index()``,
        ``jax.process_count()``).
      shuffle: shuffle each epoch (a new permutation per epoch).
      num_epochs: ``None`` repeats forever; otherwise stop after that many epochs.  Each epoch
        yields ``len(split) // global_batch_size`` batches (the remainder is dropped).
      keep_captions: also return the caption strings (``"caption"``, object array).
      latent_encoder: a frozen autoencoder (:class:`diffjax.data.latents.LatentEncoder`) whose posterior
        moments replace the images, computed once into a tfds dataset on first use, then read (the
        ``Trainer`` passes one when ``data.precompute_latents`` is set).

    Returns:
      a ``grain.IterDataset`` of dicts of numpy arrays: ``image`` float32 (B, H, W, C) in
      [-1, 1] (or, for precomputed latents, ``latent_mean`` and ``latent_logvar`` float32 (B, h, w, c)),
      ``token_ids`` int32 (B, L), ``mask`` bool (B, L), ``label`` int32 (B,) for labelled datasets.
    """
    config = validate_data_config(config)
    p, num_p, local_batch = _process_layout(global_batch_size, process_index, process_count)
    if num_epochs is not None and int(num_epochs) <= 0:
        raise ValueError(f"num_epochs must be positive or None (repeat forever), got {num_epochs}")
    tokenize = _tokenize_fn(tokenizer)
    if latent_encoder is None:
        src = load_source(config, split)
    else:  # the images are read once, to build the latents: no decoded copy in memory
        images = _without_cache(config)
        src = latent_source(load_source(images, split), config, split, latent_encoder, lambda s: load_source(images, s))
    steps = len(src) // global_batch_size
    if steps == 0:
        raise ValueError(
            f"split {split!r} of {src.name!r} has {len(src)} examples, fewer than one global batch of "
            f"{global_batch_size}"
        )
    shuffle_seed, map_seed = _seeds(seed)
    ds = grain.MapDataset.range(len(src))
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)  # a new permutation each epoch (seed + epoch)
    ds = ds[: steps * global_batch_size]  # drop_remainder: whole global batches of each epoch
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=np.array)
    ds = ds[p::num_p]  # local batch j*P + p is this process's share of global batch j
    ds = ds.repeat(None if num_epochs is None else int(num_epochs))
    ds = ds.map_with_index(
        _LoadBatch(
            src,
            random_flip=bool(config.random_flip),
            tokenize=tokenize,
            keep_captions=keep_captions,
            seed=map_seed,
            steps_per_epoch=steps,
            global_batch=global_batch_size,
            local_batch=local_batch,
            process_index=p,
        )
    )
    threads = int(config.num_threads)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(int(config.prefetch_batches), threads))
    it_ds = ds.to_iter_dataset(read)
    if int(config.num_workers) > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (outside an absl app: defaults)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(config.num_workers)))
    return it_ds


def make_dataset(config, tokenizer, **options) -> grain.DatasetIterator:
    """``iter(make_grain_dataset(config, tokenizer, **options))``: an iterator of this process's batches,
    whose ``get_state()`` / ``set_state()`` save and restore its position (the arguments are
    :func:`make_grain_dataset`'s)."""
    return iter(make_grain_dataset(config, tokenizer, **options))
