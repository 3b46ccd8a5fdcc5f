"""Image decoding parity with deeplab2: `read_image` against `tf.io.decode_image(channels=3)`.

deeplab2 decodes in its own TensorFlow environment (`scripts/deeplab2_decode.py`, in a
subprocess) JPEGs of every subsampling, progressive, greyscale, odd-sized, CMYK with and without
Adobe's segment, with recoverable corruption, and PNGs; every pixel must be equal, and truncated
files must fail in both (docs/deeplab2.md#image-decoding). Skipped unless DEEPLAB2_ENV names a
reference environment built by `scripts/deeplab2_env.sh` (CI has no TensorFlow).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maxdeeplab.platform.data.image_io import read_image
from maxdeeplab.platform.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
ENV = os.environ.get("DEEPLAB2_ENV", "")

pytestmark = pytest.mark.skipif(
    not ENV or not (Path(ENV) / "activate.sh").is_file(),
    reason="DEEPLAB2_ENV does not point to a deeplab2 reference environment "
    "(build one with scripts/deeplab2_env.sh)",
)


def _photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8: gradients, hard-edged blocks and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([128 + 100 * np.sin(x / 9), 128 + 90 * np.cos(y / 6), (2 * x + 3 * y) % 256])
    image = image.transpose(1, 2, 0)
    for _ in range(6):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        image[top : top + rng.integers(4, 40), left : left + rng.integers(4, 60)] = rng.integers(
            0, 256, 3
        )
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def _write_cases(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(_photo_like(rng, 240, 320))
    odd = Image.fromarray(_photo_like(rng, 97, 131))
    cases = {
        "q90_420.jpg": (photo, {"quality": 90, "subsampling": 2}),
        "q75_422.jpg": (photo, {"quality": 75, "subsampling": 1}),
        "q95_444.jpg": (photo, {"quality": 95, "subsampling": 0}),
        "q50_420.jpg": (photo, {"quality": 50}),
        "progressive.jpg": (photo, {"quality": 85, "progressive": True, "optimize": True}),
        "odd_size.jpg": (odd, {"quality": 90}),
        "grey.jpg": (photo.convert("L"), {"quality": 90}),
        "cmyk_adobe.jpg": (photo.convert("CMYK"), {"quality": 90}),
        "rgba.png": (photo.convert("RGBA"), {}),
        "palette.png": (odd.convert("P"), {}),
    }
    paths = []
    for name, (image, options) in cases.items():
        paths.append(folder / name)
        image.save(paths[-1], **options)
    jpeg = (folder / "q90_420.jpg").read_bytes()
    cmyk = (folder / "cmyk_adobe.jpg").read_bytes()
    adobe = cmyk.index(b"\xff\xee")  # Adobe's APP14 segment: marker, 2-byte length, data
    adobe_end = adobe + 2 + int.from_bytes(cmyk[adobe + 2 : adobe + 4], "big")
    frame, scan, end = jpeg.index(b"\xff\xc0"), jpeg.index(b"\xff\xda"), jpeg.rindex(b"\xff\xd9")
    quarter, middle = (3 * scan + end) // 4, (scan + end) // 2
    damaged = {
        "cmyk_plain.jpg": cmyk[:adobe] + cmyk[adobe_end:],
        "stray_header_bytes.jpg": jpeg[:frame] + b"\x00\x11\x22" + jpeg[frame:],
        "eoi_mid_scan.jpg": jpeg[:middle] + b"\xff\xd9",
        "truncated.jpg": jpeg[:middle],
        # a recoverable warning (a restart marker out of place), then the data runs out
        "marker_then_truncated.jpg": jpeg[:quarter] + b"\xff\xd0" + jpeg[quarter:middle],
        "no_eoi.jpg": jpeg[:end],
    }
    for name, data in damaged.items():
        paths.append(folder / name)
        paths[-1].write_bytes(data)
    return paths


def test_read_image_equals_deeplab2_decoding_on_every_pixel(tmp_path: Path) -> None:
    paths = _write_cases(tmp_path)
    out = tmp_path / "deeplab2.npz"
    script = ROOT / "scripts" / "deeplab2_decode.py"
    files = " ".join(f'"{p}"' for p in paths)
    command = f'source "{ENV}/activate.sh" && python "{script}" "{out}" {files}'
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reference = dict(np.load(out))
    for i, path in enumerate(paths):
        if reference["failed"][i]:
            with pytest.raises(DataError, match=path.name):
                read_image(path)
            continue
        expected, ours = reference[f"image_{i}"], read_image(path)
        assert ours.shape == expected.shape, path.name
        differing = int((ours != expected).any(-1).sum())
        assert differing == 0, f"{path.name}: {differing} pixels differ from deeplab2's decoding"
    failing = ("truncated.jpg", "marker_then_truncated.jpg", "no_eoi.jpg")
    assert reference["failed"].tolist() == [p.name in failing for p in paths]
