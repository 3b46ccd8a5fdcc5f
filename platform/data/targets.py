"""Training targets of an augmented COCO panoptic crop (deeplab2 sample_generator.py).

Described in docs/deeplab2.md#ground-truth-at-stride-4.

For one S x S crop of compact segment labels (`coco.segment_index_map`: k + 1 for a pixel of
segment k, 0 for void, crowd already void) this builds what `PanopticTargets` holds per image:
- semantic: contiguous class ids (things first), 0 for void, padding, unknown ids and crowd
  (deeplab2 builds COCO with `treat_crowd_as_ignore=True`);
- thing ids: the non-crowd thing instances visible in the crop, numbered 0, 1, ... in order of
  first occurrence in the flattened (row-major) crop, -1 elsewhere; a segment that vanished in the
  crop simply gets no id;
- thing classes: the semantic class of each id, padded with -1 to `max_thing_id` (128);
- pixel weights: 1.0, or `small_instance_weight` on instances smaller than `small_instance_area`
  pixels in the crop (MaX-DeepLab-L).

More than `max_thing_id` instances in one crop: deeplab2 asserts. Here the instances beyond the
first `max_thing_id` (by first occurrence) become void, semantic 0 included, so no loss term sees a
thing pixel without a mask slot; the event is logged with the image id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from maxdeeplab.platform.data.coco import DatasetInfo, Segment

logger = logging.getLogger(__name__)


@dataclass
class CropTargets:
    """Targets of one crop, numpy (the collate function stacks them into `PanopticTargets`).

    Attributes:
        semantic: S x S int64, 0 = void.
        thing_ids: S x S int64, -1 = none.
        thing_classes: T int64 (T = max_thing_id), -1 padding.
        pixel_weights: S x S float32.
        num_dropped_instances: instances beyond max_thing_id made void.
    """

    semantic: np.ndarray
    thing_ids: np.ndarray
    thing_classes: np.ndarray
    pixel_weights: np.ndarray
    num_dropped_instances: int = 0


def build_crop_targets(
    labels: np.ndarray,
    segments: tuple[Segment, ...] | list[Segment],
    info: DatasetInfo,
    *,
    max_thing_id: int = 128,
    small_instance_weight: float = 1.0,
    small_instance_area: int = 4096,
    image_id: object = None,
) -> CropTargets:
    """Build the training targets of one augmented crop.

    Args:
        labels: S x S compact segment labels after augmentation (0 = void, crowd or padding;
            k + 1 = `segments[k]`).
        segments: the image's `segments_info`.
        info: the dataset's categories (contiguous remap).
        max_thing_id: thing-id slots (LossConfig.max_thing_id).
        small_instance_weight: pixel weight of small instances (1.0 disables it).
        small_instance_area: instances with fewer crop pixels than this are small.
        image_id: named in the log message when instances are dropped.

    Returns:
        CropTargets.
    """
    contiguous = [info.to_contiguous(s.category_id) for s in segments]
    semantic_lut = np.array([0] + contiguous, dtype=np.int64)
    thing_lut = np.array([False] + [info.isthing(c) for c in contiguous], dtype=bool)
    labels = labels.astype(np.int64, copy=False)
    semantic = semantic_lut[labels]
    thing_pixel = thing_lut[labels]

    # Instances in order of first occurrence in the flattened crop (deeplab2's numbering).
    flat = labels.ravel()
    thing_positions = np.flatnonzero(thing_pixel.ravel())
    present, first, counts = np.unique(flat[thing_positions], return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    present, counts = present[order], counts[order]

    dropped = max(len(present) - max_thing_id, 0)
    if dropped:
        logger.warning(
            "image %s: %d thing instances in the crop exceed max_thing_id=%d; "
            "the last %d (by first occurrence) are treated as void",
            image_id,
            len(present),
            max_thing_id,
            dropped,
        )
        extra = np.isin(labels, present[max_thing_id:])
        semantic[extra] = 0
        thing_pixel &= ~extra
        present, counts = present[:max_thing_id], counts[:max_thing_id]

    id_lut = np.full(len(segments) + 1, -1, dtype=np.int64)
    id_lut[present] = np.arange(len(present))
    thing_ids = np.where(thing_pixel, id_lut[labels], -1)

    thing_classes = np.full(max_thing_id, -1, dtype=np.int64)
    thing_classes[: len(present)] = semantic_lut[present]

    pixel_weights = np.ones(labels.shape, dtype=np.float32)
    if small_instance_weight != 1.0 and len(present):
        small = np.zeros(len(segments) + 1, dtype=bool)
        small[present[counts < small_instance_area]] = True
        pixel_weights[small[labels] & thing_pixel] = small_instance_weight
    return CropTargets(semantic, thing_ids, thing_classes, pixel_weights, dropped)
