"""CLIP text encoder: a CLIP BPE tokenizer plus ``transformers.FlaxCLIPTextModel``.

The data flow is ``prompts --tokenize--> (token_ids, mask) --encode--> TextEncoding``::

    encoder, params = TextEncoder.from_config("tiny", seed=0)          # offline, random weights
    encoder, params = TextEncoder.from_pretrained("openai/clip-vit-large-patch14")  # hub or local dir
    ids, mask = encoder.tokenize(["a photo of a cat", ""])              # numpy, shape (B, 77)
    out = encoder.encode(params, ids, mask)                             # pure, jittable
    out.hidden_states  # (B, L, D) per-token states, for the U-Net's cross-attention
    out.mask           # (B, L) bool, True on real tokens (BOS ... EOS)
    out.pooled         # (B, D) the final-layer state at the EOS token, as CLIP pools

Conventions
-----------
* Token ids are exactly OpenAI CLIP's (``clip.simple_tokenizer``): ``"a photo of a cat"`` ->
  ``[49406, 320, 1125, 539, 320, 2368, 49407]``.  Text is cleaned as OpenAI does (``ftfy.fix_text``,
  HTML unescaping twice, whitespace collapsed, lowercase) before the BPE.  Without ``ftfy`` installed
  the cleaning falls back to Unicode NFC, which gives the same ids except on mojibake text.
* Padding follows the Hugging Face CLIP tokenizers (``openai/clip-vit-*``), not ``clip.tokenize``:
  sequences are padded to ``max_length`` (77) with the tokenizer's pad token, which is
  ``<|endoftext|>`` (49407) for the OpenAI vocabulary; ``clip.tokenize`` pads with 0.  Because the CLIP
  text transformer is causal, real tokens never see the padding, and the returned boolean mask marks
  the real tokens (BOS, the text, EOS) so that cross-attention can ignore the rest.
* Prompts longer than ``max_length`` tokens are truncated to ``max_length`` keeping the EOS token last
  (as ``clip.tokenize(..., truncate=True)`` does), with a warning naming the prompt.
* The empty prompt ``""`` (``[BOS, EOS, pad...]``) is the unconditional input of classifier-free
  guidance: :meth:`TextEncoder.unconditional`.

Frozen or trained
-----------------
``TextEncoder.trainable`` (or the ``trainable=`` argument of :meth:`TextEncoder.encode`) chooses
between a frozen encoder, whose outputs pass through ``jax.lax.stop_gradient`` (no gradient reaches its
parameters; keep those parameters out of the optimizer, e.g. beside the trainable parameters in the
train state rather than inside them), and an encoder trained jointly with the denoiser (as LDM trained
its text transformer from scratch), whose parameters belong in the optimizer.

Parameters are a plain pytree (``{"text_model": ...}``, float32) kept apart from the encoder object,
which is an immutable description (tokenizer, module, config) that is hashed by identity, so it can be
closed over or passed as a static argument to ``jax.jit``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import html
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import tempfile
import unicodedata
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:  # OpenAI's cleaning uses the `regex` module (a transformers dependency) for Unicode `\s`.
    import regex as _regex
except ImportError:  # pragma: no cover
    _regex = re

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "MAX_LENGTH",
    "TEXT_ENCODER_SIZES",
    "VOCAB_SIZE",
    "TextEncoder",
    "TextEncoding",
    "check_prompts",
    "clean_text",
    "clip_bpe_path",
    "clip_tokenizer",
    "text_config",
]

VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>, also the pad token (Hugging Face CLIP convention)

# Named sizes for `TextEncoder.from_config`: CLIPTextConfig fields.  "base" is the text tower of CLIP
# ViT-B/32 (and B/16), "large" that of ViT-L/14 (the Stable Diffusion 1.x text encoder).
TEXT_ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    "large": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}

# transformers 4.x logs, when it builds its first Flax model, that its TensorFlow and JAX classes are deprecated and
# will be removed in v5. diffjax pins transformers < 5 and builds only FlaxCLIPTextModel / FlaxCLIPModel, which
# every 4.x release keeps, so the line tells a diffjax user nothing: it is dropped (that message only).
FLAX_DEPRECATION = "TensorFlow and JAX classes are deprecated"


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(FLAX_DEPRECATION)


logging.getLogger("transformers.modeling_flax_utils").addFilter(_DropFlaxDeprecation())

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's simple_tokenizer: merges[1 : 49152 - 256 - 2 + 1]
_INSTALL_HINT = "pip install --no-deps openai-clip==1.0.1"
_WHITESPACE = _regex.compile(r"\s+")


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def clip_bpe_path() -> str:
    """Path of OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, shipped by the PyPI package ``openai-clip``.

    The file is located without importing the ``clip`` package (which imports torch and torchvision).
    """
    candidates = []
    try:
        spec = importlib.util.find_spec("clip")  # does not execute clip/__init__.py
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(d, _BPE_FILE) for d in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("openai-clip") or []
        candidates += [str(f.locate()) for f in files if f.name == _BPE_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ImportError(
        f"the offline CLIP tokenizer needs {_BPE_FILE} from the `openai-clip` package: {_INSTALL_HINT}"
    )


@functools.lru_cache(maxsize=4)
def _clip_vocab_and_merges(bpe_path: str) -> tuple[str, str]:
    """vocab.json and merges.txt contents built the way OpenAI's ``SimpleTokenizer`` builds them."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path} gives a vocabulary of {len(vocab)} tokens, expected {VOCAB_SIZE}")
    vocab_json = json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    # The first line is a header: CLIPTokenizer (like SimpleTokenizer) skips it.
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    return vocab_json, merges_txt


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from the 256 byte values to printable unicode characters (OpenAI's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(max_length: int = MAX_LENGTH, bpe_path: str | None = None):
    """A ``transformers.CLIPTokenizerFast`` with OpenAI CLIP's vocabulary, built offline.

    The vocabulary comes from ``bpe_path`` or else from the ``openai-clip`` package
    (:func:`clip_bpe_path`).  Its ids equal those of OpenAI's tokenizer and of the
    ``openai/clip-vit-*`` tokenizers on the Hugging Face Hub; its pad token is ``<|endoftext|>``.
    """
    from transformers import CLIPTokenizerFast

    vocab_json, merges_txt = _clip_vocab_and_merges(bpe_path or clip_bpe_path())
    with tempfile.TemporaryDirectory(prefix="diffjax-clip-bpe-") as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            f.write(vocab_json)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write(merges_txt)
        tokenizer = CLIPTokenizerFast(
            vocab_file=vocab_file, merges_file=merges_file, model_max_length=max_length
        )
    # The files are gone; keep the tokenizer from pointing at them (save_pretrained writes its own).
    tokenizer.vocab_file = tokenizer.merges_file = None
    return tokenizer


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: ftfy, HTML unescape (twice), collapse whitespace, lowercase."""
    try:
        import ftfy
    except ImportError:  # same ids except on mojibake text
        text = unicodedata.normalize("NFC", text)
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def text_config(size: str = "tiny", **overrides: Any):
    """A ``transformers.CLIPTextConfig`` for a named size (see ``TEXT_ENCODER_SIZES``).

    Every size uses OpenAI CLIP's vocabulary (49408 tokens, BOS 49406, EOS 49407), 77 positions and
    quick-GELU; ``overrides`` set any other ``CLIPTextConfig`` field.
    """
    from transformers import CLIPTextConfig

    if not isinstance(size, str) or size not in TEXT_ENCODER_SIZES:
        raise ValueError(
            f"unknown text encoder size {size!r}; valid sizes: {', '.join(TEXT_ENCODER_SIZES)}"
        )
    fields = dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
        **TEXT_ENCODER_SIZES[size],
    )
    fields.update(overrides)
    return CLIPTextConfig(**fields)


class TextEncoding(NamedTuple):
    """Output of :meth:`TextEncoder.encode` (a pytree)."""

    hidden_states: jax.Array  # (B, L, D) final-layer-norm states of every token, the encoder's dtype
    mask: jax.Array  # (B, L) bool, True on real tokens
    pooled: jax.Array  # (B, D) state at the (first) EOS token


def check_prompts(prompts: str | Sequence[str], what: str = "prompts", allow_empty: bool = False) -> list[str]:
    """A list of prompt strings (a single string is one prompt); a one-line ValueError naming the bad entry
    otherwise. Every entry point that takes prompts (tokenizer, pipeline) checks them here."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, np.ndarray)) or not isinstance(prompts, Sequence):
        raise ValueError(f"{what} must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts and not allow_empty:
        raise ValueError(f"{what} is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{what}[{i}] is a {type(p).__name__} ({p!r:.40}), not a string")
    return prompts


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name)) and ".." not in name


