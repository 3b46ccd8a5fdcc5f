"""The COCO panoptic file format: RGB-encoded segment-id PNGs and the panoptic JSON.

A PNG pixel (R, G, B) holds the segment id R + 256*G + 256^2*B; 0 is void (unlabelled). Every
reader here turns an unreadable file into a DataError that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from maxdeeplab.platform.errors import DataError


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> H x W int64 segment ids."""
    rgb = rgb.astype(np.int64, copy=False)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """H x W integer segment ids (< 256^3) -> H x W x 3 uint8."""
    ids = np.asarray(ids, dtype=np.int64)
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids % 256
    rgb[..., 1] = (ids // 256) % 256
    rgb[..., 2] = (ids // 65536) % 256
    return rgb


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Read a panoptic PNG as H x W int64 segment ids.

    Raises:
        DataError: the file is missing, unreadable or not a 3-channel image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: panoptic PNG not found")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt PNG ({exc})") from None
    return rgb_to_id(rgb)


def write_panoptic_png(path: str | Path, ids: np.ndarray) -> None:
    """Write H x W segment ids as an RGB-encoded PNG."""
    Image.fromarray(id_to_rgb(ids)).save(path)


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a panoptic JSON file.

    Raises:
        DataError: the file is missing or not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: JSON file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None
