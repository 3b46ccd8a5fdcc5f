"""Images decode as deeplab2's `tf.io.decode_image(channels=3)` (docs/deeplab2.md#image-decoding):
JPEGs by libjpeg's fast IDCT with fancy upsampling, told by magic bytes; the rest by Pillow."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from maxdeeplab.platform.data.image_io import decode_image, read_image
from maxdeeplab.platform.errors import DataError


def smooth_image_with_edges(height: int = 67, width: int = 93) -> np.ndarray:
    """H x W x 3 uint8: gradients and a sharp rectangle, where the two IDCTs round differently."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([128 + 100 * np.sin(x / 7), 128 + 100 * np.cos(y / 5), (3 * x + 2 * y) % 256])
    image = image.transpose(1, 2, 0)
    image[20:40, 30:60] = (250, 10, 30)
    return image.astype(np.uint8)


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    """4:2:0 at quality 90, as COCO's photographs mostly are."""
    return encode(Image.fromarray(smooth_image_with_edges()), quality=90, subsampling=2)


def test_jpeg_decodes_with_the_fast_idct_and_fancy_upsampling(jpeg: bytes) -> None:
    decoded = decode_image(jpeg)
    expected = simplejpeg.decode_jpeg(jpeg, fastdct=True, fastupsample=False)
    assert decoded.shape == (67, 93, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)
    # Pillow's accurate IDCT (JDCT_ISLOW) rounds differently on many pixels, by a few levels
    difference = np.abs(decoded.astype(int) - pillow_decode(jpeg))
    assert (difference.max(-1) > 0).mean() > 0.1 and 0 < difference.max() <= 16


def test_the_format_comes_from_the_magic_bytes_not_the_name(jpeg: bytes, tmp_path: Path) -> None:
    image = smooth_image_with_edges()
    named_png, named_jpg = tmp_path / "photo.png", tmp_path / "lossless.jpg"
    named_png.write_bytes(jpeg)
    named_jpg.write_bytes(encode(Image.fromarray(image), "PNG"))
    np.testing.assert_array_equal(read_image(named_png), decode_image(jpeg))
    np.testing.assert_array_equal(read_image(named_jpg), image)


def test_greyscale_jpeg_becomes_three_equal_channels() -> None:
    data = encode(Image.fromarray(smooth_image_with_edges()[..., 0]), quality=90)
    decoded = decode_image(data)
    grey = simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, fastupsample=False)
    assert decoded.shape == (67, 93, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], grey[..., 0])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_png_goes_through_pillow_unchanged(mode: str) -> None:
    image = Image.fromarray(smooth_image_with_edges()).convert(mode)
    decoded = decode_image(encode(image, "PNG"))
    np.testing.assert_array_equal(decoded, np.asarray(image.convert("RGB")))


def without_adobe_segment(data: bytes) -> bytes:
    start = data.index(b"\xff\xee")
    length = int.from_bytes(data[start + 2 : start + 4], "big")
    return data[:start] + data[start + 2 + length :]


def test_cmyk_converts_by_tensorflows_formula() -> None:
    # Pillow writes Adobe's inverted CMYK: stored (C, M, Y, K) = (255, 0, 127, 255) here.
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 128, 0)), quality=95)
    # with the Adobe segment R = K * C / 255 ...
    np.testing.assert_allclose(decode_image(data)[8, 8], (255, 0, 127), atol=1)
    # ... without it (255 - K) * (255 - C) / 255: K = 255 is black
    np.testing.assert_allclose(decode_image(without_adobe_segment(data))[8, 8], (0, 0, 0), atol=1)


def test_recoverable_corruption_decodes_as_libjpeg_does(jpeg: bytes) -> None:
    # stray bytes before a header marker: libjpeg warns and skips them
    frame = jpeg.index(b"\xff\xc0")
    np.testing.assert_array_equal(
        decode_image(jpeg[:frame] + b"\x00\x11\x22" + jpeg[frame:]), decode_image(jpeg)
    )
    # an end-of-image marker mid-scan: libjpeg warns and fills the rest of the scan
    scan, end = jpeg.index(b"\xff\xda"), jpeg.rindex(b"\xff\xd9")
    cut = decode_image(jpeg[: (scan + end) // 2] + b"\xff\xd9")
    assert cut.shape == (67, 93, 3)
    np.testing.assert_array_equal(cut[:8], decode_image(jpeg)[:8])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[: len(data) * 2 // 3], "truncated JPEG"),  # TensorFlow fails too
        # a recoverable warning first: the decoder's message is not about the truncation
        (lambda data: data[:1000] + b"\xff\xd0" + data[1000:2000], "truncated JPEG"),
        (lambda data: data[:200], "unreadable or corrupt image"),
        (lambda data: b"not an image", "unknown format"),
        (lambda data: encode(Image.new("RGB", (8, 8)), "PNG")[:40], "unreadable or corrupt"),
    ],
    ids=["truncated", "warning-then-truncated", "header-only", "garbage", "truncated-png"],
)
def test_corrupt_files_raise_a_data_error_naming_them(
    jpeg: bytes, tmp_path: Path, damage: Callable[[bytes], bytes], reason: str
) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(damage(jpeg))
    with pytest.raises(DataError, match=rf"{path}: .*{reason}"):
        read_image(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.jpg: image not found"):
        read_image(tmp_path / "gone.jpg")
