"""Run deeplab2's Hungarian matching and MaX-DeepLab loss on given inputs (matcher parity tests).

Runs INSIDE the deeplab2 reference environment (scripts/deeplab2_env.sh), never in the project's
venv: it imports TensorFlow and deeplab2, and nothing of maxdeeplab.

    source $DEEPLAB2_ENV/activate.sh
    python scripts/deeplab2_matching.py hungarian IN.npz OUT.npz
    python scripts/deeplab2_matching.py loss IN.npz OUT.npz

- `hungarian`: IN holds arrays `weights_<name>` (B x S x S float32 costs); OUT gets, for each,
  `permutation_<name>` (B x S x S bool) from `model/loss/matchers_ops.py` `hungarian_matching`.
- `loss`: IN holds a ground truth (`semantic`, `thing_ids`, `thing_classes`, `pixel_weights`, as
  `deeplab2_reference.ground_truth` builds them) and stride-4 predictions (NHWC, deeplab2's keys);
  OUT gets deeplab2's `DeepLabFamilyLoss` terms (`loss_<name>`, MaX-DeepLab-S COCO options) and,
  recorded from inside the loss, the costs it matched (`matched_weights`, B x rows x slots) and the
  matching it got (`matched_permutation`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from deeplab2 import common, config_pb2  # noqa: E402
from deeplab2.model import deeplab  # noqa: E402
from deeplab2.model.loss import matchers_ops, max_deeplab_loss  # noqa: E402
from google.protobuf import text_format  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deeplab2_reference import CONFIGS, losses  # noqa: E402

PREDICTION_KEYS = (
    common.PRED_TRANSFORMER_CLASS_LOGITS_KEY,
    common.PRED_PIXEL_SPACE_MASK_LOGITS_KEY,
    common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE_KEY,
    common.PRED_SEMANTIC_LOGITS_KEY,
)
GROUND_TRUTH_KEYS = ("semantic", "thing_ids", "thing_classes", "pixel_weights")


def run_hungarian(inputs: np.lib.npyio.NpzFile) -> dict[str, np.ndarray]:
    solve = tf.function(matchers_ops.hungarian_matching)  # as in training: graph mode
    outputs = {}
    for key in inputs.files:
        if key.startswith("weights_"):
            permutation = solve(tf.constant(inputs[key], tf.float32))
            outputs[key.replace("weights_", "permutation_", 1)] = permutation.numpy()
    return outputs


def run_loss(inputs: np.lib.npyio.NpzFile) -> dict[str, np.ndarray]:
    """deeplab2's losses, recording what its `nonsquare_hungarian_matching` saw and returned."""
    root = Path(deeplab.__file__).resolve().parents[1]
    config = text_format.Parse(
        (root / CONFIGS["max_deeplab_s"]).read_text(), config_pb2.ExperimentOptions()
    )
    recorded: dict[str, np.ndarray] = {}
    solve = max_deeplab_loss.nonsquare_hungarian_matching

    def recording(weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        square, nonsquare = solve(weights)
        recorded["matched_weights"] = weights.numpy()
        recorded["matched_permutation"] = nonsquare.numpy()
        return square, nonsquare

    max_deeplab_loss.nonsquare_hungarian_matching = recording
    predictions = {key: tf.constant(inputs[key], tf.float32) for key in PREDICTION_KEYS}
    ground_truth = {key: inputs[key] for key in GROUND_TRUTH_KEYS}
    values = losses(None, config, predictions, ground_truth)
    return {**values, **recorded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("hungarian", "loss"))
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    args = parser.parse_args()
    inputs = np.load(args.inputs)
    outputs = run_hungarian(inputs) if args.mode == "hungarian" else run_loss(inputs)
    np.savez(args.outputs, **outputs)


if __name__ == "__main__":
    main()
