"""Run google-research/deeplab2's MaX-DeepLab with seeded random weights and dump what it computes.

Runs INSIDE the deeplab2 reference environment (scripts/deeplab2_env.sh), never in the project's
venv: it imports TensorFlow and deeplab2, and nothing of maxdeeplab.

    source $DEEPLAB2_ENV/activate.sh
    python scripts/deeplab2_reference.py OUT_DIR [--variant max_deeplab_s] [--crop 641] [--seed 0]

OUT_DIR receives:
- `trainer/ckpt` (+ .index/.data-*): `tf.train.Checkpoint(**model.checkpoint_items)`, the layout of
  deeplab2's trainer (top-level keys encoder/, pixel_space_head/, ...);
- `model/ckpt`: a plain `tf.train.Checkpoint(model=model)`;
- `outputs.npz`: the input image (1 x S x S x 3, RGB in [0, 255]) and, in eval mode, the decoder's
  stride-4 outputs (class logits, mask logits, normalised pixel embeddings, semantic logits, all
  NHWC as deeplab2 returns them) and the post-processed panoptic map of the full model call.

Every variable gets a seeded random value (BN statistics included; deeplab2's zero-initialised
gammas would otherwise hide most of the network from the comparison).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from deeplab2 import common, config_pb2  # noqa: E402
from deeplab2.data import dataset  # noqa: E402
from deeplab2.model import deeplab  # noqa: E402

CONFIGS = {
    "max_deeplab_s": "configs/coco/max_deeplab/max_deeplab_s_os16_res641_400k.textproto",
    "max_deeplab_l": "configs/coco/max_deeplab/max_deeplab_l_os16_res1025_400k.textproto",
}
CLASS_BIAS_STD = 8.0


def build(variant: str, crop: int) -> tf.keras.Model:
    """deeplab2's DeepLab model for COCO panoptic with the model-zoo config of `variant`."""
    root = Path(deeplab.__file__).resolve().parents[1]
    config = text_format.Parse((root / CONFIGS[variant]).read_text(), config_pb2.ExperimentOptions())
    config.train_dataset_options.crop_size[:] = [crop, crop]
    config.eval_dataset_options.crop_size[:] = [crop, crop]
    model = deeplab.DeepLab(config, dataset.MAP_NAME_TO_DATASET_INFO["coco_panoptic"])
    model(tf.zeros([1, crop, crop, 3]), training=False)
    return model


def randomise(model: tf.keras.Model, seed: int) -> None:
    """Give every variable a seeded value of a scale that keeps activations finite."""
    rng = np.random.default_rng(seed)
    for variable in sorted(model.variables, key=lambda v: v.name):
        shape = variable.shape.as_list()
        name = variable.name
        if "moving_variance" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "transformer_class_head" in name and "bias" in name:
            # Wide class biases make some slots confident, so that post-processing keeps some
            # segments and the panoptic maps can be compared.
            value = rng.normal(0.0, CLASS_BIAS_STD, shape)
        elif "moving_mean" in name or "beta" in name or "bias" in name:
            value = rng.normal(0.0, 0.1, shape)
        elif "gamma" in name:
            value = rng.uniform(0.5, 1.5, shape)
        else:  # kernels, positional encodings, the memory
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        variable.assign(value.astype(variable.dtype.as_numpy_dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--variant", default="max_deeplab_s", choices=sorted(CONFIGS))
    parser.add_argument("--crop", type=int, default=641)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-outputs", action="store_true", help="only write the checkpoints")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tf.random.set_seed(args.seed)
    model = build(args.variant, args.crop)
    randomise(model, args.seed)
    tf.train.Checkpoint(**model.checkpoint_items).write(str(out / "trainer" / "ckpt"))
    tf.train.Checkpoint(model=model).write(str(out / "model" / "ckpt"))
    if args.no_outputs:
        return
    rng = np.random.default_rng(args.seed + 1)
    image = rng.uniform(0.0, 255.0, (1, args.crop, args.crop, 3)).astype(np.float32)
    x = tf.constant(image) / 127.5 - 1.0
    raw = model._decoder(model._encoder(x, training=False), training=False)
    full = model(tf.constant(image), training=False)
    np.savez(
        out / "outputs.npz",
        image=image,
        class_logits=raw[common.PRED_TRANSFORMER_CLASS_LOGITS_KEY].numpy(),
        mask_logits=raw[common.PRED_PIXEL_SPACE_MASK_LOGITS_KEY].numpy(),
        pixel_embed=raw[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE_KEY].numpy(),
        semantic_logits=raw[common.PRED_SEMANTIC_LOGITS_KEY].numpy(),
        panoptic=full[common.PRED_PANOPTIC_KEY].numpy(),
    )


if __name__ == "__main__":
    main()
