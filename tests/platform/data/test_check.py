"""`maxdeeplab data check` lists every problem of a damaged dataset, naming file and segment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maxdeeplab.cli.main import main
from maxdeeplab.platform.data.check import check_split
from maxdeeplab.platform.data.coco import CocoPanoptic
from maxdeeplab.platform.data.panoptic_format import read_panoptic_png, write_panoptic_png
from maxdeeplab.platform.errors import DataError

SPLIT = "val2017"


def json_path(root: Path) -> Path:
    return root / "annotations" / f"panoptic_{SPLIT}.json"


def edit_json(root: Path, edit) -> None:  # noqa: ANN001
    path = json_path(root)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def first(root: Path) -> tuple[dict, dict, Path, Path]:
    """(image entry, annotation, image path, PNG path) of the split's first image."""
    data = json.loads(json_path(root).read_text())
    image, ann = data["images"][0], data["annotations"][0]
    return (
        image,
        ann,
        root / SPLIT / image["file_name"],
        root / "annotations" / f"panoptic_{SPLIT}" / ann["file_name"],
    )


def test_valid_dataset_has_no_problems(broken_copy: Path) -> None:
    assert check_split(broken_copy, SPLIT) == []


def test_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match="dataset root not found"):
        check_split(tmp_path / "missing", SPLIT)
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing" in err


def test_missing_json(broken_copy: Path) -> None:
    json_path(broken_copy).unlink()
    (problem,) = check_split(broken_copy, SPLIT)
    assert "panoptic_val2017.json: JSON file not found" in problem


def test_json_segment_absent_from_png_and_vice_versa(broken_copy: Path) -> None:
    _, ann, _, png = first(broken_copy)
    ids = read_panoptic_png(png)
    victim = ann["segments_info"][0]["id"]
    ids[ids == victim] = 777  # the JSON's segment vanishes; an unlisted id appears
    write_panoptic_png(png, ids)
    problems = check_split(broken_copy, SPLIT)
    assert any(
        f"JSON segment {victim} is absent from the PNG" in p and png.name in p for p in problems
    )
    assert any("PNG segment 777" in p and "not in the JSON" in p for p in problems)
    assert len(problems) == 2


def test_unknown_category_and_area_mismatch_and_duplicates(broken_copy: Path) -> None:
    def edit(data: dict) -> None:
        segments = data["annotations"][0]["segments_info"]
        segments[0]["category_id"] = 999
        segments[1]["area"] += 5
        data["annotations"][1]["segments_info"].append(
            dict(data["annotations"][1]["segments_info"][0])
        )
        data["images"].append(dict(data["images"][2]))

    edit_json(broken_copy, edit)
    problems = check_split(broken_copy, SPLIT)
    assert any("unknown category id 999" in p for p in problems)
    assert any("area" in p and "in the JSON but" in p for p in problems)
    assert any("listed 2 times" in p for p in problems)
    assert any("duplicate image id" in p for p in problems)
    assert len(problems) == 4
    with pytest.raises(DataError, match="unknown category id 999"):
        CocoPanoptic(broken_copy, SPLIT)


@pytest.mark.parametrize("which", ["image", "png"])
def test_corrupt_files_are_named(broken_copy: Path, which: str) -> None:
    _, _, image_path, png = first(broken_copy)
    target = image_path if which == "image" else png
    target.write_bytes(target.read_bytes()[:200])  # truncated
    problems = check_split(broken_copy, SPLIT)
    assert len(problems) == 1 and str(target) in problems[0] and "corrupt" in problems[0]
    split = CocoPanoptic(broken_copy, SPLIT)
    with pytest.raises(DataError, match=target.name):
        split.load_image(0) if which == "image" else split.load_panoptic(0)


def test_missing_files_and_size_mismatch(broken_copy: Path) -> None:
    image, _, image_path, png = first(broken_copy)
    png.unlink()
    second = broken_copy / SPLIT / sorted(p.name for p in (broken_copy / SPLIT).iterdir())[1]
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(second)
    problems = check_split(broken_copy, SPLIT)
    assert any(str(png) in p and "not found" in p for p in problems)
    assert any(str(second) in p and "size 10x12 differs" in p for p in problems)
    assert any(
        second.name.replace(".jpg", ".png") in p and "differs from its image" in p for p in problems
    )


def test_every_problem_is_listed_by_the_cli(
    broken_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, image_path, png = first(broken_copy)
    image_path.unlink()
    edit_json(broken_copy, lambda d: d["annotations"][1]["segments_info"][0].update(area=-3))
    assert main(["data", "check", str(broken_copy), "--split", SPLIT, "--workers", "2"]) == 1
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 and "2 problem(s)" in out.err
