"""Decode any photo into a square uint8 RGB array of a fixed size.

Real EOL images are 2,000-4,000 px JPEGs in every colour mode a camera or an editor can write
(RGB, grayscale, CMYK, palette, alpha, 16-bit) and often carry an EXIF orientation instead of
rotated pixels. Everything downstream (the uint8 cache, the backbones) wants one thing: an
upright (size, size, 3) RGB array, so all of that is normalised here and nowhere else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from search.errors import DataError

__all__ = ["ImageDecodeError", "decode_image"]

# Pillow's 16-bit and float modes: convert("RGB") clips them instead of rescaling.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageDecodeError(DataError):
    """One file cannot be decoded; `reason` is the short text written to report.csv."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(source: str | Path | BinaryIO, size: int) -> np.ndarray:
    """Decode `source` to a uint8 (size, size, 3) array: upright, RGB, short side resized to
    `size`, centre-cropped.

    JPEGs are decoded at a reduced DCT scale (`draft`) that still leaves at least 2x `size`
    on each side: an 8x cheaper decode for 3,000 px photos, with enough headroom that the final
    antialiased resize keeps fine texture. The whole file is decoded (`load`), so a truncated
    file raises here rather than becoming a grey-padded image in the cache.

    Pillow's decompression-bomb guard refuses at open any image whose header claims more than
    2 x Image.MAX_IMAGE_PIXELS (179 MP) and warns above 89 MP. The largest real photos, 8,688 px
    on the long side (75 MP even if square), pass it without a warning, and draft decodes them
    at 1/8 scale: about 10 MB instead of a 200 MB full frame.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    fmt = "image"
    try:
        with Image.open(source) as img:
            fmt = img.format or fmt
            img.draft("RGB", (size * 2, size * 2))
            img.load()
            rgb = _to_rgb(_upright(img))
            out = _resize_crop(rgb, size)
    except FileNotFoundError as exc:
        raise ImageDecodeError("missing file") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large ({_pixels(exc)}decompression-bomb guard)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeError(_reason(exc, fmt)) from exc
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # pragma: no cover - guards Pillow behaviour changes
        raise ImageDecodeError(f"decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _pixels(exc: Image.DecompressionBombError) -> str:
    """How large the header says the image is, from Pillow's message ("Image size (N pixels)
    exceeds ..."); Pillow refuses it at open, before the size is anywhere else."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1)) / 1e6:,.0f} megapixels, " if found else ""


def _reason(exc: BaseException, fmt: str) -> str:
    """Short, stable problem text: report.csv is read by people scanning for patterns."""
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError):
        return f"truncated {fmt}"
    if "broken data stream" in text or "corrupt" in text or "decoder" in text:
        return "corrupt image data"
    first = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
    return f"unreadable image ({first})"


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored, not fatal, because the
    pixels themselves are fine."""
    try:
        turned = ImageOps.exif_transpose(img)
    except Exception:  # any EXIF parsing failure means "no usable orientation"
        return img
    return turned if turned is not None else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha is composited on white (transparent background of a
    cut-out photo reads as paper, not as black), 16-bit/float values are rescaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif img.mode != "F" and (img.mode.startswith("I;16") or (a.size and a.max() > 255)):
            a = a / 257.0
        gray = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the centred square of side min(w, h) to size x size in one resampling pass
    (Pillow's `box` argument), so the crop costs nothing and no pixel is resampled twice."""
    w, h = img.size
    side = min(w, h)
    left = (w - side) / 2.0
    top = (h - side) / 2.0
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
