"""The synthetic generator: valid, deterministic COCO panoptic data exercising COCO's cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from maxdeeplab.cli.main import main
from maxdeeplab.platform.data.check import check_split
from maxdeeplab.platform.data.coco import CocoPanoptic
from maxdeeplab.platform.data.synthetic import (
    ensure_synthetic,
    generate_synthetic,
    synthetic_cache_name,
)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_output_passes_check(synthetic_root: Path) -> None:
    assert check_split(synthetic_root, "train2017") == []
    assert check_split(synthetic_root, "val2017") == []


def test_cli_generates_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    assert (
        main(
            [
                "data",
                "synthetic",
                str(out),
                "--train",
                "3",
                "--val",
                "2",
                "--size",
                "40",
                "50",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert main(["data", "check", str(out), "--split", "train2017"]) == 0
    assert "3 images, no problems" in capsys.readouterr().out
    split = CocoPanoptic(out, "val2017")
    assert len(split) == 2 and split.load_image(0).shape == (40, 50, 3)


def test_deterministic_under_seed(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", num_train=3, num_val=1, height=48, width=64, seed=5)
    b = generate_synthetic(tmp_path / "b", num_train=3, num_val=1, height=48, width=64, seed=5)
    c = generate_synthetic(tmp_path / "c", num_train=3, num_val=1, height=48, width=64, seed=6)
    assert tree_bytes(a) == tree_bytes(b)
    assert tree_bytes(a) != tree_bytes(c)
    # An image does not depend on how many others are generated.
    d = generate_synthetic(tmp_path / "d", num_train=1, num_val=0, height=48, width=64, seed=5)
    name = "annotations/panoptic_train2017/000001000000.png"
    assert (d / name).read_bytes() == (a / name).read_bytes()


def test_readable_by_pycocotools_and_panopticapi_readers(synthetic_root: Path) -> None:
    with open(synthetic_root / "annotations" / "panoptic_train2017.json") as f:
        data = json.load(f)
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        png = np.array(
            Image.open(synthetic_root / "annotations/panoptic_train2017" / ann["file_name"])
        )
        ids = rgb2id(png)
        assert ids.shape == (image["height"], image["width"])
        jpg = Image.open(synthetic_root / "train2017" / image["file_name"])
        assert jpg.size == (image["width"], image["height"])
        for seg in ann["segments_info"]:
            rle = mask_utils.encode(np.asfortranarray((ids == seg["id"]).astype(np.uint8)))
            assert int(mask_utils.area(rle)) == seg["area"]
            assert mask_utils.toBbox(rle).tolist() == seg["bbox"]


def test_panopticapi_scores_ground_truth_against_itself(synthetic_root: Path) -> None:
    json_path = synthetic_root / "annotations" / "panoptic_val2017.json"
    png_dir = synthetic_root / "annotations" / "panoptic_val2017"
    result = pq_compute(str(json_path), str(json_path), str(png_dir), str(png_dir))
    assert result["All"]["pq"] == pytest.approx(1.0)
    assert result["All"]["n"] >= 5


def test_exercises_what_coco_exercises(tmp_path: Path) -> None:
    root = generate_synthetic(
        tmp_path / "s", num_train=40, num_val=0, height=161, width=161, seed=0
    )
    split = CocoPanoptic(root, "train2017")
    info = split.info
    assert info.num_thing_classes >= 4 and info.num_classes - info.num_thing_classes >= 3
    stats = {"crowd": 0, "tiny": 0, "large": 0, "void_images": 0, "touching": 0, "multi": 0}
    stuff_seen: set[int] = set()
    for index, record in enumerate(split.records):
        ids = split.load_panoptic(index)
        stats["void_images"] += bool((ids == 0).any())
        things = [s for s in record.segments if info.isthing(info.to_contiguous(s.category_id))]
        stuff_seen |= {s.category_id for s in record.segments if s not in things}
        stats["crowd"] += sum(s.iscrowd for s in record.segments)
        stats["tiny"] += sum(s.area < 32 for s in things)
        stats["large"] += sum(s.area > 0.05 * ids.size for s in things)
        per_class: dict[int, list[int]] = {}
        for s in things:
            if not s.iscrowd:
                per_class.setdefault(s.category_id, []).append(s.id)
        stats["multi"] += any(len(v) > 1 for v in per_class.values())
        for seg_ids in per_class.values():
            for a in seg_ids:
                grown = ndimage.binary_dilation(ids == a)
                stats["touching"] += any((grown & (ids == b)).any() for b in seg_ids if b != a)
    assert len(stuff_seen) >= 3
    for key, value in stats.items():
        assert value >= 3, (key, stats)


def test_ensure_synthetic_generates_once(tmp_path: Path) -> None:
    kwargs = dict(num_train=2, num_val=1, height=33, width=33, seed=0)
    root = ensure_synthetic(tmp_path, **kwargs)
    assert root.name == synthetic_cache_name(2, 1, 33, 33, 0)
    stamp = (root / "annotations" / "panoptic_train2017.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, **kwargs) == root
    assert (root / "annotations" / "panoptic_train2017.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left


def test_cli_rejects_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synthetic", str(tmp_path / "x"), "--size", "8", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --size must be at least 16 16") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_non_empty_folder_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    (out / "train2017").mkdir(parents=True)
    (out / "train2017" / "old.jpg").write_bytes(b"")
    (out / "notes.txt").write_text("mine")
    args = ["data", "synthetic", str(out), "--train", "1", "--val", "1", "--size", "16", "16"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: folder is not empty" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "train2017" / "old.jpg").exists()  # the generator's folders are replaced
    assert (out / "notes.txt").read_text() == "mine"  # anything else stays
    assert len(CocoPanoptic(out, "train2017")) == 1
