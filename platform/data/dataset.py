"""PyTorch datasets over a COCO panoptic split: augmented training crops and evaluation items.

Every training sample is a pure function of (seed, epoch, index): its generator is seeded with
exactly that triple, so data order and augmentation do not depend on worker count or process, and
a resumed run sees the same samples. The epoch reaches the worker processes inside the sample key:
`EpochSampler` (loader.py) yields `epoch * len(dataset) + index`; a plain index means epoch 0.

Unreadable files raise a DataError naming the file. With `skip_corrupt`, the sample is replaced by
the next readable one (so batches keep their size), the file is logged once, and the skipped
indices are recorded in shared memory so the main process can report the count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from maxdeeplab.models.structures import PanopticTargets
from maxdeeplab.platform.data.coco import CocoPanoptic, segment_index_map
from maxdeeplab.platform.data.targets import build_crop_targets
from maxdeeplab.platform.data.transforms import EvalTransform, TrainTransform
from maxdeeplab.platform.errors import DataError

logger = logging.getLogger(__name__)

# Labels travel from the workers as int16 (contiguous class ids and thing ids are < 2^15).
LABEL_DTYPE = np.int16


class CorruptTracker:
    """Indices found unreadable, shared between the loader's worker processes."""

    def __init__(self, size: int) -> None:
        self.flags = torch.zeros(max(size, 1), dtype=torch.bool).share_memory_()

    def mark(self, index: int, error: DataError) -> None:
        if not self.flags[index]:
            logger.warning("skipping corrupt sample %d: %s", index, error)
        self.flags[index] = True

    @property
    def count(self) -> int:
        return int(self.flags.sum())

    def indices(self) -> list[int]:
        return torch.nonzero(self.flags).flatten().tolist()


def load_with_skip(
    split: CocoPanoptic, index: int, skip_corrupt: bool, tracker: CorruptTracker
) -> tuple[int, np.ndarray, np.ndarray]:
    """(index actually loaded, image, segment ids); with skip_corrupt, the next readable one."""
    for attempt in range(len(split)):
        current = (index + attempt) % len(split)
        try:
            return current, split.load_image(current), split.load_panoptic(current)
        except DataError as exc:
            if not skip_corrupt:
                raise
            tracker.mark(current, exc)
    raise DataError(f"{split.json_path}: every image of split {split.split} is unreadable")


class PanopticTrainDataset(Dataset):
    """Augmented S x S training crops with their targets.

    Args:
        split: the COCO panoptic split.
        transform: deeplab2's training augmentation.
        seed: the run's seed.
        max_thing_id, small_instance_weight, small_instance_area: from LossConfig.
        skip_corrupt: skip unreadable files instead of raising.
    """

    def __init__(
        self,
        split: CocoPanoptic,
        transform: TrainTransform,
        *,
        seed: int = 0,
        max_thing_id: int = 128,
        small_instance_weight: float = 1.0,
        small_instance_area: int = 4096,
        skip_corrupt: bool = False,
    ) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed
        self.max_thing_id = max_thing_id
        self.small_instance_weight = small_instance_weight
        self.small_instance_area = small_instance_area
        self.skip_corrupt = skip_corrupt
        self.corrupt = CorruptTracker(len(split))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int) -> dict[str, Any]:
        """A sample: image 3 x S x S float32 RGB in [0, 255] (padding 127.5; the model normalises),
        semantic/thing_ids/pixel_weights S x S, thing_classes (max_thing_id,), index, epoch."""
        epoch, index = divmod(int(key), len(self.split))
        rng = np.random.default_rng([self.seed, epoch, index])
        loaded, image, ids = load_with_skip(self.split, index, self.skip_corrupt, self.corrupt)
        record = self.split[loaded]
        labels = segment_index_map(ids, record.segments)  # crowd -> void before augmenting
        pixels, labels, _ = self.transform(image, labels, rng)
        targets = build_crop_targets(
            labels,
            record.segments,
            self.split.info,
            max_thing_id=self.max_thing_id,
            small_instance_weight=self.small_instance_weight,
            small_instance_area=self.small_instance_area,
            image_id=record.image_id,
        )
        return {
            "image": pixels,
            # int16 labels cut the inter-process copy 4x; batch_targets widens them to int64
            "semantic": torch.from_numpy(targets.semantic.astype(LABEL_DTYPE)),
            "thing_ids": torch.from_numpy(targets.thing_ids.astype(LABEL_DTYPE)),
            "thing_classes": torch.from_numpy(targets.thing_classes),
            "pixel_weights": torch.from_numpy(targets.pixel_weights),
            "index": torch.tensor(loaded),
            "epoch": torch.tensor(epoch),
            "dropped_instances": torch.tensor(targets.num_dropped_instances),
        }


