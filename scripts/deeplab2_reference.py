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
  NHWC as deeplab2 returns them) and the panoptic map of deeplab2's post-processor on the logits
  sharpened by CLASS_SHARPEN and MASK_SHARPEN;
- with `--raw-size H W`, `raw.npz`: an H x W raw image and panoptic label (`semantic x 256 +
  instance`) through deeplab2's evaluation sample generator (resize, pad, targets), the model, the
  post-processor and `undo_preprocessing` back to H x W, as `trainer/evaluator.py` runs them.

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
from deeplab2 import common, config_pb2  # noqa: E402
from deeplab2.data import dataset, sample_generator  # noqa: E402
from deeplab2.model import deeplab  # noqa: E402
from deeplab2.model import utils as model_utils  # noqa: E402
from deeplab2.model.loss import loss_builder  # noqa: E402
from google.protobuf import text_format  # noqa: E402

CONFIGS = {
    "max_deeplab_s": "configs/coco/max_deeplab/max_deeplab_s_os16_res641_400k.textproto",
    "max_deeplab_l": "configs/coco/max_deeplab/max_deeplab_l_os16_res1025_400k.textproto",
}
# Post-processing is compared on sharpened logits (class x 3, mask x 20): plain random heads leave
# every slot unconfident and the whole image void, which would compare nothing.
CLASS_SHARPEN = 3.0
# Encoder outputs saved beside the heads' (to localise a difference).
ENCODER_ENDPOINTS = (
    "res2",
    "res3",
    "feature_semantic",
    "feature_panoptic",
    "transformer_class_feature",
    "transformer_mask_feature",
)
MAX_THING_ID = 128  # deeplab2's padded number of thing masks
MASK_SHARPEN = 20.0
IMAGE_GRID = 6  # the test image: a smooth random RGB field (bilinear from a 6 x 6 grid) + noise


def build(variant: str, crop: int) -> tuple[tf.keras.Model, config_pb2.ExperimentOptions]:
    """deeplab2's DeepLab model for COCO panoptic with the model-zoo config of `variant`."""
    root = Path(deeplab.__file__).resolve().parents[1]
    config = text_format.Parse(
        (root / CONFIGS[variant]).read_text(), config_pb2.ExperimentOptions()
    )
    config.train_dataset_options.crop_size[:] = [crop, crop]
    config.eval_dataset_options.crop_size[:] = [crop, crop]
    model = deeplab.DeepLab(config, dataset.MAP_NAME_TO_DATASET_INFO["coco_panoptic"])
    model(tf.zeros([1, crop, crop, 3]), training=False)
    return model, config


def randomise(model: tf.keras.Model, seed: int, gamma_scale: float = 1.0) -> None:
    """Give every variable a seeded value of a scale that keeps activations finite.

    `gamma_scale` multiplies the BN gammas: deep random networks (MaX-DeepLab-L) are chaotic at
    1.0 (a 1e-6 change of the input moves stage-5 features by ~10%), which would make any
    float32 comparison meaningless; smaller gammas keep them well-conditioned.
    """
    rng = np.random.default_rng(seed)
    for variable in sorted(model.variables, key=lambda v: v.name):
        shape = variable.shape.as_list()
        name = variable.name
        if "moving_variance" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "moving_mean" in name or "beta" in name or "bias" in name:
            value = rng.normal(0.0, 0.1, shape)
        elif "gamma" in name:
            value = gamma_scale * rng.uniform(0.5, 1.5, shape)
        else:  # kernels, positional encodings, the memory
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        variable.assign(value.astype(variable.dtype.as_numpy_dtype))


