"""Panoptic Quality with the official panopticapi semantics, as sums that add up.

Reference: cocodataset/panopticapi `evaluation.py` (commit 7bb4655). Per category c, a ground-truth
(GT) segment g and a predicted segment p of category c match iff IoU(g, p) > 0.5 with

    IoU = |g ∩ p| / (|g| + |p| - |g ∩ p| - |p ∩ VOID|)

(the predicted pixels on unlabelled GT are removed from the union). Crowd GT (`iscrowd=1`) is never
matched and never a false negative. An unmatched prediction is not a false positive when more than
half of it lies on VOID plus the crowd region of its own category. Then per category

    PQ_c = Σ_TP IoU / (TP + FP/2 + FN/2),  SQ_c = Σ_TP IoU / TP,  RQ_c = TP / (TP + FP/2 + FN/2)

and PQ (All / Things / Stuff) is the mean over the categories with TP + FP + FN > 0.

Two details of the official script are kept on purpose, because PQ must equal its numbers:
- the crowd exemption uses, per category, the crowd segment listed *last* in the image's
  `segments_info` (the script keeps one crowd id per category in a dict); COCO has at most one crowd
  segment per category and image, so this only matters for unusual data;
- match decisions are made on exact integers (`2·|g∩p| > union`, `2·(void+crowd) > |p|`), which give
  the same answers as the script's float comparisons for every image smaller than 2^52 pixels.

`crowd_as_void=True` is deeplab2's pipeline PQ (docs/deeplab2.md#pipeline-pq, #deeplab2-pq): crowd
regions of *any* category become VOID before scoring, so they leave every union and count toward
every prediction's exemption.

`PQStat` holds the per-category sums (`iou`, `tp`, `fp`, `fn`) and merges by `+`; `score_pair_table`
turns one image's GT x prediction intersection table into those sums.
`maxdeeplab.platform.eval.accumulator` builds the table from id maps (numpy or torch),
`maxdeeplab.platform.eval.files` from PNG files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from maxdeeplab.platform.errors import EvaluationError

# Index of VOID in every pair table (row 0 = GT void, column 0 = predicted void).
VOID_INDEX = 0


@dataclass(frozen=True)
class ImageSegments:
    """One image's segments, in `segments_info` order.

    Attributes:
        ids: S segment ids (int64, > 0).
        categories: S category ids (int64).
        iscrowd: S booleans (all False for predictions).
        areas: S pixel areas, or None to count them from the id map (GT areas come from the JSON
            in the official script, so the file evaluator passes them).
    """

    ids: np.ndarray
    categories: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def parse_segments(
    segments: Any, *, image: object = None, with_area: bool = False
) -> ImageSegments:
    """Normalise segments given as a COCO `segments_info` list or a mapping.

    Args:
        segments: a list of dicts with `id`, `category_id` and optionally `iscrowd`/`area`
            (COCO), or a mapping segment id -> category id, or segment id -> (category id, iscrowd).
        image: the image id, named in error messages.
        with_area: take `area` from the dicts (as the official script does for GT).

    Raises:
        EvaluationError: a segment id repeats, is not positive, or lacks a category.
    """
    if isinstance(segments, Mapping):
        items = []
        for seg_id, value in segments.items():
            if isinstance(value, tuple | list):
                items.append((int(seg_id), int(value[0]), bool(value[1]), None))
            else:
                items.append((int(seg_id), int(value), False, None))
    else:
        items = []
        for seg in segments:
            try:
                items.append(
                    (
                        int(seg["id"]),
                        int(seg["category_id"]),
                        bool(seg.get("iscrowd", 0)),
                        seg.get("area") if with_area else None,
                    )
                )
            except KeyError as exc:
                raise EvaluationError(
                    f"image {image}: segment {seg.get('id')} has no {exc.args[0]!r}"
                ) from None
    ids = np.fromiter((it[0] for it in items), dtype=np.int64, count=len(items))
    if len(ids) and ids.min() <= 0:
        raise EvaluationError(f"image {image}: segment id {int(ids.min())} must be positive")
    if len(np.unique(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        dup = int(values[counts > 1][0])
        raise EvaluationError(f"image {image}: segment id {dup} is listed twice in segments_info")
    areas = None
    if with_area and all(it[3] is not None for it in items):
        areas = np.fromiter((it[3] for it in items), dtype=np.int64, count=len(items))
    return ImageSegments(
        ids=ids,
        categories=np.fromiter((it[1] for it in items), dtype=np.int64, count=len(items)),
        iscrowd=np.fromiter((it[2] for it in items), dtype=bool, count=len(items)),
        areas=areas,
    )


@dataclass(frozen=True)
class PQResult:
    """PQ/SQ/RQ as fractions.

    `groups` maps 'All'/'Things'/'Stuff' to {pq, sq, rq, n}; `per_class` maps every category id to
    {pq, sq, rq, tp, fp, fn, iou} (scores 0.0 for categories with no segment, which are left out of
    the means, as in panopticapi).
    """

    groups: dict[str, dict[str, float]]
    per_class: dict[int, dict[str, float]]

    @property
    def pq(self) -> float:
        return self.groups["All"]["pq"]

    @property
    def pq_thing(self) -> float:
        return self.groups["Things"]["pq"]

    @property
    def pq_stuff(self) -> float:
        return self.groups["Stuff"]["pq"]

    def to_panopticapi(self) -> dict[str, Any]:
        """panopticapi's `pq_compute` result structure (per_class keyed by category id)."""
        out: dict[str, Any] = {name: dict(v) for name, v in self.groups.items()}
        out["per_class"] = {
            cat: {k: v[k] for k in ("pq", "sq", "rq")} for cat, v in self.per_class.items()
        }
        return out


