"""The Inception-V3 network of FID, in Flax linen (NHWC), with a loader for pytorch-fid's weights.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium"; reference code: TTUR, github.com/bioinf-jku/TTUR) compares the 2048-d ``pool_3`` features of
the TensorFlow graph ``inception-2015-12-05``. pytorch-fid (github.com/mseitzer/pytorch-fid, version 0.3.0,
``pytorch_fid/inception.py``) ported that graph to PyTorch as torchvision's ``Inception3`` (Szegedy et al.
2016, "Rethinking the Inception Architecture for Computer Vision") with the FID patches, and ships its
weights as ``pt_inception-2015-12-05-6726825d.pth`` (:data:`FID_WEIGHTS_URL`). This module is that network:

    x (B, 299, 299, 3) in [-1, 1] ─ Conv 3x3/2 ─ Conv 3x3 ─ Conv 3x3 (pad 1) ─ MaxPool 3x3/2
        ─ Conv 1x1 ─ Conv 3x3 ─ MaxPool 3x3/2 ─ Mixed_5b,5c,5d (A) ─ Mixed_6a (B)
        ─ Mixed_6b,6c,6d,6e (C) ─ Mixed_7a (D) ─ Mixed_7b (E, avg pool) ─ Mixed_7c (E, max pool)
        ─ global mean ─► pool3 features (B, 2048) ─ fc ─► logits (B, 1008)

Every "Conv" is pytorch-fid's ``BasicConv2d``: convolution without bias, BatchNorm (eps 0.001, inference
mode: running statistics) and ReLU. The FID variant differs from torchvision's ImageNet Inception-V3 in
its weights, in 1008 classes, in the 3x3 average pools of the A, C and first E blocks, which leave the
zero padding out of the mean (``count_include_pad=False``, as TensorFlow does), and in the pool branch of
the last E block (``Mixed_7c``), which is a 3x3 *max* pool.

Calling convention::

    variables = load_pytorch_fid_weights("pt_inception-2015-12-05-6726825d.pth")  # needs torch
    # or, for tests without the weights: variables = init_params(seed=0)
    feats = fid_features(variables, images)                      # (B, 2048) float32
    feats, logits = fid_features(variables, images, return_logits=True)

``images`` are NHWC, any height and width, 3 channels or 1 (grayscale, repeated to 3). ``uint8`` images
are read as [0, 255]; floating images as ``value_range`` (default ``(-1, 1)``, diffjax's image range;
pass ``(0, 1)`` for pytorch-fid's own convention). Nothing is clipped. The preprocessing is pytorch-fid's
``InceptionV3(resize_input=True, normalize_input=True)``: the images, mapped to [0, 1], are resized
bilinearly to 299x299 with ``F.interpolate(mode="bilinear", align_corners=False)`` and then mapped to
[-1, 1] by ``2x - 1``. The resize here is ``jax.image.resize(..., "bilinear", antialias=False)``, which is
the same interpolation (half-pixel centres, edge samples clamped) for up- and for down-sampling; with the
default ``antialias=True`` JAX would low-pass filter when down-sampling (images larger than 299) and no
longer match pytorch-fid. Neither is TTUR's TensorFlow resize (``tf.image.resize_bilinear`` without
half-pixel centres), so FIDs from TTUR and from pytorch-fid / this module differ slightly (see Parmar et
al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"). pytorch-fid computes FID
from image files, i.e. from uint8 pixels: quantise generated images to uint8 first to compare with it.

Numerics: parameters and activations are float32; convolutions and the fc layer run at
``precision="highest"`` by default so that GPUs (TF32) and TPUs (bfloat16 passes) give the float32
features that FID statistics assume.

The variables are ``{"params": ..., "batch_stats": ...}``; their names follow the PyTorch state dict
(``Mixed_5b.branch1x1.conv.weight`` is ``params["Mixed_5b"]["branch1x1"]["conv"]["kernel"]``, a BatchNorm's
``running_mean``/``running_var`` are ``batch_stats[...]["bn"]["mean"/"var"]``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "FEATURE_DIM",
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "INPUT_SIZE",
    "NUM_CLASSES",
    "InceptionV3FID",
    "convert_pytorch_fid_state_dict",
    "fid_features",
    "init_params",
    "load_pytorch_fid_weights",
    "preprocess_images",
]

Array = jax.Array

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
_MIN_SIZE = 75  # the smallest input the stride-2 stages accept


# --------------------------------------------------------------------------------------------------
# Layers and blocks (pytorch_fid.inception / torchvision.models.inception)
# --------------------------------------------------------------------------------------------------


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv2d(nn.Module):
    """Conv (no bias) ─ BatchNorm (eps 0.001, running statistics) ─ ReLU. Padding is symmetric, as in torch."""

    features: int
    kernel_size: int | tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features, _pair(self.kernel_size), strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision, name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
    """3x3 stride-1 average pool whose mean leaves the zero padding out (TensorFlow's "SAME" pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """pytorch-fid's ``FIDInceptionA`` (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and avg-pool branches."""

    pool_features: int
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, 1, name="branch1x1")(x)
        b5 = conv(48, 1, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's ``InceptionB`` (Mixed_6a): grid reduction 35 -> 17."""

    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, 3, strides=2, name="branch3x3")(x)
        bd = conv(64, 1, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid's ``FIDInceptionC`` (Mixed_6b-e): factorised 7x7 branches and avg-pool branch."""

    channels_7x7: int
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's ``InceptionD`` (Mixed_7a): grid reduction 17 -> 8."""

    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, 1, name="branch3x3_1")(x)
        b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, 1, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (``pool="avg"``, Mixed_7b) / ``FIDInceptionE_2`` (``"max"``, Mixed_7c)."""

    pool: str = "avg"
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, 1, name="branch1x1")(x)
        b3 = conv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = conv(448, 1, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        elif self.pool == "max":
            # pytorch-fid: "The FID Inception model uses max pooling instead of average pooling."
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """The FID Inception-V3 (pytorch-fid's ``fid_inception_v3``), inference mode, NHWC.

    ``__call__(x, return_logits=False)``: ``x`` is (B, H, W, 3) float in [-1, 1] (already preprocessed,
    see :func:`preprocess_images`; FID uses H = W = 299, any size >= 75 runs). Returns the pool3 features
    (B, 2048), or ``(features, logits)`` with logits (B, ``num_classes``) when ``return_logits``. The fc
    layer's parameters exist only in variables initialised with ``return_logits=True``
    (:func:`init_params` and :func:`load_pytorch_fid_weights` do).
    """

    num_classes: int = NUM_CLASSES
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array, return_logits: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3FID expects (B, H, W, 3) images, got shape {x.shape}")
        if min(x.shape[1:3]) < _MIN_SIZE:
            raise ValueError(f"InceptionV3FID needs H, W >= {_MIN_SIZE}, got {x.shape[1:3]}")
        p = self.precision
        conv = functools.partial(BasicConv2d, precision=p)
        x = x.astype(jnp.float32)
        x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = conv(80, 1, name="Conv2d_3b_1x1")(x)
        x = conv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        features = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        if not return_logits:
            return features
        logits = nn.Dense(self.num_classes, precision=p, name="fc")(features)  # dropout: identity
        return features, logits


# --------------------------------------------------------------------------------------------------
# Preprocessing and the jitted feature function
# --------------------------------------------------------------------------------------------------


def preprocess_images(
    images, value_range: tuple[float, float] = (-1.0, 1.0), size: int = INPUT_SIZE
) -> Array:
    """NHWC images -> (B, size, size, 3) float32 in [-1, 1], as pytorch-fid's resize + normalize_input.

    ``uint8`` images are read as [0, 255], floating ones as ``value_range``; both are mapped to [0, 1],
    1-channel images are repeated to 3 channels, the result is resized bilinearly (half-pixel centres, no
    antialiasing: ``F.interpolate(..., mode="bilinear", align_corners=False)``) and mapped to ``2x - 1``.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        x = (images.astype(jnp.float32) - lo) / (hi - lo)
    else:
        raise ValueError(f"images must be uint8 or floating, got dtype {images.dtype}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    b, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)
    return 2.0 * x - 1.0


_MODEL = InceptionV3FID()


@functools.partial(jax.jit, static_argnames=("value_range", "return_logits"))
def _fid_forward(variables, images, value_range, return_logits):
    return _MODEL.apply(variables, preprocess_images(images, value_range), return_logits=return_logits)


def fid_features(
    variables: Mapping[str, Any],
    images,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    return_logits: bool = False,
):
    """The 2048-d FID (pool3) features of a batch of NHWC images, jitted per input shape and dtype.

    ``variables`` come from :func:`load_pytorch_fid_weights` (real FID) or :func:`init_params`.
    ``images``: (B, H, W, 3 or 1), ``uint8`` in [0, 255] or float in ``value_range``; see
    :func:`preprocess_images`. Returns (B, 2048) float32, plus (B, 1008) logits when ``return_logits``
    (an Inception Score needs their softmax). Call it on fixed-size chunks to compile once.
    """
    value_range = (float(value_range[0]), float(value_range[1]))
    return _fid_forward(variables, images, value_range, bool(return_logits))


# --------------------------------------------------------------------------------------------------
# Parameters: random init and pytorch-fid's weights
# --------------------------------------------------------------------------------------------------


def _init_input() -> Array:
    return jnp.zeros((1, _MIN_SIZE, _MIN_SIZE, 3), jnp.float32)


def init_params(seed: int = 0) -> dict:
    """Random variables, fc included: He-normal kernels, zero biases, BatchNorm scale 1, mean 0, var 1.

    Drawn with NumPy from :func:`jax.eval_shape` shapes (compiling Flax's own initialisers for ~95
    kernels takes many times longer on a CPU; docs/performance.md). For tests and shape checks only: FID needs
    :func:`load_pytorch_fid_weights`.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in sorted(_expected_shapes().items()):
        if key[-1] == "kernel":
            std = np.sqrt(2.0 / np.prod(shape[:-1]))
            flat[key] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
        elif key[-1] in ("scale", "var"):
            flat[key] = np.ones(shape, np.float32)
        else:
            flat[key] = np.zeros(shape, np.float32)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = jax.eval_shape(
        lambda: _MODEL.init(jax.random.PRNGKey(0), _init_input(), return_logits=True)
    )
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(abstract)).items()}


def _flax_key(torch_key: str, ndim: int) -> tuple[tuple[str, ...], str]:
    """A torch state-dict key -> (flat flax key, layout), layout in {"OIHW", "OI", "-"}."""
    *module, leaf = torch_key.split(".")
    module = tuple(module)
    if leaf == "running_mean":
        return ("batch_stats", *module, "mean"), "-"
    if leaf == "running_var":
        return ("batch_stats", *module, "var"), "-"
    if leaf == "bias":
        return ("params", *module, "bias"), "-"
    if leaf == "weight":
        if ndim == 4:
            return ("params", *module, "kernel"), "OIHW"
        if ndim == 2:
            return ("params", *module, "kernel"), "OI"
        return ("params", *module, "scale"), "-"
    raise ValueError(f"unexpected tensor {torch_key!r} in the pytorch-fid Inception state dict")


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """pytorch-fid ``fid_inception_v3`` state dict (name -> array-like) -> Flax variables.

    Convolution weights go from OIHW to HWIO, the fc weight is transposed, BatchNorm weight/bias become
    ``scale``/``bias`` and the running statistics ``batch_stats`` ``mean``/``var`` (kept as BatchNorm,
    eps 0.001, not folded). ``num_batches_tracked`` is ignored. Raises ``ValueError`` on missing,
    unexpected or mis-shaped tensors.
    """
    expected = _expected_shapes()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, tensor in state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        value = np.asarray(tensor, dtype=np.float32)
        key, layout = _flax_key(name, value.ndim)
        if layout == "OIHW":
            value = value.transpose(2, 3, 1, 0)
        elif layout == "OI":
            value = value.T
        if key not in expected:
            raise ValueError(f"unexpected tensor {name!r} in the pytorch-fid Inception state dict")
        if value.shape != expected[key]:
            raise ValueError(
                f"{name!r}: shape {value.shape} after conversion, expected {expected[key]} "
                f"(is this the FID Inception, 1008 classes, without AuxLogits?)"
            )
        flat[key] = value
    missing = sorted(".".join(k) for k in expected if k not in flat)
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the pytorch-fid state dict, e.g. {missing[:3]}")
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def load_pytorch_fid_weights(path: str | os.PathLike) -> dict:
    """Read pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a torch state dict) -> Flax variables.

    The file is at :data:`FID_WEIGHTS_URL`. Reading it needs ``torch`` (imported here, not at module
    import; any build, the CPU one is enough).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pytorch-fid Inception weights not found at {path!r} (download {FID_WEIGHTS_URL})")
    try:
        import torch
    except ImportError as e:
        raise ImportError("load_pytorch_fid_weights needs torch to read the .pth file: pip install torch") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{path!r} does not hold a state dict (got {type(state_dict).__name__})")
    return convert_pytorch_fid_state_dict(
        {k: v.detach().cpu().numpy() for k, v in state_dict.items() if hasattr(v, "detach")}
    )

