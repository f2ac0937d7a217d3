"""The one image decoder every stage uses (prepare, extract, verify, the student loader).

Alignment starts here: the manifest's width/height, the teacher's pixels and the student's pixels
all come from :func:`decode_image`, so a crop box computed from the manifest lands on the same
pixels everywhere.

Policy (stated once, tested in tests/test_bad_input.py):

* CMYK, grayscale, palette, 16-bit and other modes are converted to 8-bit RGB;
* an alpha channel is composited onto white (transparent pixels are not black noise);
* EXIF orientation is *not* applied — the stored pixel grid is the grid;
* images above :data:`MAX_PIXELS` are refused (decompression-bomb limit), as are empty or
  undecodable files. Refusals raise :class:`BadImage` with a short reason the caller records.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 89_478_485  # PIL's own default bomb threshold, made explicit and an error, not a warning


class BadImage(ValueError):
    """An image that cannot be used; ``str(exc)`` is the reason recorded in skip lists."""


def _reason(e: Exception) -> str:
    # PIL messages embed object reprs ("<_io.BytesIO object at 0x7f...>"): drop them so the same bad
    # file gives the same recorded reason on every run (manifests and skip lists are reproducible).
    return f"{type(e).__name__}: " + re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(e))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _wide_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_ROWS_PER_BLOCK = 256


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit grayscale to 8-bit RGB, a block of rows at a time: a float64 copy of a 9400x9400 image
    is 0.7 GB, and the one-shot version peaked at 3.3 GB; this stays near the source plus the output."""
    arr = np.asarray(img)
    hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    out = np.empty(arr.shape, dtype=np.uint8)
    for lo in range(0, arr.shape[0], _ROWS_PER_BLOCK):
        block = arr[lo : lo + _ROWS_PER_BLOCK].astype(np.float64)
        out[lo : lo + _ROWS_PER_BLOCK] = np.clip(block / hi * 255.0 + 0.5, 0, 255)
    del arr
    return Image.fromarray(out, mode="L").convert("RGB")


def probe_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header, after the same checks :func:`decode_image` makes."""
    img = _open(data)
    return img.size


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
    except Image.DecompressionBombWarning as e:  # pragma: no cover - PIL raises the error first
        raise BadImage(f"too large: {e}") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except Exception as e:  # PIL raises many types for bad headers
        raise BadImage(f"undecodable: {_reason(e)}") from None
    if w * h > MAX_PIXELS:
        raise BadImage(f"too large: {w}x{h} exceeds {MAX_PIXELS} pixels")
    if w <= 0 or h <= 0:
        raise BadImage(f"empty image: {w}x{h}")
    return img


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to an 8-bit RGB ``PIL.Image`` or raise :class:`BadImage` naming why."""
    img = _open(data)
    try:
        img.load()
    except Exception as e:
        raise BadImage(f"undecodable: {_reason(e)}") from None
    return _to_rgb(img)


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    """``[3, H, W]`` uint8 array of an RGB image."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
