"""Very large photos, made cheaply: a flat-colour JPEG of a real 8,688 px camera (encodes in
about a second), and a hostile JPEG whose header claims a size its few bytes do not hold."""

from __future__ import annotations

import io
import struct

from PIL import Image

BIG = (8688, 5792)  # a 50 MP full-frame camera's photo, long side 8,688 px


def flat_jpeg(size: tuple[int, int] = BIG) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 140, 60)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def claimed_size_jpeg(width: int, height: int) -> bytes:
    """A valid 16 x 16 JPEG whose SOF0 header says width x height: Pillow reads the size from
    the header at open, as it would for a real image that large."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)
