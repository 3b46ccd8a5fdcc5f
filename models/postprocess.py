"""MaX-DeepLab panoptic inference: slot logits -> panoptic id map + COCO `segments_info`.

Described in docs/deeplab2.md#post-processing.

Faithful to deeplab2 `model/post_processor/max_deeplab.py` and the eval-time undo of the padding
(`trainer/evaluator.py`, `model/utils.py undo_preprocessing`).

**Pixelwise** (the default, used for every published number, docs/deeplab2.md#pixelwise):
1. class probabilities = softmax over K + 1; drop void; each slot's class is the argmax over the K
   real classes and its confidence the max; keep slots with confidence **>=** `class_threshold`
   (0.7; deeplab2 uses `greater_equal`). No kept slot: the whole image is void.
2. upsample the N stride-4 mask logits to the padded crop S x S (bilinear, align_corners=True).
3. each pixel goes to the argmax over the kept slots; its confidence is the max softmax over the
   kept slots; it is **confident** iff that confidence is **>** `pixel_threshold` (0.4) and the best
   slot over *all* slots is a kept one (deeplab2 compares the two max logits). Other pixels are
   void.
4. area limits at S x S: a stuff *class* region (all its pixels, merged across slots) with fewer
   than `stuff_area_limit` pixels, and a thing *slot* with fewer than `thing_area_limit`, become
   void.
5. panoptic id = semantic * label_divisor + (slot + 1 for things, 0 for stuff); void = 0.
6. undo the eval padding: crop the top-left `resized_size` region and resize to `raw_size` with
   nearest-neighbour, TF1 align_corners semantics (source index round(i (in - 1) / (out - 1))).

**Maskwise** (`PostprocessConfig.mode = 'maskwise'`, kMaX-era, docs/deeplab2.md#maskwise):
binarise each slot's softmax-over-slots probability at > `pixel_threshold`, rank slots by
conf^reorder_class_weight * mean_mask_prob^reorder_mask_weight, paste them in that order onto free
pixels, keeping a slot only if it is class-confident (>= `class_threshold` for things and stuff
alike) and more than `overlap_threshold` of its pixels are still free. The instance id is the
rank + 1, as in deeplab2. The same area limits and id encoding follow.

Semantic ids are the contiguous ones of the data (class index + 1, things first, 0 = void).
Everything runs on the device of the logits; only `segments_info` is built on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from maxdeeplab.models.config import POSTPROCESS_MODES, PostprocessConfig
from maxdeeplab.models.strides import HIGH_RESOLUTION_OUTPUT_STRIDE
from maxdeeplab.models.structures import MaXDeepLabOutput


@dataclass
class PanopticPrediction:
    """One image's panoptic prediction.

    Attributes:
        panoptic: H x W int64, semantic * label_divisor + instance (0 = void), at `raw_size`.
        segments_info: COCO-style, one dict per segment, sorted by id: `id` (the panoptic id,
        non-zero),
            `category_id` (contiguous semantic id), `isthing` (bool), `area` (pixels in `panoptic`).
    """

    panoptic: torch.Tensor
    segments_info: list[dict[str, Any]]


def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    cfg: PostprocessConfig,
    num_thing_classes: int,
    crop_size: tuple[int, int] | None = None,
    resized_size: tuple[int, int] | None = None,
    raw_size: tuple[int, int] | None = None,
) -> PanopticPrediction:
    """Panoptic prediction for one image.

    Args:
        class_logits: N x (K+1), void last.
        mask_logits: N x h x w at stride 4.
        cfg: thresholds, area limits, label divisor, mode.
        num_thing_classes: class indices below this (semantic ids up to it) are things.
        crop_size: the padded crop S x S the logits cover; default 4 (h - 1) + 1, 4 (w - 1) + 1.
        resized_size: the top-left region holding the resized image; default the whole crop.
        raw_size: the original image size to resize back to; default `resized_size`.

    Returns:
        The panoptic map at `raw_size` and its segments.

    Raises:
        ValueError: unknown mode, or N + 1 does not fit under the label divisor.
    """
    N, h, w = mask_logits.shape
    if cfg.mode not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess.mode must be one of {POSTPROCESS_MODES}, got {cfg.mode!r}")
    if cfg.label_divisor <= N:
        raise ValueError(f"{N} mask slots do not fit under label_divisor {cfg.label_divisor}")
    crop = crop_size or (
        HIGH_RESOLUTION_OUTPUT_STRIDE * (h - 1) + 1,
        HIGH_RESOLUTION_OUTPUT_STRIDE * (w - 1) + 1,
    )
    resized = resized_size or crop
    raw = raw_size or resized
    panoptic = panoptic_map_at_crop(
        class_logits, mask_logits, cfg=cfg, num_thing_classes=num_thing_classes, crop_size=crop
    )
    panoptic = resize_nearest_align_corners(panoptic[: resized[0], : resized[1]], raw)
    return PanopticPrediction(
        panoptic=panoptic,
        segments_info=segments_from_panoptic(
            panoptic, label_divisor=cfg.label_divisor, num_thing_classes=num_thing_classes
        ),
    )


def batch_panoptic_inference(
    output: MaXDeepLabOutput,
    *,
    cfg: PostprocessConfig,
    num_thing_classes: int,
    crop_size: tuple[int, int] | None = None,
    resized_sizes: list[tuple[int, int]] | None = None,
    raw_sizes: list[tuple[int, int]] | None = None,
) -> list[PanopticPrediction]:
    """`panoptic_inference` for every image of a batch (each may have its own raw size)."""
    B = output.class_logits.shape[0]
    return [
        panoptic_inference(
            output.class_logits[b],
            output.mask_logits[b],
            cfg=cfg,
            num_thing_classes=num_thing_classes,
            crop_size=crop_size,
            resized_size=resized_sizes[b] if resized_sizes else None,
            raw_size=raw_sizes[b] if raw_sizes else None,
        )
        for b in range(B)
    ]


@torch.no_grad()
def panoptic_map_at_crop(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    cfg: PostprocessConfig,
    num_thing_classes: int,
    crop_size: tuple[int, int],
) -> torch.Tensor:
    """Steps 1-5: the panoptic id map at the padded crop, S x S int64 (before the undo)."""
    probs = torch.softmax(class_logits.float(), dim=-1)[:, :-1]  # N x K
    confidence, class_pred = probs.max(dim=-1)
    logits = F.interpolate(
        mask_logits.float()[None], size=crop_size, mode="bilinear", align_corners=True
    )[0]  # N x S x S
    if cfg.mode == "pixelwise":
        slot_map, confident = _pixelwise_assignment(logits, confidence >= cfg.class_threshold, cfg)
        slot_class = class_pred
    else:
        order, slot_map, confident = _maskwise_assignment(logits, confidence, class_pred, cfg)
        slot_class = class_pred[order]
    return _merge(slot_map, slot_class[slot_map] + 1, confident, cfg, num_thing_classes)


def _pixelwise_assignment(
    logits: torch.Tensor, keep: torch.Tensor, cfg: PostprocessConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: N x S x S, keep: N bool -> slot map S x S int64, confident S x S bool."""
    if not bool(keep.any()):
        empty = torch.zeros(logits.shape[1:], dtype=torch.long, device=logits.device)
        return empty, torch.zeros_like(empty, dtype=torch.bool)
    # deeplab2 sets the logits of dropped slots to -99999 and takes softmax / argmax over all N;
    # exp(-99999 - best) is exactly 0 in float32, so working on the kept slots alone is the same
    # computation with a fraction of the memory (N x S x S at 641 is 210 MB per copy).
    kept_slots = keep.nonzero()[:, 0]
    kept_logits = logits[kept_slots]  # N_kept x S x S
    best, kept_index = kept_logits.max(dim=0)
    # Max softmax over the kept slots = 1 / sum_k exp(logit_k - best).
    pixel_confidence = torch.exp(kept_logits - best).sum(dim=0).reciprocal()
    agrees = logits.max(dim=0).values == best
    return kept_slots[kept_index], (pixel_confidence > cfg.pixel_threshold) & agrees


