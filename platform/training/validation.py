"""Evaluation during training: panoptic inference on the val split, PQ all-reduced across workers.

Each worker evaluates its shard of the val set (`ShardSampler`: no padding duplicates),
post-processes with deeplab2's pixelwise rule (`models.postprocess`), maps contiguous ids back to
dataset category ids, and accumulates two PQs: the official one (panopticapi semantics) and
deeplab2's pipeline PQ (crowd of any class counted as void, docs/deeplab2.md#pipeline-pq). The
per-category sums are all-reduced, so every rank ends with the PQ of the whole val set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from maxdeeplab.models.postprocess import batch_panoptic_inference
from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig
from maxdeeplab.platform.data.coco import DatasetInfo
from maxdeeplab.platform.eval.accumulator import PQAccumulator
from maxdeeplab.platform.eval.pq import PQResult
from maxdeeplab.platform.visualize import panoptic_figure


@dataclass
class EvalResult:
    """PQ with panopticapi semantics, the pipeline PQ (crowd as void), and sample predictions."""

    official: PQResult
    pipeline: PQResult
    visualizations: list[np.ndarray] = field(default_factory=list)

    def metrics(self, info: DatasetInfo) -> dict[str, float]:
        """`val/*` metric values (fractions), including `val/pq_class/<name>`."""
        out = {
            tracking.VAL_PQ: self.official.pq,
            tracking.VAL_PQ_THING: self.official.pq_thing,
            tracking.VAL_PQ_STUFF: self.official.pq_stuff,
            tracking.VAL_SQ: self.official.groups["All"]["sq"],
            tracking.VAL_RQ: self.official.groups["All"]["rq"],
            tracking.VAL_PQ_PIPELINE: self.pipeline.pq,
        }
        for category in info.categories:
            if category.id in self.official.per_class:
                out[tracking.class_metric(category.name)] = self.official.per_class[category.id][
                    "pq"
                ]
        return out


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast as `train.amp` says (`config.AMP_MODES`): 'auto' on CUDA only, 'bf16' on any
    device (CPU autocast included), 'fp32' never. The criterion turns it off for the loss maths."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pq_categories(info: DatasetInfo) -> list[dict[str, Any]]:
    """The dataset's categories as the PQ accumulator takes them."""
    return [{"id": c.id, "isthing": int(c.isthing), "name": c.name} for c in info.categories]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    cfg: ExperimentConfig,
    info: DatasetInfo,
    device: torch.device,
    num_visualizations: int = 0,
) -> EvalResult:
    """Panoptic inference on this rank's shard of the val set; PQ sums all-reduced over ranks.

    Args:
        model: the model (unwrapped: a DDP forward would expect every rank to run as many
            batches, which an uneven shard breaks).
        loader: a `build_loader(eval_dataset, train=False)` loader (`collate_eval` batches).
        cfg: the experiment (postprocess settings, train.amp).
        info: the categories, to map contiguous ids back to dataset ids.
        device: where the model lives.
        num_visualizations: colourised predictions to return (from this rank's first images).

    Returns:
        Official PQ (panopticapi semantics), pipeline PQ (crowd as void), and images.
    """
    was_training = model.training
    model.eval()
    categories = pq_categories(info)
    official = PQAccumulator(categories)
    pipeline = PQAccumulator(categories, crowd_as_void=True)
    to_dataset = info.contiguous_to_dataset
    crop = cfg.data.crop_size
    images_out: list[np.ndarray] = []
    for batch in loader:
        items = batch["items"]
        if not items:
            continue
        with autocast(device, cfg.train.amp):
            output = model(batch["image"].to(device))
        predictions = batch_panoptic_inference(
            output,
            cfg=cfg.postprocess,
            num_thing_classes=info.num_thing_classes,
            crop_size=(crop, crop),
            resized_sizes=[item.resized_size for item in items],
            raw_sizes=[item.raw_size for item in items],
        )
        for item, prediction in zip(items, predictions, strict=True):
            segments = {s["id"]: to_dataset[s["category_id"]] for s in prediction.segments_info}
            pred_map = prediction.panoptic.cpu().numpy()
            for accumulator in (official, pipeline):
                accumulator.update(
                    pred_map, segments, item.gt_ids, item.segments, image_id=item.image_id
                )
            if len(images_out) < num_visualizations:
                images_out.append(_visualization(item, pred_map, cfg, info))
    for accumulator in (official, pipeline):
        if dist.is_available() and dist.is_initialized():
            sums = accumulator.stat.to_tensor()
            if dist.get_backend() == "nccl":
                sums = sums.to(device)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            accumulator.stat = accumulator.stat.from_tensor(sums)
    model.train(was_training)
    return EvalResult(official.compute(), pipeline.compute(), images_out)


def _visualization(
    item: Any, pred_map: np.ndarray, cfg: ExperimentConfig, info: DatasetInfo
) -> np.ndarray:
    """The resized input image, its prediction over it and a legend (`visualize.panoptic_figure`).

    The dataset yields images in [0, 255] (the model normalises them itself), so the input panel
    is the item's image as it is, cut to the resized size.
    """
    h, w = item.resized_size
    image = item.image[:, :h, :w].permute(1, 2, 0).numpy().round().clip(0, 255).astype(np.uint8)
    # The prediction is at the raw size; sample it at the resized grid (nearest).
    rows = np.linspace(0, pred_map.shape[0] - 1, h).round().astype(int)
    cols = np.linspace(0, pred_map.shape[1] - 1, w).round().astype(int)
    return panoptic_figure(
        image,
        pred_map[rows[:, None], cols[None, :]],
        label_divisor=cfg.postprocess.label_divisor,
        class_names=[c.name for c in info.categories],
    )
