"""Image helpers shared by the builders and the input pipeline (PIL and numpy only, no TensorFlow)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["RESIZE_MODES", "encode_png", "fit_image", "load_image", "set_channels"]

# "crop": scale the shorter side to the size (antialiased bicubic), then center-crop the longer one.
# "pad":  no resampling: center-pad with black (or center-crop) to the size, e.g. Fashion-MNIST 28 -> 32.
RESIZE_MODES = ("crop", "pad")


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 1) or (H, W, 3) array (what tfds's Image feature stores)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def read_image(path: str, channels: int, size: tuple[int, int] | None = None, resize: bool = False,
               what: str = "image", mask: bool = False) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) pixels of any image file (:func:`load_image`: palette, 16-bit, alpha and RGB for a
    grey model converted, not read as raw indices or one channel); FileNotFoundError naming a missing ``path``.

    With ``size`` (H, W), the model's: an image of another size, or a colour image for a grey model
    (``channels=1``), is a one-line ValueError naming ``what``, unless ``resize``: then it is resized (bicubic;
    nearest for a ``mask``, whose colour does not matter) and converted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if size is None:
        return np.asarray(load_image(path, channels))
    rgb = load_image(path, 3)
    pixels = np.asarray(rgb)
    colour = not mask and channels == 1 and bool(np.any(pixels != pixels[..., :1]))
    h, w = pixels.shape[:2]
    if ((h, w) != tuple(size) or colour) and not resize:
        kind = "a colour image" if colour else "an image"
        raise ValueError(f"{what} {path} is {kind} of {h}x{w}; the model's images are {size[0]}x{size[1]}"
                         + (", grey" if channels == 1 else "") + " (--resize resizes and converts it)")
    if (h, w) != tuple(size):
        resample = Image.Resampling.NEAREST if mask else Image.Resampling.BICUBIC
        rgb = rgb.resize((size[1], size[0]), resample)
    return np.asarray(rgb.convert("L") if channels == 1 else rgb)


def load_image(path: str, channels: int, size: int | None = None) -> Image.Image:
    """Open any image file as a PIL image in mode "L" (channels=1) or "RGB" (channels=3).

    EXIF orientation is applied; transparency is composited over white; for JPEGs larger than needed,
    ``size`` lets the decoder downscale while decoding (``Image.draft``).
    """
    with Image.open(path) as im:
        if size and im.format == "JPEG":
            im.draft("RGB" if channels == 3 else "L", (size, size))  # keeps both sides >= size
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: rescale (convert("L") would clip)
            scale = 65535.0 if np.asarray(im).max() > 255 or im.mode.startswith("I;16") else 255.0
            im = Image.fromarray(np.clip(np.rint(np.asarray(im, np.float64) * (255.0 / scale)), 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("L" if channels == 1 else "RGB")
        im.load()
    return im


def _fit_pil(im: Image.Image, size: int, mode: str) -> Image.Image:
    w, h = im.size
    if (w, h) == (size, size):
        return im
    if mode == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
        left, top = (nw - size) // 2, (nh - size) // 2
        return im.crop((left, top, left + size, top + size))
    if mode == "pad":
        # PIL's crop pads with zeros where the box leaves the image: one call both pads and crops.
        left, top = (w - size) // 2, (h - size) // 2
        return im.crop((left, top, left + size, top + size))
    raise ValueError(f"data.resize_mode must be one of {RESIZE_MODES}, got {mode!r}")


def fit_image(image, size: int, mode: str = "crop") -> np.ndarray:
    """A square ``size`` x ``size`` image from a PIL image or a uint8 (H, W[, C]) array (see
    :data:`RESIZE_MODES`); returns uint8 (size, size, C) with C as given (1 for 2-D input)."""
    if isinstance(image, Image.Image):
        out = np.asarray(_fit_pil(image, size, mode))
        return out[..., None] if out.ndim == 2 else out
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    h, w, c = image.shape
    if (h, w) == (size, size):
        return image
    if mode == "pad":  # exact, channel-agnostic, no PIL
        out = np.zeros((size, size, c), image.dtype)
        top, left = (h - size) // 2, (w - size) // 2
        src = image[max(top, 0) : max(top, 0) + min(h, size), max(left, 0) : max(left, 0) + min(w, size)]
        dt, dl = max(-top, 0), max(-left, 0)
        out[dt : dt + src.shape[0], dl : dl + src.shape[1]] = src
        return out
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(_fit_pil(pil, size, mode))
    return out[..., None] if out.ndim == 2 else out


def set_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W, C) with C in {1, 3, 4} to (H, W, channels): gray repeated to RGB, RGB to gray with
    ITU-R 601 luma (as PIL's "L"), alpha dropped."""
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 4:
        image, c = image[..., :3], 3
    if c == 2:
        image, c = image[..., :1], 1
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert an image with {image.shape[-1]} channels to {channels}")
