"""Record deeplab2's input geometry (resize to the crop, random-scale sizes) as a test table.

Runs INSIDE the deeplab2 reference environment (scripts/deeplab2_env.sh), never in the project's
venv: it calls deeplab2's own TensorFlow functions and imports nothing of maxdeeplab.

    source $DEEPLAB2_ENV/activate.sh
    python scripts/deeplab2_resize_table.py tests/platform/data/deeplab2_resize_table.npz

The .npz holds (tests/platform/data/test_transforms.py reads it):
- `crops` [C]: the crop sides S, 641 and 1025;
- `longer` [L]: the longer image sides, 375..640 (COCO's range);
- `resized_shorter`, `resized_longer` [C, L, 640] int16: the sides of a (shorter, longer) image
  after `preprocess_utils.resize_to_range_helper(min_size=S, max_size=S)` (the training and
  evaluation resize), for every shorter side 1..640 (column shorter - 1; -1 where shorter >
  longer). The helper gets int32 tensors, as `resolve_shape` of a decoded image gives it. deeplab2's
  arithmetic is symmetric in height and width; the script checks that on a sample;
- `scales` [11] float32: the values `preprocess_utils.get_random_scale(0.5, 1.5, 0.1)` draws;
- `scaled` [1024, 11] int32: the height after `preprocess_utils.randomly_scale_image_and_label`
  of an image of height 2..1025 (row height - 2) by each scale.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from deeplab2.data.preprocessing import preprocess_utils  # noqa: E402

CROPS = (641, 1025)
LONGER = np.arange(375, 641)
MAX_SHORTER = 640
SCALE_RANGE = (0.5, 1.5, 0.1)  # every COCO MaX-DeepLab config
SCALED_HEIGHTS = np.arange(2, 1026)  # 1 x 0.5 would be an empty image
SCALE_DRAWS = 400  # draws of get_random_scale; 11 values, so every one appears


def resize_table(crop: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, 640] shorter and longer sides after deeplab2's resize to `crop` (-1: not a size)."""
    shorter, longer = np.meshgrid(np.arange(1, MAX_SHORTER + 1), LONGER)
    valid = shorter <= longer
    new = preprocess_utils.resize_to_range_helper(
        (tf.constant(shorter[valid], tf.int32), tf.constant(longer[valid], tf.int32)),
        min_size=crop,
        max_size=crop,
    ).numpy()
    out_shorter = np.full(shorter.shape, -1, np.int16)
    out_longer = np.full(shorter.shape, -1, np.int16)
    out_shorter[valid], out_longer[valid] = new[0], new[1]
    # Spot checks: one size at a time (scalar tensors) and the transposed image agree.
    rng = np.random.default_rng(crop)
    rows, cols = rng.integers(0, len(LONGER), 200), rng.integers(0, MAX_SHORTER, 200)
    for row, col in zip(rows, cols, strict=True):
        if not valid[row, col]:
            continue
        h, w = (tf.constant(int(v[row, col]), tf.int32) for v in (shorter, longer))
        one = preprocess_utils.resize_to_range_helper((h, w), crop, crop).numpy().tolist()
        swapped = preprocess_utils.resize_to_range_helper((w, h), crop, crop).numpy().tolist()
        assert one == [out_shorter[row, col], out_longer[row, col]], (row, col, one)
        assert swapped == one[::-1], (row, col, one, swapped)
    return out_shorter, out_longer


def random_scales() -> np.ndarray:
    tf.random.set_seed(0)
    draws = {float(preprocess_utils.get_random_scale(*SCALE_RANGE)) for _ in range(SCALE_DRAWS)}
    return np.array(sorted(draws), np.float32)


def scaled_heights(scales: np.ndarray) -> np.ndarray:
    """[H, 11] heights after deeplab2's random scaling (on H x 2 images: only the size matters)."""
    table = np.zeros((len(SCALED_HEIGHTS), len(scales)), np.int32)
    for i, height in enumerate(SCALED_HEIGHTS):
        image = tf.zeros([int(height), 2, 1], tf.float32)
        for j, scale in enumerate(scales):
            scaled, _ = preprocess_utils.randomly_scale_image_and_label(
                image, None, tf.constant(scale, tf.float32)
            )
            table[i, j] = int(scaled.shape[0])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .npz to write")
    args = parser.parse_args()
    shorter, longer = zip(*(resize_table(crop) for crop in CROPS), strict=True)
    scales = random_scales()
    assert len(scales) == 11, scales
    np.savez_compressed(
        args.out,
        crops=np.array(CROPS, np.int32),
        longer=LONGER.astype(np.int32),
        resized_shorter=np.stack(shorter),
        resized_longer=np.stack(longer),
        scales=scales,
        scaled=scaled_heights(scales),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