class PQStat:
    """Per-category PQ sums over a dataset; instances over the same categories merge with `+`.

    Attributes:
        category_ids: K category ids, in the order of the arrays.
        isthing: K booleans.
        iou, tp, fp, fn: K sums (float64 / int64).
    """

    def __init__(
        self,
        category_ids: Any,
        isthing: Any,
        iou: Any = None,
        tp: Any = None,
        fp: Any = None,
        fn: Any = None,
    ) -> None:
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.isthing = np.asarray(isthing, dtype=bool)
        K = len(self.category_ids)
        if len(np.unique(self.category_ids)) != K:
            raise EvaluationError("categories: a category id is listed twice")
        self.iou = np.zeros(K) if iou is None else np.array(iou, dtype=np.float64)
        self.tp = np.zeros(K, np.int64) if tp is None else np.array(tp, np.int64)
        self.fp = np.zeros(K, np.int64) if fp is None else np.array(fp, np.int64)
        self.fn = np.zeros(K, np.int64) if fn is None else np.array(fn, np.int64)
        # category id -> array index; -1 marks an unknown category.
        self._index = np.full(int(self.category_ids.max(initial=0)) + 2, -1, np.int64)
        self._index[self.category_ids] = np.arange(K)

    @classmethod
    def from_categories(
        cls, categories: Iterable[Mapping[str, Any]] | Mapping[int, bool]
    ) -> PQStat:
        """Empty sums for COCO `categories` dicts (`id`, `isthing`) or a mapping id -> isthing."""
        if isinstance(categories, Mapping):
            pairs = [(int(k), bool(v)) for k, v in categories.items()]
        else:
            pairs = [(int(c["id"]), bool(c.get("isthing", 0))) for c in categories]
        return cls(np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], bool))

    def category_index(
        self, category_ids: np.ndarray, *, image: object, seg_ids: np.ndarray
    ) -> np.ndarray:
        """Array indices of `category_ids`.

        Raises:
            EvaluationError: a category is unknown (names the image and the segment).
        """
        cats = np.asarray(category_ids, np.int64)
        idx = np.full(len(cats), -1, np.int64)
        ok = (cats >= 0) & (cats < len(self._index))
        idx[ok] = self._index[cats[ok]]
        if (idx < 0).any():
            bad = int(np.flatnonzero(idx < 0)[0])
            raise EvaluationError(
                f"image {image}: segment {int(seg_ids[bad])} has unknown category_id "
                f"{int(cats[bad])}"
            )
        return idx

    # ---- merging (Ray workers all-reduce these sums) ----
    def _check_same(self, other: PQStat) -> None:
        if not np.array_equal(self.category_ids, other.category_ids):
            raise EvaluationError("cannot add PQ sums over different category lists")

    def __add__(self, other: PQStat) -> PQStat:
        self._check_same(other)
        return PQStat(
            self.category_ids,
            self.isthing,
            self.iou + other.iou,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
        )

    def __iadd__(self, other: PQStat) -> PQStat:
        self._check_same(other)
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self

    @property
    def state(self) -> np.ndarray:
        """4 x K float64: rows iou, tp, fp, fn (counts are exact in float64 below 2^53)."""
        return np.stack([self.iou, self.tp, self.fp, self.fn]).astype(np.float64)

    def load_state(self, state: Any) -> None:
        """Replace the sums with a 4 x K array or tensor (e.g. after `dist.all_reduce`)."""
        state = np.asarray(state.detach().cpu() if hasattr(state, "detach") else state, np.float64)
        if state.shape != (4, len(self.category_ids)):
            raise EvaluationError(
                f"PQ state must be 4 x {len(self.category_ids)}, got {state.shape}"
            )
        self.iou = state[0].copy()
        self.tp, self.fp, self.fn = (np.rint(row).astype(np.int64) for row in state[1:])

    def to_tensor(self, device: Any = None) -> Any:
        """The 4 x K sums as a float64 torch tensor, ready for `all_reduce(op=SUM)`."""
        import torch

        return torch.as_tensor(self.state, dtype=torch.float64, device=device)

    def from_tensor(self, tensor: Any) -> PQStat:
        """A new PQStat over the same categories holding `tensor`'s sums."""
        out = PQStat(self.category_ids, self.isthing)
        out.load_state(tensor)
        return out

    def reset(self) -> None:
        self.iou[:] = 0.0
        for arr in (self.tp, self.fp, self.fn):
            arr[:] = 0

    # ---- the metric ----
    def compute(self) -> PQResult:
        """PQ, SQ, RQ and n for All / Things / Stuff, and per class.

        A group with no category to average (n = 0) reports 0.0 (panopticapi would divide by zero).
        """
        tp, fp, fn, iou = self.tp, self.fp, self.fn, self.iou
        valid = (tp + fp + fn) > 0
        denom = np.where(valid, tp + 0.5 * fp + 0.5 * fn, 1.0)
        pq = np.where(valid, iou / denom, 0.0)
        sq = np.where(tp > 0, iou / np.maximum(tp, 1), 0.0)
        rq = np.where(valid, tp / denom, 0.0)
        groups = {}
        for name, member in (("All", None), ("Things", True), ("Stuff", False)):
            sel = valid if member is None else valid & (self.isthing == member)
            n = int(sel.sum())
            groups[name] = {
                "pq": float(pq[sel].sum() / n) if n else 0.0,
                "sq": float(sq[sel].sum() / n) if n else 0.0,
                "rq": float(rq[sel].sum() / n) if n else 0.0,
                "n": n,
            }
        per_class = {
            int(c): {
                "pq": float(pq[k]),
                "sq": float(sq[k]),
                "rq": float(rq[k]),
                "tp": int(tp[k]),
                "fp": int(fp[k]),
                "fn": int(fn[k]),
                "iou": float(iou[k]),
            }
            for k, c in enumerate(self.category_ids)
        }
        return PQResult(groups, per_class)


