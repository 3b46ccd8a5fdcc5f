"""PQ arithmetic on hand-computed cases (panopticapi semantics), merging by addition.

The definition: docs/deeplab2.md#panoptic-quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maxdeeplab.cli.bench.synthetic_pairs import make_pair, synthetic_categories
from maxdeeplab.platform.errors import EvaluationError
from maxdeeplab.platform.eval.accumulator import PQAccumulator
from maxdeeplab.platform.eval.pq import PQStat

# category id -> isthing
CATEGORIES = {1: True, 2: True, 3: True, 10: False, 11: False}


def _pq_of(pred, pred_segs, gt, gt_segs, **kwargs):
    acc = PQAccumulator(CATEGORIES, **kwargs)
    acc.update(np.asarray(pred), pred_segs, np.asarray(gt), gt_segs)
    return acc


def _blank(h=20, w=20):
    return np.zeros((h, w), np.int64)


def test_identical_maps_give_pq_one():
    gt = _blank()
    gt[:, :10] = 7  # stuff 10
    gt[:, 10:] = 8  # stuff 11
    gt[2:6, 2:6] = 9  # thing 1
    gt[12:18, 12:15] = 5  # thing 2
    segs = {7: 10, 8: 11, 9: 1, 5: 2}
    result = _pq_of(gt, segs, gt, segs).compute()
    for group, n in (("All", 4), ("Things", 2), ("Stuff", 2)):
        assert result.groups[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
    assert result.per_class[3] == {
        "pq": 0.0,
        "sq": 0.0,
        "rq": 0.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "iou": 0.0,
    }


def test_one_false_positive_and_one_false_negative():
    gt, pred = _blank(), _blank()
    gt[:] = pred[:] = 1  # stuff 10, matched perfectly
    gt[0:5, 0:5] = 2  # thing 1, missed -> FN
    pred[10:15, 10:15] = 3  # thing 1 elsewhere -> FP (no overlap)
    acc = _pq_of(pred, {1: 10, 3: 1}, gt, {1: 10, 2: 1})
    stat = acc.stat
    k1 = 0  # category 1 is first
    assert (stat.tp[k1], stat.fp[k1], stat.fn[k1]) == (0, 1, 1)
    result = acc.compute()
    # stuff 10: GT 375 px, pred 375 px, overlap 350 -> IoU 350/400; TP 1.
    assert result.per_class[10]["pq"] == pytest.approx(350 / 400, abs=1e-15)
    assert result.per_class[1] == {
        "pq": 0.0,
        "sq": 0.0,
        "rq": 0.0,
        "tp": 0,
        "fp": 1,
        "fn": 1,
        "iou": 0.0,
    }
    assert result.groups["All"]["pq"] == pytest.approx((350 / 400 + 0.0) / 2, abs=1e-15)
    assert result.groups["Things"]["n"] == 1 and result.groups["Stuff"]["n"] == 1


def test_void_is_removed_from_the_union():
    gt, pred = _blank(), _blank()
    gt[0:10, 0:10] = 4  # thing 1, 100 px; the rest of the GT is void
    pred[0:10, 0:15] = 6  # covers it plus 50 void pixels
    stat = _pq_of(pred, {6: 1}, gt, {4: 1}).stat
    assert stat.tp[0] == 1 and stat.iou[0] == 1.0  # 100 / (150 + 100 - 100 - 50)


def test_overlap_with_another_segment_is_not_removed_from_the_union():
    gt, pred = _blank(), _blank()
    gt[0:10, 0:10] = 4
    gt[0:10, 10:15] = 5  # a labelled stuff neighbour, not void
    pred[0:10, 0:15] = 6
    stat = _pq_of(pred, {6: 1}, gt, {4: 1, 5: 10}).stat
    assert stat.tp[0] == 1 and stat.iou[0] == pytest.approx(100 / 150, abs=1e-15)


@pytest.mark.parametrize(("covered", "matched"), [(50, False), (51, True)])
def test_iou_exactly_one_half_is_not_a_match(covered, matched):
    gt, pred = _blank(), _blank()
    gt[0:10, 0:10] = 4  # 100 px; pred covers `covered` of them and nothing else -> IoU covered/100
    pred.ravel()[np.flatnonzero(gt.ravel() == 4)[:covered]] = 6
    gt[10:, :] = 8  # stuff 10 under the rest
    stat = _pq_of(pred, {6: 1}, gt, {4: 1, 8: 10}).stat
    assert (stat.tp[0], stat.fp[0], stat.fn[0]) == ((1, 0, 0) if matched else (0, 1, 1))


def test_crowd_of_same_category_exempts_a_false_positive():
    gt, pred = _blank(), _blank()
    gt[0:10, 0:10] = 3  # crowd of thing 1
    pred[0:10, 0:6] = 7  # thing 1, 60 px, all on the crowd -> not an FP
    pred[10:20, 0:6] = 8  # thing 2, all on void -> not an FP
    pred[0:10, 10:16] = 9  # thing 2, all on void -> not an FP
    gt_segs = {3: (1, True)}
    stat = _pq_of(pred, {7: 1, 8: 2, 9: 2}, gt, gt_segs).stat
    assert stat.fp.tolist() == [0, 0, 0, 0, 0]
    assert stat.fn.tolist() == [0, 0, 0, 0, 0]  # crowd is never a false negative
    # A prediction of another category on the crowd is a false positive.
    pred2 = _blank()
    pred2[0:10, 0:6] = 7
    stat = _pq_of(pred2, {7: 2}, gt, gt_segs).stat
    assert stat.fp.tolist() == [0, 1, 0, 0, 0]


def test_exemption_needs_more_than_half_on_void_plus_crowd():
    gt, pred = _blank(), _blank()
    gt[:, 10:] = 2  # stuff 11
    gt[0:10, 0:5] = 3  # crowd thing 1, 50 px; left half of the rest is void
    pred[0:10, 0:5] = 7  # thing 1: 50 on crowd ...
    pred[0:10, 10:15] = 7  # ... + 50 on stuff 11 -> exactly half: FP
    pred[10:20, 0:11] = 8  # thing 1: 100 on void + 10 on stuff 11 -> > half: exempt
    stat = _pq_of(pred, {7: 1, 8: 1}, gt, {2: 11, 3: (1, True)}).stat
    assert stat.fp[0] == 1


def test_crowd_as_void_mode():
    gt, pred = _blank(), _blank()
    gt[0:10, 0:10] = 4  # thing 2, 100 px
    gt[10:20, 0:10] = 5  # crowd of thing 1, 100 px
    pred[0:16, 0:10] = 6  # thing 2: its 100 px + 60 px of the crowd
    pred[10:20, 12:20] = 7  # thing 3: 80 px on void ...
    pred[10:20, 10:12] = 7  # ... plus 20 px on void -> exempt in both modes
    pred[0:10, 10:20] = 8  # thing 3, 100 px on void
    gt_segs = {4: 2, 5: (1, True)}
    pred_segs = {6: 2, 7: 3, 8: 3}
    official = _pq_of(pred, pred_segs, gt, gt_segs).compute().per_class
    assert official[2]["tp"] == 1 and official[2]["iou"] == pytest.approx(100 / 160, abs=1e-15)
    pipeline = _pq_of(pred, pred_segs, gt, gt_segs, crowd_as_void=True).compute().per_class
    assert pipeline[2]["tp"] == 1 and pipeline[2]["iou"] == 1.0  # 100 / (160 + 100 - 100 - 60)
    # A thing-3 prediction mostly on thing-1 crowd: FP officially, exempt (void) in pipeline mode.
    pred2 = _blank()
    pred2[10:17, 0:10] = 9  # 70 px on the crowd
    pred2[0:3, 0:10] = 9  # 30 px on the thing-2 GT
    official = _pq_of(pred2, {9: 3}, gt, gt_segs).compute().per_class
    pipeline = _pq_of(pred2, {9: 3}, gt, gt_segs, crowd_as_void=True).compute().per_class
    assert official[3]["fp"] == 1 and pipeline[3]["fp"] == 0
    assert official[1]["fn"] == pipeline[1]["fn"] == 0


def test_last_crowd_segment_of_a_category_is_the_one_that_exempts():
    # Two crowd segments of category 1 (not COCO, but panopticapi keeps only the last one listed).
    gt, pred = _blank(), _blank()
    gt[0:10, :] = 3
    gt[10:20, :] = 4
    pred[0:10, 0:10] = 7  # all on crowd 3, listed first -> not exempt
    pred[10:20, 0:10] = 8  # all on crowd 4, listed last -> exempt
    stat = _pq_of(
        pred,
        {7: 1, 8: 1},
        gt,
        [
            {"id": 3, "category_id": 1, "iscrowd": 1},
            {"id": 4, "category_id": 1, "iscrowd": 1},
        ],
    ).stat
    assert stat.fp[0] == 1


def test_empty_group_and_unused_categories():
    gt = _blank()
    gt[:] = 1
    result = _pq_of(gt, {1: 10}, gt, {1: 10}).compute()
    assert result.groups["Things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert result.groups["All"]["n"] == 1 and result.pq == 1.0


def test_merge_by_addition_equals_a_single_pass():
    rng = np.random.default_rng(3)
    pairs = [make_pair(rng, height=60, width=80, num_segments=12) for _ in range(12)]
    categories = synthetic_categories()
    single = PQAccumulator(categories)
    parts = [PQAccumulator(categories) for _ in range(3)]
    for k, p in enumerate(pairs):
        single.update(p.pred_ids, p.pred_segments, p.gt_ids, p.gt_segments)
        parts[k % 3].update(p.pred_ids, p.pred_segments, p.gt_ids, p.gt_segments)
    merged = parts[0].stat + parts[1].stat + parts[2].stat
    assert merged.tp.tolist() == single.stat.tp.tolist()
    assert merged.fp.tolist() == single.stat.fp.tolist()
    assert merged.fn.tolist() == single.stat.fn.tolist()
    np.testing.assert_allclose(merged.iou, single.stat.iou, rtol=0, atol=1e-12)
    assert single.stat.tp.sum() > 0 and single.stat.fp.sum() > 0
    # All-reduce path: a summed tensor of the states loads back to the same sums.
    summed = sum(p.stat.to_tensor() for p in parts)
    restored = single.stat.from_tensor(summed)
    assert restored.tp.tolist() == single.stat.tp.tolist()
    r1, r2 = restored.compute(), single.compute()
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq"):
            assert r1.groups[group][key] == pytest.approx(r2.groups[group][key], abs=1e-12)


def test_torch_inputs_equal_numpy_inputs():
    rng = np.random.default_rng(5)
    categories = synthetic_categories()
    by_numpy, by_torch = PQAccumulator(categories), PQAccumulator(categories)
    for _ in range(4):
        p = make_pair(rng, height=48, width=64, num_segments=10)
        by_numpy.update(p.pred_ids, p.pred_segments, p.gt_ids, p.gt_segments)
        by_torch.update(
            torch.from_numpy(p.pred_ids), p.pred_segments, torch.from_numpy(p.gt_ids), p.gt_segments
        )
    assert np.array_equal(by_numpy.stat.state, by_torch.stat.state)


def test_device_table_path_equals_numpy(monkeypatch):
    # The on-device path (used for CUDA tensors) run on CPU tensors: same sums as the numpy path.
    import maxdeeplab.platform.eval.accumulator as accumulator

    monkeypatch.setattr(accumulator, "_on_accelerator", lambda ids_map: hasattr(ids_map, "device"))
    rng = np.random.default_rng(6)
    categories = synthetic_categories()
    by_numpy, by_device = PQAccumulator(categories), PQAccumulator(categories)
    for _ in range(4):
        p = make_pair(rng, height=48, width=64, num_segments=10)
        gt_small = _compact(p.gt_ids, p.gt_segments)
        pred_small = _compact(p.pred_ids, p.pred_segments)
        by_numpy.update(pred_small[0], pred_small[1], gt_small[0], gt_small[1])
        by_device.update(
            torch.from_numpy(pred_small[0]),
            pred_small[1],
            torch.from_numpy(gt_small[0]),
            gt_small[1],
        )
    assert np.array_equal(by_numpy.stat.state, by_device.stat.state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_equal_numpy_inputs():
    rng = np.random.default_rng(7)
    categories = synthetic_categories()
    by_numpy, by_cuda = PQAccumulator(categories), PQAccumulator(categories)
    for _ in range(4):
        p = make_pair(rng, height=48, width=64, num_segments=10)
        by_numpy.update(p.pred_ids, p.pred_segments, p.gt_ids, p.gt_segments)
        by_cuda.update(
            torch.from_numpy(p.pred_ids).cuda(),
            p.pred_segments,
            torch.from_numpy(p.gt_ids).cuda(),
            p.gt_segments,
        )
    assert np.array_equal(by_numpy.stat.state, by_cuda.stat.state)


def _compact(ids_map, segments):
    # training-style ids (semantic·256 + instance) keep the on-device LUT small
    new = {s["id"]: s["category_id"] * 256 + k + 1 for k, s in enumerate(segments)}
    out = np.zeros_like(ids_map)
    for old, value in new.items():
        out[ids_map == old] = value
    return out, [{**s, "id": new[s["id"]]} for s in segments]


@pytest.mark.parametrize(
    ("pred_segs", "gt_segs", "message"),
    [
        ({6: 1}, {4: 1, 5: 10}, "prediction segment 7 is in the PNG/map but not in segments_info"),
        ({6: 1, 7: 2, 9: 1}, {4: 1, 5: 10}, "prediction segment 9 is in segments_info but not"),
        ({6: 1, 7: 2}, {4: 1}, "ground truth segment 5 is in the PNG/map but not in segments_info"),
        ({6: 1, 7: 2}, {4: 1, 5: 10, 12: 2}, "ground truth segment 12 is in segments_info but not"),
        ({6: 1, 7: 99}, {4: 1, 5: 10}, "segment 7 has unknown category_id 99"),
        ({6: 1, 7: 2}, {4: 1, 5: 77}, "segment 5 has unknown category_id 77"),
        (
            [{"id": 6, "category_id": 1}, {"id": 6, "category_id": 2}],
            {4: 1},
            "segment id 6 is listed twice",
        ),
    ],
)
def test_inconsistent_inputs_name_the_image_and_segment(pred_segs, gt_segs, message):
    gt, pred = _blank(), _blank()
    gt[:10] = 4
    gt[10:] = 5
    pred[:10] = 6
    pred[10:] = 7
    acc = PQAccumulator(CATEGORIES)
    with pytest.raises(EvaluationError, match=f"image 42: .*{message}"):
        acc.update(pred, pred_segs, gt, gt_segs, image_id=42)


def test_shape_mismatch_is_an_error():
    acc = PQAccumulator(CATEGORIES)
    with pytest.raises(
        EvaluationError, match="image 3: ground truth is \\(20, 20\\) but prediction is"
    ):
        acc.update(_blank(20, 21), {}, _blank(), {}, image_id=3)


def test_stat_over_other_categories_cannot_be_added():
    with pytest.raises(EvaluationError):
        PQStat.from_categories({1: True}) + PQStat.from_categories({2: True})


def test_all_reduce_over_a_gloo_group(tmp_path):
    import torch.distributed as dist

    rng = np.random.default_rng(8)
    p = make_pair(rng, height=48, width=64, num_segments=10)
    acc = PQAccumulator(synthetic_categories())
    acc.all_reduce()  # no process group: nothing happens
    acc.update(p.pred_ids, p.pred_segments, p.gt_ids, p.gt_segments)
    before = acc.stat.state.copy()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        acc.all_reduce()
    finally:
        dist.destroy_process_group()
    assert np.array_equal(acc.stat.state, before)