def _maskwise_assignment(
    logits: torch.Tensor, confidence: torch.Tensor, class_pred: torch.Tensor, cfg: PostprocessConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste binarised slot masks by rank. Returns (order N, slot map S x S by rank, confident)."""
    N = logits.shape[0]
    probs = torch.softmax(logits, dim=0)
    binary = probs > cfg.pixel_threshold  # N x S x S
    area = binary.sum(dim=(1, 2)).float()
    mean_prob = (probs * binary).sum(dim=(1, 2)) / area.clamp(min=1)
    mean_prob = torch.where(area > 0, mean_prob, 0.0)  # divide_no_nan
    score = confidence.pow(cfg.reorder_class_weight) * mean_prob.pow(cfg.reorder_mask_weight)
    order = torch.argsort(score, descending=True, stable=True)
    canvas = torch.zeros(logits.shape[1:], dtype=torch.long, device=logits.device)
    class_ok = confidence[order] >= cfg.class_threshold
    for rank in range(N):
        current = binary[order[rank]]
        free = current & (canvas == 0)
        paste = class_ok[rank] & (free.sum() > area[order[rank]] * cfg.overlap_threshold)
        canvas = torch.where(free & paste, rank + 1, canvas)
    return order, (canvas - 1).clamp(min=0), canvas > 0


def _merge(
    slot_map: torch.Tensor,
    semantic: torch.Tensor,
    confident: torch.Tensor,
    cfg: PostprocessConfig,
    num_thing_classes: int,
) -> torch.Tensor:
    """deeplab2 `_merge_mask_id_and_semantic_maps`: area limits and id encoding (S x S int64)."""
    is_thing = semantic <= num_thing_classes
    thing = confident & is_thing
    stuff = confident & ~is_thing
    if cfg.stuff_area_limit > 0:
        counts = torch.bincount(semantic[stuff], minlength=int(semantic.max()) + 1)
        stuff = stuff & (counts[semantic] >= cfg.stuff_area_limit)
    if cfg.thing_area_limit > 0:
        counts = torch.bincount(slot_map[thing], minlength=int(slot_map.max()) + 1)
        thing = thing & (counts[slot_map] >= cfg.thing_area_limit)
    panoptic = torch.where(thing, semantic * cfg.label_divisor + slot_map + 1, 0)
    return torch.where(stuff, semantic * cfg.label_divisor, panoptic)


def resize_nearest_align_corners(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize with TF1 `align_corners=True` semantics (docs/deeplab2.md#resizes).

    Output pixel i reads input round(i * (in - 1) / (out - 1)) (float32 arithmetic, halves away
    from zero, clamped), which PyTorch's `nearest` modes do not provide.

    Args:
        labels: H x W (any dtype).
        size: (out_h, out_w).
    """
    in_h, in_w = labels.shape
    if (in_h, in_w) == tuple(size):
        return labels
    rows = _align_corners_index(in_h, size[0], labels.device)
    cols = _align_corners_index(in_w, size[1], labels.device)
    return labels[rows[:, None], cols[None, :]]


def _align_corners_index(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    position = torch.arange(out_size, device=device, dtype=torch.float32) * torch.tensor(
        scale, dtype=torch.float32
    )
    return torch.floor(position + 0.5).long().clamp(max=in_size - 1)


def segments_from_panoptic(
    panoptic: torch.Tensor, *, label_divisor: int, num_thing_classes: int
) -> list[dict[str, Any]]:
    """COCO-style `segments_info` of a panoptic id map (void = 0 is not a segment)."""
    ids, areas = torch.unique(panoptic, return_counts=True)
    segments = []
    for segment_id, area in zip(ids.tolist(), areas.tolist(), strict=True):
        if segment_id == 0:
            continue
        category = segment_id // label_divisor
        segments.append(
            {
                "id": int(segment_id),
                "category_id": int(category),
                "isthing": bool(category <= num_thing_classes),
                "area": int(area),
            }
        )
    return segments
