"""decode_image on real files in every awkward form a photo archive holds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from big_images import BIG, claimed_size_jpeg, flat_jpeg
from data_helpers import encode, exif_rotated_jpeg, is_red_left_blue_right, red_left_blue_right
from PIL import Image

from search.errors import DataError
from search.images import ImageDecodeError, decode_image


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    data = exif_rotated_jpeg(orientation)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert stored.shape[0] > stored.shape[1]  # really stored on its side
    out = decode_image(io.BytesIO(data), 32)
    assert out.shape == (32, 32, 3)
    assert is_red_left_blue_right(out)


def test_plain_image_keeps_its_orientation() -> None:
    out = decode_image(io.BytesIO(encode(red_left_blue_right(), quality=95)), 24)
    assert is_red_left_blue_right(out)


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        (Image.new("L", (30, 20), 77), "JPEG", (77, 77, 77)),
        (Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (Image.new("RGBA", (30, 20), (0, 0, 255, 0)), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (30, 20), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
        (Image.new("LA", (30, 20), (0, 0)), "PNG", (255, 255, 255)),
        (Image.fromarray(np.full((20, 30), 32896, np.uint16)), "PNG", (128, 128, 128)),
        (Image.new("1", (30, 20), 1), "PNG", (255, 255, 255)),
    ],
    ids=["gray", "cmyk", "transparent", "opaque-alpha", "la", "16-bit", "bilevel"],
)
def test_every_mode_becomes_rgb(img: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    out = decode_image(io.BytesIO(encode(img, fmt)), 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), expected, atol=4)


def test_palette_png_with_a_jpg_name_is_converted(tmp_path: Path) -> None:
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(img, "PNG"))
    out = decode_image(path, 8)
    np.testing.assert_array_equal(out[4, 4], [10, 200, 30])
    assert np.array_equal(decode_image(str(path), 8), out)


def test_short_side_is_resized_and_centre_cropped() -> None:
    img = Image.new("RGB", (300, 100), (0, 255, 0))
    img.paste((255, 0, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    out = decode_image(io.BytesIO(encode(img, "PNG")), 20)
    assert out.shape == (20, 20, 3)
    # only the filter's outermost taps may touch the green/blue thirds
    np.testing.assert_array_equal(out[:, 2:-2], np.broadcast_to([255, 0, 0], (20, 16, 3)))
    assert out[:, [0, -1], 0].min() > 200


def test_large_jpeg_decodes_quickly_via_draft() -> None:
    y, x = np.mgrid[0:2000, 0:3000]
    arr = np.stack([(x // 7) % 256, (y // 5) % 256, ((x + y) // 11) % 256], -1).astype(np.uint8)
    data = encode(Image.fromarray(arr), quality=90)
    start = time.perf_counter()
    out = decode_image(io.BytesIO(data), 224)
    elapsed = time.perf_counter() - start
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]
    assert elapsed < 1.0
    # the reduced-scale decode still sees the picture: mean colour matches the full decode
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(out.mean((0, 1)), full[:, 500:2500].mean((0, 1)), atol=6)


def test_truncated_jpeg_fails() -> None:
    data = encode(red_left_blue_right(400, 300), quality=95)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(io.BytesIO(data[: len(data) // 2]), 32)
    assert info.value.reason == "truncated JPEG"
    assert isinstance(info.value, DataError)


@pytest.mark.parametrize("payload", [b"hello, not a photo", b""])
def test_not_an_image_fails(payload: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(io.BytesIO(payload), 32)


def test_missing_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="missing file"):
        decode_image(tmp_path / "nope.jpg", 32)


def test_hostile_size_in_the_header_is_refused_at_open() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(io.BytesIO(claimed_size_jpeg(50_000, 50_000)), 32)
    assert info.value.reason == "image too large (2,500 megapixels, decompression-bomb guard)"


def test_largest_real_photo_sizes_pass_without_a_bomb_warning() -> None:
    """8,688 px on the long side, even square (75 MP), is under Pillow's 89 MP warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(claimed_size_jpeg(8688, 8688))) as img:
            assert img.size == (8688, 8688)


# Decodes in a fresh process; prints the result's shape and mean colour and how much the
# process's peak resident memory grew, in MB.
_PEAK_GROWTH = """
import io, json, resource, sys, warnings
from pathlib import Path
warnings.simplefilter("error", Warning)
from search.images import decode_image
data = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = decode_image(io.BytesIO(data), 224)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([out.shape, out.reshape(-1, 3).mean(0).tolist(), (after - before) / 1024]))
"""


def test_8688_px_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    """A full 8,688 x 5,792 RGB frame is 200 MB in Pillow (4 bytes a pixel); the draft decode
    at 1/8 scale needs about 10 MB. Peak RSS of a fresh process, which only grows."""
    path = tmp_path / "big.jpg"
    path.write_bytes(flat_jpeg(BIG))
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_GROWTH, str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and not run.stderr, run.stderr  # no warning either
    shape, colour, grew_mb = json.loads(run.stdout)
    assert shape == [224, 224, 3]
    np.testing.assert_allclose(colour, [90, 140, 60], atol=3)
    assert grew_mb < 60, f"decoding grew the peak RSS by {grew_mb:.0f} MB: no reduced-scale decode?"
