"""Decode image files with deeplab2's own decoder (image decoding parity test).

Runs INSIDE the deeplab2 reference environment (scripts/deeplab2_env.sh), never in the project's
venv: it imports TensorFlow and deeplab2, and nothing of maxdeeplab.

    source $DEEPLAB2_ENV/activate.sh
    python scripts/deeplab2_decode.py OUT.npz FILE...

Each file goes through `SegmentationDecoder._decode_image` (`data/data_utils.py`), i.e.
`tf.io.decode_image(channels=3, dtype=uint8, expand_animations=False)`. OUT gets `image_<i>`
(H x W x 3 uint8) for the i-th file that decodes and `failed` (one bool per file).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from deeplab2 import common  # noqa: E402
from deeplab2.data.data_utils import SegmentationDecoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    decoder, key = SegmentationDecoder(), common.KEY_ENCODED_IMAGE
    arrays: dict[str, np.ndarray] = {}
    failed = []
    for i, path in enumerate(args.files):
        with open(path, "rb") as f:
            encoded = tf.constant(f.read())
        try:
            arrays[f"image_{i}"] = decoder._decode_image({key: encoded}, key).numpy()
        except tf.errors.InvalidArgumentError:
            failed.append(True)
        else:
            failed.append(False)
    np.savez(args.out, failed=np.array(failed), **arrays)


if __name__ == "__main__":
    main()
