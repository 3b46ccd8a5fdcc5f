"""Crop targets: contiguous semantic, first-occurrence thing ids, crowd -> void, >128 rule."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from maxdeeplab.models.structures import PanopticTargets
from maxdeeplab.models.targets import build_mask_targets
from maxdeeplab.platform.data.coco import DatasetInfo, Segment, segment_index_map
from maxdeeplab.platform.data.targets import build_crop_targets

INFO = DatasetInfo.from_json_categories(
    [
        {"id": 50, "name": "sky", "isthing": 0},
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 9, "name": "car", "isthing": 1},
        {"id": 60, "name": "road", "isthing": 0},
    ]
)  # contiguous: person 1, car 2, sky 3, road 4


def seg(seg_id: int, category_id: int, iscrowd: bool = False) -> Segment:
    return Segment(id=seg_id, category_id=category_id, area=0, bbox=(0, 0, 0, 0), iscrowd=iscrowd)


def test_semantic_thing_ids_and_classes() -> None:
    segments = [
        seg(100, 50),  # sky
        seg(200, 1),  # person A
        seg(300, 9),  # car
        seg(400, 1, iscrowd=True),  # crowd of persons
        seg(500, 1),  # person B, first seen before the car
        seg(600, 9),  # a car that vanished in the crop
    ]
    ids = np.array(
        [
            [100, 100, 500, 500],
            [300, 300, 500, 0],
            [200, 400, 400, 777],  # 777 is in no segment -> void
        ]
    )
    t = build_crop_targets(segment_index_map(ids, segments), segments, INFO)
    assert t.semantic.tolist() == [[3, 3, 1, 1], [2, 2, 1, 0], [1, 0, 0, 0]]
    # Numbered by first occurrence in the flattened crop: person B (0), car (1), person A (2).
    assert t.thing_ids.tolist() == [[-1, -1, 0, 0], [1, 1, 0, -1], [2, -1, -1, -1]]
    assert t.thing_classes.shape == (128,)
    assert t.thing_classes[:4].tolist() == [1, 2, 1, -1] and (t.thing_classes[3:] == -1).all()
    assert (t.pixel_weights == 1.0).all() and t.num_dropped_instances == 0


def test_more_than_max_thing_id_instances_become_void(caplog: pytest.LogCaptureFixture) -> None:
    n = 130
    segments = [seg(1000 + i, 9) for i in range(n)] + [seg(5, 60)]
    ids = np.full((2, n), 5)
    ids[0] = 1000 + np.arange(n)  # one pixel per instance, in id order
    with caplog.at_level(logging.WARNING):
        t = build_crop_targets(segment_index_map(ids, segments), segments, INFO, image_id=42)
    assert t.num_dropped_instances == 2 and "image 42" in caplog.text
    assert t.thing_ids[0, :128].tolist() == list(range(128))
    assert t.thing_ids[0, 128:].tolist() == [-1, -1] and t.semantic[0, 128:].tolist() == [0, 0]
    assert (t.semantic[1] == 4).all() and (t.thing_classes == 2).all()


def test_small_instance_weight() -> None:
    segments = [seg(1, 1), seg(2, 9), seg(3, 50)]
    ids = np.full((10, 10), 3)
    ids[:2, :2] = 1  # 4 px: small
    ids[5:, 5:] = 2  # 25 px: large
    labels = segment_index_map(ids, segments)
    t = build_crop_targets(
        labels, segments, INFO, small_instance_weight=3.0, small_instance_area=10
    )
    expected = np.ones((10, 10), np.float32)
    expected[:2, :2] = 3.0
    np.testing.assert_array_equal(t.pixel_weights, expected)


def test_targets_feed_the_loss_side() -> None:
    segments = [seg(1, 1), seg(2, 9), seg(3, 50), seg(4, 60)]
    ids = np.full((17, 17), 3)
    ids[9:, :] = 4
    ids[2:9, 2:9] = 1
    ids[10:16, 8:16] = 2
    t = build_crop_targets(segment_index_map(ids, segments), segments, INFO)
    targets = PanopticTargets(
        semantic=torch.from_numpy(t.semantic)[None],
        thing_ids=torch.from_numpy(t.thing_ids)[None],
        thing_classes=torch.from_numpy(t.thing_classes)[None],
        pixel_weights=torch.from_numpy(t.pixel_weights)[None],
    )
    masks = build_mask_targets(
        targets, height=5, width=5, num_classes=4, num_thing_classes=2, max_thing_id=128
    )
    # two thing instances + two stuff regions, all non-void at stride 4
    assert int(masks.mask_valid.sum()) == 4
    assert sorted(masks.mask_classes[0][masks.mask_valid[0]].tolist()) == [0, 1, 2, 3]