def collate_train(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch of tensors (a dict, so Ray's device transfer and pinning work).

    Returns:
        image B x 3 x S x S float32, semantic/thing_ids B x S x S int16, pixel_weights B x S x S
        float32, thing_classes B x T int64, index/epoch/dropped_instances B. Use `batch_targets`
        for the `PanopticTargets`.
    """
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def batch_targets(batch: dict[str, torch.Tensor]) -> PanopticTargets:
    """The `PanopticTargets` of a training batch from `collate_train` (labels widened to int64,
    on the batch's device, so call it after moving the batch)."""
    return PanopticTargets(
        semantic=batch["semantic"].long(),
        thing_ids=batch["thing_ids"].long(),
        thing_classes=batch["thing_classes"].long(),
        pixel_weights=batch["pixel_weights"].float(),
    )


@dataclass
class EvalItem:
    """One evaluation image and what PQ needs to score its prediction on the raw image.

    Attributes:
        image: 3 x S x S float32 RGB in [0, 255] (resized, padded bottom/right with 127.5).
        image_id: the dataset's image id.
        file_name: the panoptic PNG name (predictions are written under the same name).
        raw_size: (H, W) of the raw image.
        resized_size: (h, w) before padding, for `undo_eval_resize`.
        gt_ids: H x W int64 raw ground-truth segment ids.
        segments: the ground-truth `segments_info` (dataset category ids, iscrowd, area).
    """

    image: torch.Tensor
    image_id: Any
    file_name: str
    raw_size: tuple[int, int]
    resized_size: tuple[int, int]
    gt_ids: np.ndarray
    segments: list[dict[str, Any]]


class PanopticEvalDataset(Dataset):
    """Evaluation items: deeplab2's eval resize + pad, with the raw ground truth for PQ."""

    def __init__(
        self, split: CocoPanoptic, transform: EvalTransform, *, skip_corrupt: bool = False
    ) -> None:
        self.split = split
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.corrupt = CorruptTracker(len(split))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> EvalItem | None:
        """The item, or None for an unreadable file when skip_corrupt is set."""
        try:
            image, gt_ids = self.split.load_image(index), self.split.load_panoptic(index)
        except DataError as exc:
            if not self.skip_corrupt:
                raise
            self.corrupt.mark(index, exc)
            return None
        padded, _, resized = self.transform(image)
        record = self.split[index]
        return EvalItem(
            image=padded,
            image_id=record.image_id,
            file_name=record.label_file,
            raw_size=(int(gt_ids.shape[0]), int(gt_ids.shape[1])),
            resized_size=resized,
            gt_ids=gt_ids,
            segments=[
                {
                    "id": s.id,
                    "category_id": s.category_id,
                    "iscrowd": int(s.iscrowd),
                    "area": s.area,
                }
                for s in record.segments
            ],
        )


def collate_eval(items: list[EvalItem | None]) -> dict[str, Any]:
    """Batch eval items: `image` B x 3 x S x S and `items` (the EvalItems, images included).

    Skipped (None) items are left out, so a batch can be empty (`image` is then None).
    """
    kept = [item for item in items if item is not None]
    images = torch.stack([item.image for item in kept]) if kept else None
    return {"image": images, "items": kept}