def score_pair_table(
    stat: PQStat,
    table: np.ndarray,
    gt: ImageSegments,
    pred: ImageSegments,
    *,
    crowd_as_void: bool = False,
    image: object = None,
) -> None:
    """Add one image's TP/FP/FN/IoU sums to `stat`.

    Args:
        stat: the sums to add to.
        table: (G+1) x (P+1) int64 pixel counts; row/column 0 are VOID, row i / column j the i-th
            GT / j-th predicted segment of `gt` / `pred` (the same order).
        gt: the image's GT segments (`areas` from the JSON, or None to use the table's row sums).
        pred: the predicted segments (areas always from the table, as in the official script).
        crowd_as_void: deeplab2 pipeline mode: crowd GT pixels of any category count as VOID.
        image: image id for error messages.
    """
    G, P = len(gt), len(pred)
    gt_cat = stat.category_index(gt.categories, image=image, seg_ids=gt.ids)
    pred_cat = stat.category_index(pred.categories, image=image, seg_ids=pred.ids)
    if P == 0 and G == 0:
        return
    crowd = gt.iscrowd
    inter = table[1:, 1:]  # G x P
    pred_void = table[VOID_INDEX, 1:].copy()  # P
    if crowd_as_void and crowd.any():
        pred_void += inter[crowd].sum(axis=0)
    pred_area = table[:, 1:].sum(axis=0)  # P
    gt_area = gt.areas if gt.areas is not None else table[1:, :].sum(axis=1)  # G

    # Matches: same category, GT not crowd, IoU > 0.5 (strict: 0.5 itself is no match), decided
    # as 2·inter > union in exact integers.
    candidate = (gt_cat[:, None] == pred_cat[None, :]) & ~crowd[:, None] & (inter > 0)
    gi, pj = np.nonzero(candidate)
    pair_inter = inter[gi, pj]
    union = pred_area[pj] + gt_area[gi] - pair_inter - pred_void[pj]
    is_tp = 2 * pair_inter > union
    gi, pj = gi[is_tp], pj[is_tp]
    K = len(stat.category_ids)
    if len(gi):
        iou = pair_inter[is_tp] / union[is_tp]
        stat.iou += np.bincount(gt_cat[gi], weights=iou, minlength=K)
        stat.tp += np.bincount(gt_cat[gi], minlength=K)

    gt_matched = np.zeros(G, bool)
    gt_matched[gi] = True
    is_fn = ~gt_matched & ~crowd
    stat.fn += np.bincount(gt_cat[is_fn], minlength=K)

    pred_matched = np.zeros(P, bool)
    pred_matched[pj] = True
    exempt = pred_void
    if not crowd_as_void and crowd.any():
        # The official script keeps, per category, the last crowd segment in segments_info order.
        crowd_rows = np.flatnonzero(crowd)
        last_crowd_row = dict(zip(gt_cat[crowd_rows].tolist(), crowd_rows.tolist(), strict=True))
        rows = np.array([last_crowd_row.get(c, -1) for c in pred_cat.tolist()], np.int64)
        has = rows >= 0
        exempt = exempt.copy()
        exempt[has] += inter[rows[has], np.flatnonzero(has)]
    # Not an FP when (void + own-category crowd) / area > 0.5, again strict and in integers.
    is_fp = ~pred_matched & ~(2 * exempt > pred_area)
    stat.fp += np.bincount(pred_cat[is_fp], minlength=K)