def _has_tokenizer_files(directory: str) -> bool:
    has = lambda f: os.path.isfile(os.path.join(directory, f))  # noqa: E731
    return has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """CLIP tokenizer + ``FlaxCLIPTextModule``; parameters live outside, as a pytree.

    Build one with :meth:`from_config` (random weights, offline) or :meth:`from_pretrained`.
    Instances are immutable and hashed by identity.
    """

    tokenizer: Any  # transformers CLIPTokenizerFast
    config: Any  # transformers CLIPTextConfig
    module: Any  # transformers FlaxCLIPTextModule (a flax.linen Module)
    max_length: int = MAX_LENGTH
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    trainable: bool = False  # default of encode(..., trainable=): False puts outputs under stop_gradient

    def __post_init__(self):
        limit = self.config.max_position_embeddings
        if not 1 < self.max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] for this text model, got {self.max_length}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def _build(cls, config, tokenizer, *, dtype, max_length, trainable) -> "TextEncoder":
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModule

        module = FlaxCLIPTextModule(config=config, dtype=dtype)
        return cls(
            tokenizer=tokenizer,
            config=config,
            module=module,
            max_length=int(max_length or config.max_position_embeddings),
            dtype=dtype,
            trainable=bool(trainable),
        )

    @classmethod
    def from_config(
        cls,
        size: str | Any = "tiny",
        *,
        rng: jax.Array | int | None = None,
        seed: int = 0,
        dtype: Any = jnp.float32,
        max_length: int | None = None,
        trainable: bool = False,
        bpe_path: str | None = None,
        init: bool = True,
        **overrides: Any,
    ) -> tuple["TextEncoder", dict | None]:
        """A randomly initialised text encoder of a named size (or a ``CLIPTextConfig``).

        Args:
          size: a key of ``TEXT_ENCODER_SIZES`` ("tiny", "small", "base", "large") or a
            ``CLIPTextConfig``.
          rng: ``jax.random`` key (or int seed) for the initialisation; default ``PRNGKey(seed)``.
          dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are float32.
          max_length: token sequence length (default: the config's 77 positions).
          trainable: default for :meth:`encode`'s ``trainable``.
          bpe_path: OpenAI's BPE file, if not taken from the ``openai-clip`` package.
          init: False skips the initialisation (params None), for parameters restored from elsewhere.
          **overrides: ``CLIPTextConfig`` fields that override the named size.

        Returns:
          ``(encoder, params)``.
        """
        from transformers import CLIPTextConfig

        if isinstance(size, CLIPTextConfig):
            config = copy.deepcopy(size)
            for key, value in overrides.items():
                setattr(config, key, value)
        else:
            config = text_config(size, **overrides)
        tokenizer = clip_tokenizer(config.max_position_embeddings, bpe_path=bpe_path)
        encoder = cls._build(config, tokenizer, dtype=dtype, max_length=max_length, trainable=trainable)
        if not init:
            return encoder, None
        if rng is None:
            rng = seed
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.PRNGKey(int(rng))
        return encoder, encoder.init(rng)

    def replace(self, **changes: Any) -> "TextEncoder":
        """A copy with other ``dtype``, ``max_length`` or ``trainable`` (same tokenizer and config);
        the parameters are unchanged, e.g. ``encoder.replace(dtype=jnp.bfloat16)``."""
        allowed = {"dtype", "max_length", "trainable"}
        unknown = set(changes) - allowed
        if unknown:
            raise TypeError(f"TextEncoder.replace: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        fields = dict(dtype=self.dtype, max_length=self.max_length, trainable=self.trainable)
        fields.update(changes)
        return self._build(self.config, self.tokenizer, **fields)

    def init(self, rng: jax.Array) -> dict:
        """Random float32 parameters ``{"text_model": ...}`` for this encoder's config."""
        ids = jnp.zeros((1, self.max_length), jnp.int32)

        @jax.jit
        def init(rng):
            params_rng, dropout_rng = jax.random.split(rng)
            rngs = {"params": params_rng, "dropout": dropout_rng}
            return self.module.init(rngs, ids, jnp.ones_like(ids), self._positions(ids))["params"]

        return dict(init(rng))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        dtype: Any = jnp.float32,
        *,
        max_length: int | None = None,
        trainable: bool = False,
        subfolder: str = "",
        tokenizer_subfolder: str | None = None,
        bpe_path: str | None = None,
        load_weights: bool = True,
        **hub_kwargs: Any,
    ) -> tuple["TextEncoder", dict | None]:
        """Load a CLIP text model from a local directory or the Hugging Face Hub.

        Works with CLIP checkpoints (``openai/clip-vit-base-patch32``, ``openai/clip-vit-large-patch14``:
        only their text tower is loaded), text-encoder directories such as the ``text_encoder``
        subfolder of a Stable Diffusion repository, and directories written by :meth:`save_pretrained`.
        Flax or safetensors weights are read directly; PyTorch-only weights with ``from_pt=True``
        (needs torch).  When the directory (or ``tokenizer_subfolder``) has no tokenizer files, the
        offline OpenAI CLIP tokenizer is built (:func:`clip_tokenizer`).

        Args:
          name_or_path: local directory or hub model id.
          dtype: computation dtype; parameters stay as stored (float32 for the OpenAI weights).
          max_length: token sequence length (default: the model's positions, 77).
          trainable: default for :meth:`encode`'s ``trainable``.
          subfolder: where the model's config and weights are inside ``name_or_path``.
          tokenizer_subfolder: where the tokenizer files are (default: ``subfolder``).
          bpe_path: OpenAI's BPE file for the fallback tokenizer.
          load_weights: False reads only the config and the tokenizer (params None), for parameters that come
            from elsewhere (a training checkpoint).
          **hub_kwargs: passed to ``from_pretrained`` of transformers (revision, cache_dir,
            local_files_only, token, ...).

        Returns:
          ``(encoder, params)``.
        """
        # Long for its Args docstring; the body is one sequence: find the directory, read config, weights, tokenizer.
        # transformers' Flax CLIP classes, imported on use: loading them is slow, and transformers 5 has none.
        from transformers import CLIPTextConfig, CLIPTokenizerFast, FlaxCLIPTextModel

        name = os.fspath(name_or_path)
        is_local = os.path.isdir(name)
        if not is_local and (os.path.exists(name) or not _is_hub_id(name)):
            raise FileNotFoundError(
                f"no text encoder directory at {name!r} (and it is not a Hugging Face Hub model id)"
            )
        model_dir = os.path.join(name, subfolder) if is_local else None
        if is_local and not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{model_dir!r} has no config.json: not a saved text encoder")

        kwargs = dict(hub_kwargs, subfolder=subfolder)

        def load_params(**extra):
            try:
                return FlaxCLIPTextModel.from_pretrained(name, _do_init=False, **extra)[1]
            except ValueError as e:
                if "_do_init" not in str(e):
                    raise
                # transformers converts PyTorch weights only through an initialised model
                return FlaxCLIPTextModel.from_pretrained(name, _do_init=True, **extra).params

        params = None
        try:
            config = CLIPTextConfig.from_pretrained(name, **kwargs)
            try:
                if load_weights:
                    params = load_params(config=config, dtype=dtype, **kwargs)
            except OSError as e:
                if "from_pt" not in str(e) or kwargs.get("from_pt"):
                    raise
                params = load_params(config=config, dtype=dtype, from_pt=True, **kwargs)
        except OSError as e:
            where = "local directory" if is_local else "Hugging Face Hub model"
            raise OSError(f"could not load a CLIP text model from {where} {name!r}: {_first_line(e)}") from e
        if params is not None:
            params = jax.tree_util.tree_map(jnp.asarray, params)

        tok_sub = subfolder if tokenizer_subfolder is None else tokenizer_subfolder
        tokenizer = None
        tok_kwargs = {k: v for k, v in hub_kwargs.items() if k != "from_pt"}
        if not is_local or _has_tokenizer_files(os.path.join(name, tok_sub)):
            try:
                tokenizer = CLIPTokenizerFast.from_pretrained(name, subfolder=tok_sub, **tok_kwargs)
            except (OSError, ValueError):
                if is_local:
                    raise
        if tokenizer is None:  # no tokenizer files: OpenAI's vocabulary, offline
            tokenizer = clip_tokenizer(config.max_position_embeddings, bpe_path=bpe_path)
        encoder = cls._build(config, tokenizer, dtype=dtype, max_length=max_length, trainable=trainable)
        return encoder, params

    def save_pretrained(self, path: str | os.PathLike, params: dict) -> None:
        """Write config, weights (safetensors) and tokenizer files to ``path``, a self-contained
        directory that :meth:`from_pretrained` (and transformers' ``FlaxCLIPTextModel`` /
        ``CLIPTokenizerFast``) load offline."""
        from transformers import FlaxCLIPTextModel

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        model = FlaxCLIPTextModel(self.config, dtype=self.dtype, _do_init=False)
        params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
        model.save_pretrained(path, params=params, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if not _has_tokenizer_files(path) or not os.path.isfile(os.path.join(path, "vocab.json")):
            self.tokenizer.backend_tokenizer.model.save(path)  # vocab.json + merges.txt for slow loaders

    # -- tokenizer --------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def masks_padding(self) -> bool:
        """Whether the transformer gets the padding mask (``config.use_attention_mask``, default True). False: the
        padding positions attend to every earlier token, as Stable Diffusion's pipelines encode prompts (diffusers
        reads the same config attribute, absent meaning False there; ``diffjax.diffusers_format`` writes it)."""
        return bool(getattr(self.config, "use_attention_mask", True))

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else int(pad)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``int32 (B, max_length)`` and mask ``bool (B, max_length)`` for the prompts.

        Each row is ``[BOS, text..., EOS, pad...]`` with OpenAI CLIP's ids, padded with the pad token
        (``<|endoftext|>``); the mask is True on BOS, text and EOS.  Prompts that are too long are cut
        to ``max_length`` tokens ending in EOS, with a warning.  A single string is one prompt.
        """
        prompts = check_prompts(prompts, allow_empty=True)
        length = self.max_length
        ids = np.full((len(prompts), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(prompts), length), bool)
        if not prompts:
            return ids, mask
        encoded = self.tokenizer(
            [clean_text(p) for p in prompts], add_special_tokens=True, truncation=False, verbose=False
        )["input_ids"]
        for i, row in enumerate(encoded):
            if len(row) > length:
                warnings.warn(
                    f"prompt {i} has {len(row)} tokens, more than max_length={length}; truncated to "
                    f"{length} (EOS kept): {prompts[i]!r:.120}",
                    stacklevel=2,
                )
                row = row[: length - 1] + [self.eos_token_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask

    # -- model --------------------------------------------------------------------------------------

    @staticmethod
    def _positions(token_ids: jax.Array) -> jax.Array:
        return jnp.broadcast_to(jnp.arange(token_ids.shape[-1], dtype=jnp.int32), token_ids.shape)

    def encode(
        self,
        params: dict,
        token_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        trainable: bool | None = None,
    ) -> TextEncoding:
        """Pure, jittable text encoding of ``token_ids`` (B, L) with parameters ``params``.

        Args:
          params: the text model's parameters ``{"text_model": ...}``.
          token_ids: int (B, L) from :meth:`tokenize`.
          attention_mask: (B, L), nonzero on real tokens; default: every position up to and including
            the first EOS.  The model is causal, so this only affects the states of padding positions (and
            not at all when :attr:`masks_padding` is False); the returned mask is this one either way.
          trainable: False puts the outputs under ``jax.lax.stop_gradient`` (a frozen encoder), True
            lets gradients reach ``params``; default ``self.trainable``.  A Python bool (static).

        Returns:
          :class:`TextEncoding` ``(hidden_states (B, L, D), mask (B, L) bool, pooled (B, D))``; the
          pooled embedding is the final state at the first EOS token, as CLIP pools.
        """
        trainable = self.trainable if trainable is None else trainable
        token_ids = jnp.asarray(token_ids, jnp.int32)
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must have shape (batch, length), got {token_ids.shape}")
        is_eos = token_ids == self.eos_token_id
        eos_pos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), token_ids.shape[-1] - 1)
        if attention_mask is None:
            mask = jnp.arange(token_ids.shape[-1]) <= eos_pos[:, None]
        else:
            mask = jnp.asarray(attention_mask).astype(bool)
            if mask.shape != token_ids.shape:
                raise ValueError(f"attention_mask shape {mask.shape} != token_ids shape {token_ids.shape}")
        out = self.module.apply(
            {"params": params},
            token_ids,
            (mask if self.masks_padding else jnp.ones_like(mask)).astype(jnp.int32),
            self._positions(token_ids),
            deterministic=True,
        )
        hidden = out.last_hidden_state
        pooled = jnp.take_along_axis(hidden, eos_pos[:, None, None], axis=1)[:, 0]
        if not trainable:
            hidden, pooled = jax.lax.stop_gradient((hidden, pooled))
        return TextEncoding(hidden_states=hidden, mask=mask, pooled=pooled)

    @functools.cached_property
    def _encode_jit(self):
        return jax.jit(self.encode, static_argnames=("trainable",))

    def encode_prompts(self, params: dict, prompts: str | Sequence[str], *, trainable: bool | None = None):
        """Tokenize and encode (a jitted :meth:`encode`, compiled once per batch size)."""
        ids, mask = self.tokenize(prompts)
        return self._encode_jit(params, ids, mask, trainable=trainable)

    def unconditional(self, params: dict, batch_size: int = 1) -> TextEncoding:
        """Encoding of the empty prompt "", the unconditional input of classifier-free guidance,
        repeated ``batch_size`` times (a frozen encoding; for a trained encoder, encode
        ``tokenize([""])`` inside the loss so its gradient flows)."""
        enc = self.encode_prompts(params, [""], trainable=False)
        return jax.tree_util.tree_map(lambda x: jnp.repeat(x, batch_size, axis=0), enc)
