"""Image decoding as deeplab2's input pipeline does it (docs/deeplab2.md#image-decoding).

deeplab2 decodes images with `tf.io.decode_image(channels=3)`, which picks the decoder by the
file's first bytes. For a JPEG that is libjpeg with the fast integer IDCT and fancy (smooth) chroma
upsampling; `simplejpeg` (libjpeg-turbo) with `fastdct=True, fastupsample=False` gives the same
pixels, where Pillow's accurate IDCT differs by a few levels on most of them. Every other format
(PNG, ...) is decoded by Pillow and converted to RGB, as TensorFlow's PNG decoder would.

TensorFlow's JPEG decoder, reproduced here:
- greyscale JPEGs are expanded to three equal channels by libjpeg;
- CMYK and YCCK JPEGs are decoded to CMYK by libjpeg and converted to RGB by TensorFlow's own
  integer formula, which depends on whether an Adobe APP14 segment was seen;
- libjpeg's recoverable warnings (corrupt entropy data, stray bytes between header segments) do
  not fail a decode; running out of data does (`try_recover_truncated=False`).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from maxdeeplab.platform.errors import DataError

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI followed by the first marker; what TensorFlow sniffs
# libjpeg's JWRN_JPEG_EOF, which TensorFlow's memory source turns into a failed decode
TRUNCATED_MESSAGE = "Premature end of JPEG file"
_SOI, _EOI, _SOS, _APP14 = 0xD8, 0xD9, 0xDA, 0xEE
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length field
_ADOBE_MIN_LENGTH = 2 + 12  # length field + libjpeg's APP14_DATA_LEN
# simplejpeg raises ValueError for bad data, and KeyError for an unknown subsampling when not strict
_DECODER_ERRORS = (ValueError, KeyError)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as deeplab2 decodes it: H x W x 3 uint8 RGB.

    Raises:
        DataError: the file is missing, unreadable or corrupt (names it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None
    return decode_image(data, name=str(path))


def decode_image(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes as `tf.io.decode_image(data, channels=3)`: H x W x 3 uint8.

    Args:
        data: the encoded file: JPEG (recognised by its first bytes, not a file name) or any
            format Pillow reads.
        name: what error messages call the data (a file path).

    Raises:
        DataError: the data is not a readable image or is truncated (names `name`).
    """
    if data.startswith(JPEG_MAGIC):
        return _decode_jpeg(data, name)
    try:
        with Image.open(BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise DataError(f"{name}: unreadable or corrupt image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: unreadable or corrupt image ({exc})") from None


def _decode_jpeg(data: bytes, name: str) -> np.ndarray:
    data, saw_adobe = _tidy_jpeg_header(data)
    truncated = f"{name}: unreadable or corrupt image (truncated JPEG)"
    try:  # strict: a truncated file is told apart from recoverable corruption by the message
        return _decompress(data, saw_adobe=saw_adobe, strict=True)
    except _DECODER_ERRORS as exc:
        if TRUNCATED_MESSAGE in str(exc):
            raise DataError(truncated) from None
        first_error = exc
    try:  # a recoverable warning, which TensorFlow ignores: decode past it as libjpeg does
        pixels = _decompress(data, saw_adobe=saw_adobe, strict=False)
    except _DECODER_ERRORS:
        raise DataError(f"{name}: unreadable or corrupt image ({first_error})") from None
    # Not strict, the decoder also runs past the end of the data, which TensorFlow refuses. Scan
    # data never holds FF D9 (a data byte FF is followed by 00), so a file whose last scan header
    # is not followed by an end-of-image marker ran out of data.
    if data.rfind(bytes((0xFF, _EOI))) < data.rfind(bytes((0xFF, _SOS))):
        raise DataError(truncated)
    return pixels


def _decompress(data: bytes, *, saw_adobe: bool, strict: bool) -> np.ndarray:
    _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data, strict=strict)
    four_channel = colorspace in ("CMYK", "YCCK")
    pixels = simplejpeg.decode_jpeg(
        data,
        colorspace="CMYK" if four_channel else "RGB",
        fastdct=True,  # libjpeg's JDCT_IFAST: TensorFlow's default dct_method
        fastupsample=False,  # fancy upsampling: decode_image's fancy_upscaling=True
        strict=strict,
    )
    return _cmyk_to_rgb(pixels, saw_adobe=saw_adobe) if four_channel else pixels


def _cmyk_to_rgb(cmyk: np.ndarray, *, saw_adobe: bool) -> np.ndarray:
    """H x W x 4 uint8 CMYK -> H x W x 3 uint8, by TensorFlow's formula (`jpeg_mem.cc`).

    Adobe writes inverted CMYK, so with its APP14 segment R = K * C / 255, else
    R = (255 - K) * (255 - C) / 255; integer division, likewise for G (M) and B (Y).
    """
    cmyk = cmyk.astype(np.int32)
    ink, black = cmyk[..., :3], cmyk[..., 3:]
    rgb = black * ink // 255 if saw_adobe else (255 - black) * (255 - ink) // 255
    return rgb.astype(np.uint8)


def _tidy_jpeg_header(data: bytes) -> tuple[bytes, bool]:
    """(data without stray bytes between header segments, whether an Adobe APP14 was seen).

    libjpeg skips bytes that are not a marker between header segments with a warning
    ("extraneous bytes before marker"), which TensorFlow ignores but simplejpeg cannot decode
    past, even when not strict. The segments up to the first scan are copied without them; the
    rest is copied verbatim. A malformed header is returned unchanged, for the decoder to reject.
    """
    kept, pos, saw_adobe = bytearray(data[:2]), 2, False
    while True:
        start = data.find(b"\xff", pos)
        if start < 0:
            return data, saw_adobe
        end = start + 1
        while end < len(data) and data[end] == 0xFF:  # fill bytes
            end += 1
        if end >= len(data):
            return data, saw_adobe
        marker = data[end]
        if marker == 0x00:  # a stuffed zero: not a marker, skipped like any stray byte
            pos = end + 1
            continue
        if marker in (_SOI, _EOI):  # libjpeg's own error, before any image
            return data, saw_adobe
        if marker == _SOS:
            if len(kept) == start:  # nothing was dropped
                return data, saw_adobe
            return bytes(kept) + data[start:], saw_adobe
        if marker in _STANDALONE_MARKERS:
            kept += bytes((0xFF, marker))
            pos = end + 1
            continue
        length = int.from_bytes(data[end + 1 : end + 3], "big")
        if length < 2 or end + 1 + length > len(data):
            return data, saw_adobe
        segment = data[end + 1 : end + 1 + length]
        if marker == _APP14 and length >= _ADOBE_MIN_LENGTH and segment[2:7] == b"Adobe":
            saw_adobe = True
        kept += bytes((0xFF, marker)) + segment
        pos = end + 1 + length
