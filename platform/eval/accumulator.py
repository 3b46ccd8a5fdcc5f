"""The in-memory PQ accumulator used during training: id maps in, per-category sums out.

Each `update` turns a (prediction, ground truth) pair of H x W segment-id maps into a small GT x
prediction intersection table and scores it with `pq.score_pair_table` (panopticapi semantics,
docs/deeplab2.md#panoptic-quality). The table is built without sorting: a lookup table (LUT) maps
every segment id to a dense index (0 = an id not listed in the segments, 1 = VOID, 2.. = the
listed segments), and one `bincount` over `gt_index · stride + pred_index` counts every pair. That
is a few linear passes over the pixels (~1 ms for 640 x 480 on one core), against a 64-bit sort in
panopticapi. Torch tensors stay on their device: only the (G+2) x (P+2) table is copied to the
host, never a full-resolution map.

Sums merge by addition (`PQStat.__add__`, `to_tensor` / `from_tensor` for
`torch.distributed.all_reduce`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from maxdeeplab.platform.errors import EvaluationError
from maxdeeplab.platform.eval.pq import (
    ImageSegments,
    PQResult,
    PQStat,
    parse_segments,
    score_pair_table,
)

# Dense indices in the pair table before `check_and_strip_unknown`: ids absent from the segment list
# get 0, so that a zeroed LUT entry means "unknown" whatever the scale; VOID (id 0) gets 1.
UNKNOWN_INDEX = 0
VOID_LUT_INDEX = 1
FIRST_SEGMENT_INDEX = 2


class SegmentLookup:
    """A reusable id -> dense-index LUT that grows to the largest id seen, for numpy maps.

    Entries are reset after each use, so building a table costs O(segments), not O(max id). The LUT
    is intp (no cast before `bincount`) up to `INTP_LUT_SIZE` entries, int32 beyond (24-bit COCO ids
    would otherwise need 128 MiB).
    """

    INTP_LUT_SIZE = 1 << 22

    def __init__(self) -> None:
        self._lut = np.zeros(2, np.intp)
        # Reused output buffers: a fresh 2.4 MB array per map costs page faults on every image.
        self._buffers: list[np.ndarray] = [np.empty(0, np.intp), np.empty(0, np.intp)]

    def indices(
        self, ids_map: np.ndarray, seg_ids: np.ndarray, *, scale: int = 1, slot: int = 0
    ) -> np.ndarray:
        """H x W intp ids -> H x W dense indices times `scale` (0 unknown, 1 void, 2 + k seg k).

        The result may be a reused buffer (one per `slot`), valid until the next call with it.
        """
        need = int(seg_ids.max(initial=0)) + 2  # the last entry must stay UNKNOWN for mode='clip'
        if need > len(self._lut):
            size = max(need, min(2 * len(self._lut), self.INTP_LUT_SIZE))
            self._lut = np.zeros(size, np.intp if size <= self.INTP_LUT_SIZE else np.int32)
        lut = self._lut
        lut[0] = VOID_LUT_INDEX * scale
        lut[seg_ids] = np.arange(FIRST_SEGMENT_INDEX, FIRST_SEGMENT_INDEX + len(seg_ids)) * scale
        try:
            # Ids beyond the LUT clip to its last entry (UNKNOWN); negative ids are invalid input.
            if self._buffers[slot].size != ids_map.size or self._buffers[slot].dtype != lut.dtype:
                self._buffers[slot] = np.empty(ids_map.size, lut.dtype)
            out = self._buffers[slot].reshape(ids_map.shape)
            return np.take(lut, ids_map, mode="clip", out=out)
        finally:
            lut[0] = UNKNOWN_INDEX
            lut[seg_ids] = UNKNOWN_INDEX


def _as_intp(ids_map: np.ndarray) -> np.ndarray:
    # np.take is ~15x slower with non-intp indices (it casts them), so cast once up front.
    return ids_map if ids_map.dtype == np.intp else ids_map.astype(np.intp)


def pair_table_numpy(
    gt_map: np.ndarray,
    gt_ids: np.ndarray,
    pred_map: np.ndarray,
    pred_ids: np.ndarray,
    lookup: SegmentLookup,
) -> np.ndarray:
    """(G+2) x (P+2) int64 pixel counts: index 0 unlisted ids, 1 VOID, 2 + k the k-th segment."""
    stride = len(pred_ids) + FIRST_SEGMENT_INDEX
    # The GT LUT holds index·stride, so two gathers and one add give the pair key.
    key = lookup.indices(_as_intp(gt_map), gt_ids, scale=stride, slot=0)
    key += lookup.indices(_as_intp(pred_map), pred_ids, slot=1)  # int32 for huge LUTs: fine
    counts = np.bincount(key.ravel(), minlength=(len(gt_ids) + FIRST_SEGMENT_INDEX) * stride)
    return counts.reshape(-1, stride)


def pair_table_torch(
    gt_map: Any, gt_ids: np.ndarray, pred_map: Any, pred_ids: np.ndarray
) -> np.ndarray:
    """`pair_table_numpy` for torch tensors, on their device; only the table goes to the host."""
    import torch

    device = gt_map.device
    gt_map, pred_map = gt_map.long(), pred_map.long()
    stride = len(pred_ids) + FIRST_SEGMENT_INDEX

    def indices(ids_map: torch.Tensor, seg_ids: np.ndarray) -> torch.Tensor:
        # Maps are usually semantic·256 + instance (< 2^16), so a fresh LUT per call is small.
        size = int(seg_ids.max(initial=0)) + 2
        lut = torch.full((size,), UNKNOWN_INDEX, dtype=torch.long, device=device)
        lut[0] = VOID_LUT_INDEX
        if len(seg_ids):
            lut[torch.as_tensor(seg_ids, device=device)] = torch.arange(
                FIRST_SEGMENT_INDEX, FIRST_SEGMENT_INDEX + len(seg_ids), device=device
            )
        # Negative ids are invalid input; ids beyond the LUT land on its last entry (UNKNOWN).
        return lut[ids_map.clamp(0, size - 1)]

    key = indices(gt_map, gt_ids) * stride + indices(pred_map, pred_ids)
    counts = torch.bincount(key.flatten(), minlength=(len(gt_ids) + FIRST_SEGMENT_INDEX) * stride)
    return counts.cpu().numpy().astype(np.int64).reshape(-1, stride)


def check_and_strip_unknown(
    table: np.ndarray,
    gt_map: Any,
    gt: ImageSegments,
    pred_map: Any,
    pred: ImageSegments,
    *,
    image: object,
) -> np.ndarray:
    """The table without its 'unknown' row and column, in the layout `score_pair_table` takes.

    Raises:
        EvaluationError: a map holds an unlisted id, or a listed segment has no pixel.
    """
    for axis, seg, ids_map, who in (
        (1, gt, gt_map, "ground truth"),
        (0, pred, pred_map, "prediction"),
    ):
        per_index = table.sum(axis=axis)
        if per_index[UNKNOWN_INDEX]:
            present = np.unique(_to_numpy(ids_map))
            extra = sorted(set(present.tolist()) - set(seg.ids.tolist()) - {0})
            raise EvaluationError(
                f"image {image}: {who} segment {extra[0]} is in the PNG/map but not in "
                "segments_info"
            )
        empty = np.flatnonzero(per_index[FIRST_SEGMENT_INDEX:] == 0)
        if len(empty):
            raise EvaluationError(
                f"image {image}: {who} segment {int(seg.ids[empty[0]])} is in segments_info "
                "but not in the PNG/map"
            )
    return table[1:, 1:]  # drop UNKNOWN: VOID is now row / column 0


def _on_accelerator(ids_map: Any) -> bool:
    return hasattr(ids_map, "device") and getattr(ids_map.device, "type", "cpu") != "cpu"


def _as_tensor(ids_map: Any, device: Any) -> Any:
    import torch

    return torch.as_tensor(ids_map, device=device)


def _to_numpy(ids_map: Any) -> np.ndarray:
    return ids_map.detach().cpu().numpy() if hasattr(ids_map, "detach") else np.asarray(ids_map)


class PQAccumulator:
    """Accumulates PQ sums image by image; `compute()` gives All/Things/Stuff and per-class PQ.

    Args:
        categories: COCO `categories` dicts (`id`, `isthing`) or a mapping category id -> isthing.
        crowd_as_void: deeplab2's pipeline PQ (crowd of any category counts as VOID),
            docs/deeplab2.md#pipeline-pq.

    Example:
        acc = PQAccumulator(categories)
        acc.update(pred_ids, {5: 1, 9: 3}, gt_ids, {7: (1, False), 8: (3, True)})
        acc.all_reduce(device=device)  # on every Ray Train worker: sums over all of them
        acc.compute().pq
    """

    def __init__(
        self,
        categories: Iterable[Mapping[str, Any]] | Mapping[int, bool],
        *,
        crowd_as_void: bool = False,
    ) -> None:
        self.stat = PQStat.from_categories(categories)
        self.crowd_as_void = crowd_as_void
        self._lookup = SegmentLookup()

    def update(
        self,
        pred_ids: Any,
        pred_segments: Any,
        gt_ids: Any,
        gt_segments: Any,
        *,
        image_id: object = None,
    ) -> None:
        """Add one image.

        Args:
            pred_ids: H x W integer segment ids (numpy array or torch tensor, any device), 0 = VOID.
            pred_segments: segment id -> category id, or a COCO `segments_info` list.
            gt_ids: H x W integer segment ids, the shape of `pred_ids`.
            gt_segments: segment id -> category id or (category id, iscrowd), or `segments_info`.
            image_id: named in error messages.

        Raises:
            EvaluationError: shapes differ, an id in a map is not listed (or a listed one is
                absent), a category is unknown, or a segment id is listed twice.
        """
        gt = parse_segments(gt_segments, image=image_id)
        pred = parse_segments(pred_segments, image=image_id)
        if tuple(gt_ids.shape) != tuple(pred_ids.shape):
            raise EvaluationError(
                f"image {image_id}: ground truth is {tuple(gt_ids.shape)} but prediction is "
                f"{tuple(pred_ids.shape)}"
            )
        if _on_accelerator(gt_ids) or _on_accelerator(pred_ids):
            device = gt_ids.device if _on_accelerator(gt_ids) else pred_ids.device
            table = pair_table_torch(
                _as_tensor(gt_ids, device), gt.ids, _as_tensor(pred_ids, device), pred.ids
            )
        else:
            table = pair_table_numpy(
                _to_numpy(gt_ids), gt.ids, _to_numpy(pred_ids), pred.ids, self._lookup
            )
        table = check_and_strip_unknown(table, gt_ids, gt, pred_ids, pred, image=image_id)
        score_pair_table(
            self.stat, table, gt, pred, crowd_as_void=self.crowd_as_void, image=image_id
        )

    def all_reduce(self, *, device: Any = None, group: Any = None) -> None:
        """Sum the sums over every rank of `torch.distributed` (no-op when it is not initialised).

        Args:
            device: where the 4 x K float64 tensor lives for the collective (a CUDA device for NCCL;
                None = CPU, fine for gloo).
            group: the process group (default: the world).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        state = self.stat.to_tensor(device)
        dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
        self.stat.load_state(state)

    def compute(self) -> PQResult:
        return self.stat.compute()

    def reset(self) -> None:
        self.stat.reset()