def ground_truth(crop: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded ground truth with things, stuff and void (crowd is void at the loss, as deeplab2's
    COCO pipeline builds it with treat_crowd_as_ignore): our PanopticTargets arrays, batch 1.

    Thing instances are non-overlapping boxes laid out row-major, so numbering them in the order
    of their boxes is numbering by first occurrence (our convention).
    """
    rng = np.random.default_rng(seed + 2)
    semantic = np.full((crop, crop), 81 + 20, np.int32)  # stuff everywhere...
    semantic[crop // 2 :] = 81 + 40  # ...of two classes
    thing_ids = np.full((crop, crop), -1, np.int32)
    thing_classes = np.full(MAX_THING_ID, -1, np.int32)
    cell = crop // 4
    instance = 0
    for row in range(3):
        for col in range(4):
            if (row, col) == (1, 1):  # a void box (e.g. a crowd region)
                semantic[row * cell + 10 : row * cell + cell - 10, col * cell + 10 :][
                    :, : cell - 20
                ] = 0
                continue
            if rng.uniform() < 0.25:
                continue
            height, width = rng.integers(12, cell - 12, size=2)
            top, left = row * cell + 6, col * cell + 6
            klass = int(rng.integers(1, 81))
            semantic[top : top + height, left : left + width] = klass
            thing_ids[top : top + height, left : left + width] = instance
            thing_classes[instance] = klass
            instance += 1
    return {
        "semantic": semantic[None],
        "thing_ids": thing_ids[None],
        "thing_classes": thing_classes[None],
        "pixel_weights": np.ones((1, crop, crop), np.float32),
    }


def designed_predictions(gt: dict[str, np.ndarray], num_slots: int, seed: int) -> dict:
    """Stride-4 predictions (NHWC, deeplab2's keys) whose Hungarian matching is unambiguous.

    Random-weight networks give near-uniform masks, and a matching full of near-ties says little
    about the loss; here each ground-truth mask (thing instance or stuff class) gets its own slot,
    whose mask logit is raised on the mask and whose class logit is raised on the true class.
    """
    rng = np.random.default_rng(seed + 3)
    semantic = gt["semantic"][0, ::4, ::4]
    thing_ids = gt["thing_ids"][0, ::4, ::4]
    height, width = semantic.shape
    num_logits = 134  # COCO: 133 classes + void
    masks = [(thing_ids == i, int(c)) for i, c in enumerate(gt["thing_classes"][0]) if c >= 0]
    masks += [((semantic == c) & (thing_ids < 0), int(c)) for c in np.unique(semantic) if c > 80]
    slots = rng.permutation(num_slots)[: len(masks)]
    mask_logits = rng.normal(0.0, 1.0, (1, height, width, num_slots))
    class_logits = rng.normal(0.0, 1.0, (1, num_slots, num_logits))
    for (mask, klass), slot in zip(masks, slots, strict=True):
        mask_logits[0, mask, slot] += 6.0
        class_logits[0, slot, klass - 1] += 4.0
    embed = rng.normal(0.0, 1.0, (1, height, width, 128))
    embed /= np.linalg.norm(embed, axis=-1, keepdims=True)
    f32 = lambda a: tf.constant(a, tf.float32)  # noqa: E731
    return {
        common.PRED_TRANSFORMER_CLASS_LOGITS_KEY: f32(class_logits),
        common.PRED_PIXEL_SPACE_MASK_LOGITS_KEY: f32(mask_logits),
        common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE_KEY: f32(embed),
        common.PRED_SEMANTIC_LOGITS_KEY: f32(rng.normal(0.0, 1.0, (1, height, width, num_logits))),
    }


def losses(model: tf.keras.Model, config_losses, raw: dict, gt: dict) -> dict[str, float]:
    """deeplab2's DeepLabFamilyLoss on the eval-mode outputs (per-term, batch 1)."""
    info = dataset.MAP_NAME_TO_DATASET_INFO["coco_panoptic"]
    loss = loss_builder.DeepLabFamilyLoss(
        config_losses.trainer_options.loss_options,
        config_losses.model_options,
        num_classes=info.num_classes,
        ignore_label=info.ignore_label,
        ignore_depth=None,
        thing_class_ids=info.class_has_instances_list,
    )
    y_true = {
        common.GT_SEMANTIC_KEY: tf.constant(gt["semantic"]),
        common.SEMANTIC_LOSS_WEIGHT_KEY: tf.constant(gt["pixel_weights"]),
        common.GT_THING_ID_MASK_KEY: tf.constant(gt["thing_ids"]),
        common.GT_THING_ID_CLASS_KEY: tf.constant(gt["thing_classes"]),
    }
    values = loss(y_true, dict(raw))
    return {f"loss_{k}": np.asarray(v.numpy(), np.float64) for k, v in values.items()}


def raw_label(height: int, width: int, seed: int) -> np.ndarray:
    """H x W panoptic label `semantic x 256 + instance`: two stuff classes, thing boxes of
    different sizes (instances 1, 2, ...) and a void box."""
    rng = np.random.default_rng(seed + 4)
    semantic = np.full((height, width), 81 + 20, np.int32)
    semantic[height // 2 :] = 81 + 40
    instance = np.zeros((height, width), np.int32)
    semantic[height // 3 : height // 3 + 40, width // 2 : width // 2 + 90] = 0  # void
    for k in range(1, 9):
        box_h, box_w = rng.integers(10, height // 3, size=2)
        top, left = rng.integers(0, height - box_h), rng.integers(0, width - box_w)
        semantic[top : top + box_h, left : left + box_w] = int(rng.integers(1, 81))
        instance[top : top + box_h, left : left + box_w] = k
    return semantic * dataset.COCO_PANOPTIC_INFORMATION.panoptic_label_divisor + instance


def raw_case(model: tf.keras.Model, config, size: tuple[int, int], seed: int) -> dict:
    """deeplab2's evaluation of one raw image, stage by stage (`trainer/evaluator.py`)."""
    options = config.eval_dataset_options
    generator = sample_generator.PanopticSampleGenerator(
        dataset_info=dataset.COCO_PANOPTIC_INFORMATION._asdict(),
        is_training=False,
        crop_size=options.crop_size,
        min_resize_value=options.min_resize_value,
        max_resize_value=options.max_resize_value,
        thing_id_mask_annotations=options.thing_id_mask_annotations,
        max_thing_id=options.max_thing_id,
    )
    rng = np.random.default_rng(seed + 5)
    height, width = size
    grid = tf.constant(rng.uniform(0.0, 255.0, (1, IMAGE_GRID, IMAGE_GRID, 3)), tf.float32)
    smooth = tf.compat.v1.image.resize_bilinear(grid, [height, width], align_corners=True)
    noisy = smooth.numpy()[0] + rng.normal(0.0, 8.0, (height, width, 3))
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    label = raw_label(height, width, seed)
    sample = generator(
        {
            "image": tf.constant(image),
            "image_name": "raw",
            "label": tf.constant(label[..., None]),
            "height": height,
            "width": width,
        }
    )
    x = sample[common.IMAGE][None] / 127.5 - 1.0
    raw = model._decoder(model._encoder(x, training=False), training=False)
    sharp = dict(raw)
    sharp[common.PRED_TRANSFORMER_CLASS_LOGITS_KEY] *= CLASS_SHARPEN
    sharp[common.PRED_PIXEL_SPACE_MASK_LOGITS_KEY] *= MASK_SHARPEN
    panoptic = model._post_processor(sharp)[common.PRED_PANOPTIC_KEY]
    resized = sample[common.RESIZED_IMAGE].shape[:2]
    undone = model_utils.undo_preprocessing(
        {common.PRED_PANOPTIC_KEY: panoptic}, list(resized), [height, width]
    )
    return {
        "raw_image": image,
        "raw_label": label,
        "image": sample[common.IMAGE].numpy()[None],
        "resized_size": np.array(resized, np.int32),
        "semantic": sample[common.GT_SEMANTIC_KEY].numpy()[None],
        "thing_ids": sample[common.GT_THING_ID_MASK_KEY].numpy()[None],
        "thing_classes": sample[common.GT_THING_ID_CLASS_KEY].numpy()[None],
        "class_logits": raw[common.PRED_TRANSFORMER_CLASS_LOGITS_KEY].numpy(),
        "mask_logits": raw[common.PRED_PIXEL_SPACE_MASK_LOGITS_KEY].numpy(),
        "pixel_embed": raw[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE_KEY].numpy(),
        "semantic_logits": raw[common.PRED_SEMANTIC_LOGITS_KEY].numpy(),
        "panoptic": panoptic.numpy(),
        "panoptic_raw": undone[common.PRED_PANOPTIC_KEY].numpy(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--variant", default="max_deeplab_s", choices=sorted(CONFIGS))
    parser.add_argument("--crop", type=int, default=641)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gamma-scale", type=float, default=1.0, help="BN gamma multiplier")
    parser.add_argument("--no-outputs", action="store_true", help="only write the checkpoints")
    parser.add_argument(
        "--raw-size", type=int, nargs=2, metavar=("H", "W"), help="also write raw.npz"
    )
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tf.random.set_seed(args.seed)
    model, config = build(args.variant, args.crop)
    randomise(model, args.seed, args.gamma_scale)
    tf.train.Checkpoint(**model.checkpoint_items).write(str(out / "trainer" / "ckpt"))
    tf.train.Checkpoint(model=model).write(str(out / "model" / "ckpt"))
    if args.no_outputs:
        return
    rng = np.random.default_rng(args.seed + 1)
    grid = tf.constant(rng.uniform(0.0, 255.0, (1, IMAGE_GRID, IMAGE_GRID, 3)), tf.float32)
    smooth = tf.compat.v1.image.resize_bilinear(grid, [args.crop, args.crop], align_corners=True)
    noise = rng.normal(0.0, 8.0, (1, args.crop, args.crop, 3))
    image = np.clip(smooth.numpy() + noise, 0.0, 255.0).astype(np.float32)
    x = tf.constant(image) / 127.5 - 1.0
    features = model._encoder(x, training=False)
    raw = model._decoder(features, training=False)
    endpoints = {
        f"encoder_{key}": value.numpy()
        for key, value in features.items()
        if isinstance(value, tf.Tensor)
    }
    sharp = dict(raw)
    sharp[common.PRED_TRANSFORMER_CLASS_LOGITS_KEY] *= CLASS_SHARPEN
    sharp[common.PRED_PIXEL_SPACE_MASK_LOGITS_KEY] *= MASK_SHARPEN
    panoptic = model._post_processor(sharp)[common.PRED_PANOPTIC_KEY]
    gt = ground_truth(args.crop, args.seed)
    np.savez(out / "targets.npz", **gt, **losses(model, config, raw, gt))
    designed = designed_predictions(
        gt, raw[common.PRED_TRANSFORMER_CLASS_LOGITS_KEY].shape[1], args.seed
    )
    np.savez(
        out / "designed.npz",
        **{key: value.numpy() for key, value in designed.items()},
        **losses(model, config, designed, gt),
    )
    np.savez(
        out / "outputs.npz",
        image=image,
        class_logits=raw[common.PRED_TRANSFORMER_CLASS_LOGITS_KEY].numpy(),
        mask_logits=raw[common.PRED_PIXEL_SPACE_MASK_LOGITS_KEY].numpy(),
        pixel_embed=raw[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE_KEY].numpy(),
        semantic_logits=raw[common.PRED_SEMANTIC_LOGITS_KEY].numpy(),
        panoptic=panoptic.numpy(),
        class_sharpen=CLASS_SHARPEN,
        mask_sharpen=MASK_SHARPEN,
        **endpoints,
    )
    if args.raw_size:
        np.savez(out / "raw.npz", **raw_case(model, config, tuple(args.raw_size), args.seed))


if __name__ == "__main__":
    main()
