"""The COCO panoptic reader: contiguous remap (things first), its inverse, crowd -> void."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maxdeeplab.platform.data.coco import (
    CocoPanoptic,
    DatasetInfo,
    Segment,
    semantic_from_ids,
)
from maxdeeplab.platform.errors import DataError

# Stuff interleaved with things and non-contiguous ids, as the remap must not rely on id order.
CATEGORIES = [
    {"id": 7, "name": "person", "isthing": 1},
    {"id": 92, "name": "sky", "isthing": 0},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 150, "name": "road", "isthing": 0},
    {"id": 40, "name": "dog", "isthing": 1},
]


def test_contiguous_remap_puts_things_first_in_json_order() -> None:
    info = DatasetInfo.from_json_categories(CATEGORIES)
    assert info.num_classes == 5 and info.num_thing_classes == 3
    assert info.contiguous_to_dataset == {1: 7, 2: 3, 3: 40, 4: 92, 5: 150}
    assert info.dataset_to_contiguous == {7: 1, 3: 2, 40: 3, 92: 4, 150: 5}
    assert info.thing_flags == [False, True, True, True, False, False]
    for contiguous, dataset_id in info.contiguous_to_dataset.items():
        assert info.to_dataset(info.to_contiguous(dataset_id)) == dataset_id
        assert info.to_contiguous(info.to_dataset(contiguous)) == contiguous
    assert info.contiguous_to_dataset_lut().tolist() == [0, 7, 3, 40, 92, 150]
    with pytest.raises(DataError, match="unknown category id 8"):
        info.to_contiguous(8)


def test_duplicate_category_id_is_an_error() -> None:
    with pytest.raises(DataError, match="duplicate category id 3"):
        DatasetInfo.from_json_categories(CATEGORIES + [{"id": 3, "name": "x", "isthing": 0}])


def test_crowd_and_unknown_ids_become_void() -> None:
    info = DatasetInfo.from_json_categories(CATEGORIES)
    segments = [
        Segment(id=11, category_id=7, area=2, bbox=(0, 0, 1, 1), iscrowd=False),
        Segment(id=12, category_id=7, area=2, bbox=(0, 0, 1, 1), iscrowd=True),
        Segment(id=300000, category_id=150, area=2, bbox=(0, 0, 1, 1), iscrowd=False),
    ]
    ids = np.array([[11, 12, 300000], [0, 99, 11]])
    semantic, index = semantic_from_ids(ids, segments, info)
    assert semantic.tolist() == [[1, 0, 5], [0, 0, 1]]
    assert index.tolist() == [[0, -1, 2], [-1, -1, 0]]


def test_reader_loads_synthetic_split(synthetic_root: Path) -> None:
    split = CocoPanoptic(synthetic_root, "train2017")
    assert len(split) == 12
    record = split[0]
    image, ids = split.load_image(0), split.load_panoptic(0)
    assert image.shape == (record.height, record.width, 3) and image.dtype == np.uint8
    assert ids.shape == (record.height, record.width)
    assert {s.id for s in record.segments} == set(np.unique(ids).tolist()) - {0}
    # Stuff is interleaved with things in the synthetic JSON; contiguous order is things first.
    assert all(split.info.isthing(i) for i in range(1, split.info.num_thing_classes + 1))
    assert not any(c.isthing for c in split.info.categories[split.info.num_thing_classes :])


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset root not found"):
        CocoPanoptic(tmp_path / "nowhere", "train2017")
    with pytest.raises(DataError, match="panoptic_nosplit.json: JSON file not found"):
        CocoPanoptic(tmp_path, "nosplit")
