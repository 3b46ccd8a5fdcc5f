"""Time deeplab2's own MaX-DeepLab training step (the other half of `maxdeeplab bench deeplab2`
and of `maxdeeplab bench memory --against deeplab2`).

Runs INSIDE the deeplab2 reference environment (scripts/deeplab2_env.sh). It uses deeplab2's
`trainer.Trainer` unmodified - forward in training mode, DeepLabFamilyLoss, backward, its two Adam
optimizers (backbone at 0.1x), all under orbit's tf.function loop - and only replaces the dataset
(files of COCO) by one seeded synthetic batch repeated, so no data is needed.

    python scripts/deeplab2_train_step.py [--variant max_deeplab_s] [--crop 641] [--batch 1] \
        [--steps 3] [--threads 2]

Prints one JSON line: {"train_step_s": median seconds per step, "first_step_s": trace + 1 step}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from deeplab2 import common  # noqa: E402
from deeplab2.data import dataset  # noqa: E402
from deeplab2.model.loss import loss_builder  # noqa: E402
from deeplab2.trainer import runner_utils  # noqa: E402
from deeplab2.trainer import trainer as trainer_lib  # noqa: E402
from deeplab2_reference import CONFIGS, build, ground_truth  # noqa: E402


def synthetic_batch(crop: int, batch: int, seed: int) -> dict[str, np.ndarray]:
    """deeplab2's training inputs: an image and the MaX-DeepLab ground truth, batch-tiled."""
    rng = np.random.default_rng(seed)
    gt = ground_truth(crop, seed)
    tile = lambda a: np.repeat(a, batch, axis=0)  # noqa: E731
    return {
        common.IMAGE: rng.uniform(0.0, 255.0, (batch, crop, crop, 3)).astype(np.float32),
        common.GT_SEMANTIC_KEY: tile(gt["semantic"]),
        common.SEMANTIC_LOSS_WEIGHT_KEY: tile(gt["pixel_weights"]),
        common.GT_THING_ID_MASK_KEY: tile(gt["thing_ids"]),
        common.GT_THING_ID_CLASS_KEY: tile(gt["thing_classes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="max_deeplab_s", choices=sorted(CONFIGS))
    parser.add_argument("--crop", type=int, default=641)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    model, config = build(args.variant, args.crop)
    info = dataset.MAP_NAME_TO_DATASET_INFO["coco_panoptic"]
    loss = loss_builder.DeepLabFamilyLoss(
        config.trainer_options.loss_options,
        config.model_options,
        num_classes=info.num_classes,
        ignore_label=info.ignore_label,
        ignore_depth=None,
        thing_class_ids=info.class_has_instances_list,
    )
    batch = synthetic_batch(args.crop, args.batch, args.seed)
    # The one substitution: the trainer's dataset is our synthetic batch, repeated.
    runner_utils.create_dataset = lambda *a, **k: tf.data.Dataset.from_tensors(batch).repeat()
    trainer = trainer_lib.Trainer(config, model, loss, tf.Variable(0, dtype=tf.int64))
    start = time.perf_counter()
    trainer.train(tf.constant(1, dtype=tf.int32))
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train(tf.constant(1, dtype=tf.int32))
        times.append(time.perf_counter() - start)
    print(json.dumps({"train_step_s": statistics.median(times), "first_step_s": first}))


if __name__ == "__main__":
    main()
