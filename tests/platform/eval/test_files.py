"""File evaluation: equal to panopticapi on generated sets, and clear errors on bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from maxdeeplab.cli.bench.synthetic_pairs import NEVER_USED, write_pair_set
from maxdeeplab.cli.main import main
from maxdeeplab.platform.data.panoptic_format import read_panoptic_png, write_panoptic_png
from maxdeeplab.platform.errors import DataError, EvaluationError
from maxdeeplab.platform.eval.accumulator import PQAccumulator
from maxdeeplab.platform.eval.files import evaluate_files

TOLERANCE = 1e-9
evaluation = pytest.importorskip("panopticapi.evaluation")


def _official(gt_json, gt_dir, pred_json, pred_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluation.pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))


def _assert_same(ours: dict, reference: dict) -> None:
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == reference[group]["n"], group
        for key in ("pq", "sq", "rq"):
            assert abs(ours[group][key] - reference[group][key]) <= TOLERANCE, (group, key)
    assert set(ours["per_class"]) == set(reference["per_class"])
    for cat, ref in reference["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cat][key] - ref[key]) <= TOLERANCE, (cat, key)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _dump(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def pair_set(tmp_path_factory):
    return write_pair_set(
        tmp_path_factory.mktemp("pq_set"),
        num_images=30,
        height=120,
        width=160,
        num_segments=14,
        seed=11,
    )


def _args(s):
    return (s.gt_json, s.gt_dir, s.pred_json, s.pred_dir)


def test_generated_set_covers_the_hard_cases(pair_set):
    gt, pred = _load(pair_set.gt_json), _load(pair_set.pred_json)
    assert any(seg["iscrowd"] for ann in gt["annotations"] for seg in ann["segments_info"])
    assert any(not ann["segments_info"] for ann in pred["annotations"])  # images with no prediction
    used = {seg["category_id"] for ann in gt["annotations"] for seg in ann["segments_info"]}
    assert not used & set(NEVER_USED)  # empty categories
    void_images = sum(
        (read_panoptic_png(pair_set.gt_dir / a["file_name"]) == 0).any() for a in gt["annotations"]
    )
    assert void_images == len(gt["annotations"])
    # Some predicted segment has IoU exactly 0.5 with a GT segment of its category.
    found_half = False
    for g, p in zip(gt["annotations"], pred["annotations"], strict=True):
        gt_map = read_panoptic_png(pair_set.gt_dir / g["file_name"])
        pred_map = read_panoptic_png(pair_set.pred_dir / p["file_name"])
        for seg in g["segments_info"]:
            inside = pred_map[gt_map == seg["id"]]
            ids, counts = np.unique(inside, return_counts=True)
            for pid, count in zip(ids, counts, strict=True):
                if pid and 2 * count == seg["area"] and (pred_map == pid).sum() == count:
                    found_half = True
    assert found_half


@pytest.mark.parametrize(("engine", "workers"), [("numpy", 1), ("numpy", 2), ("hotcoco", 1)])
def test_file_evaluation_equals_panopticapi(pair_set, engine, workers):
    if engine == "hotcoco":
        pytest.importorskip("hotcoco")
    reference = _official(*_args(pair_set)[:2], *_args(pair_set)[2:])
    ours = evaluate_files(*_args(pair_set), workers=workers, progress=False, engine=engine)
    assert ours.engine == engine
    _assert_same(ours.result.to_panopticapi(), reference)


def test_accumulator_equals_panopticapi(pair_set):
    reference = _official(*_args(pair_set))
    gt, pred = _load(pair_set.gt_json), _load(pair_set.pred_json)
    acc = PQAccumulator(gt["categories"])
    for g, p in zip(gt["annotations"], pred["annotations"], strict=True):
        acc.update(
            read_panoptic_png(pair_set.pred_dir / p["file_name"]),
            p["segments_info"],
            read_panoptic_png(pair_set.gt_dir / g["file_name"]),
            g["segments_info"],
        )
    _assert_same(acc.compute().to_panopticapi(), reference)


def test_crowd_as_void_equals_panopticapi_on_crowd_turned_void(pair_set, tmp_path):
    # deeplab2's pipeline PQ = the official PQ on GT whose crowd pixels were made void
    # (docs/deeplab2.md#pipeline-pq).
    gt = _load(pair_set.gt_json)
    void_dir = tmp_path / "gt_void"
    void_dir.mkdir()
    for ann in gt["annotations"]:
        ids = read_panoptic_png(pair_set.gt_dir / ann["file_name"])
        for seg in ann["segments_info"]:
            if seg["iscrowd"]:
                ids[ids == seg["id"]] = 0
        write_panoptic_png(void_dir / ann["file_name"], ids)
        ann["segments_info"] = [s for s in ann["segments_info"] if not s["iscrowd"]]
    void_json = _dump(tmp_path / "gt_void.json", gt)
    reference = _official(void_json, void_dir, pair_set.pred_json, pair_set.pred_dir)
    ours = evaluate_files(*_args(pair_set), crowd_as_void=True, progress=False, engine="auto")
    assert ours.engine == "numpy"
    _assert_same(ours.result.to_panopticapi(), reference)
    official = evaluate_files(*_args(pair_set), progress=False, engine="numpy").result
    assert ours.result.pq != official.pq  # the set has crowd that matters


@pytest.mark.parametrize("engine", ["numpy", "auto"])
def test_missing_prediction_counts_as_all_false_negatives(pair_set, tmp_path, caplog, engine):
    pred = _load(pair_set.pred_json)
    dropped = pred["annotations"].pop(5)
    pred_json = _dump(tmp_path / "pred.json", pred)
    ours = evaluate_files(
        pair_set.gt_json,
        pair_set.gt_dir,
        pred_json,
        pair_set.pred_dir,
        progress=False,
        engine=engine,
    )
    assert ours.missing_predictions == [dropped["image_id"]]
    assert "1 ground-truth images have no prediction" in caplog.text
    # Same as panopticapi given an empty prediction for that image.
    pred["annotations"].insert(5, {**dropped, "segments_info": []})
    empty_dir = tmp_path / "pred_png"
    shutil.copytree(pair_set.pred_dir, empty_dir)
    write_panoptic_png(
        empty_dir / dropped["file_name"],
        read_panoptic_png(pair_set.pred_dir / dropped["file_name"]) * 0,
    )
    reference = _official(
        pair_set.gt_json, pair_set.gt_dir, _dump(tmp_path / "pred_empty.json", pred), empty_dir
    )
    _assert_same(ours.result.to_panopticapi(), reference)


@pytest.fixture
def broken(pair_set, tmp_path):
    """A writable copy of the set: (paths dict, gt json, pred json) to corrupt in a test."""
    root = tmp_path / "set"
    shutil.copytree(pair_set.gt_dir, root / "gt")
    shutil.copytree(pair_set.pred_dir, root / "pred")
    paths = {
        "gt_json": root / "gt.json",
        "gt_dir": root / "gt",
        "pred_json": root / "pred.json",
        "pred_dir": root / "pred",
    }
    return paths, _load(pair_set.gt_json), _load(pair_set.pred_json)


def _evaluate(paths, gt, pred, engine="numpy"):
    _dump(paths["gt_json"], gt)
    _dump(paths["pred_json"], pred)
    return evaluate_files(
        paths["gt_json"],
        paths["gt_dir"],
        paths["pred_json"],
        paths["pred_dir"],
        progress=False,
        engine=engine,
    )


@pytest.mark.parametrize("engine", ["numpy", "hotcoco"])
def test_missing_png_names_image_and_file(broken, engine):
    if engine == "hotcoco":
        pytest.importorskip("hotcoco")
    paths, gt, pred = broken
    (paths["pred_dir"] / pred["annotations"][2]["file_name"]).unlink()
    with pytest.raises(DataError, match=r"\b2\b.*\.png|\.png.*"):
        _evaluate(paths, gt, pred, engine)


@pytest.mark.parametrize("engine", ["numpy", "hotcoco"])
def test_predicted_segment_missing_from_png(broken, engine):
    if engine == "hotcoco":
        pytest.importorskip("hotcoco")
    paths, gt, pred = broken
    pred["annotations"][1]["segments_info"].append({"id": 424242, "category_id": 1})
    with pytest.raises(EvaluationError, match="image 1: .*424242"):
        _evaluate(paths, gt, pred, engine)


@pytest.mark.parametrize("engine", ["numpy", "hotcoco"])
def test_png_segment_missing_from_prediction_json(broken, engine):
    if engine == "hotcoco":
        pytest.importorskip("hotcoco")
    paths, gt, pred = broken
    removed = pred["annotations"][1]["segments_info"].pop(0)
    with pytest.raises(EvaluationError, match=f"image 1: .*{removed['id']}"):
        _evaluate(paths, gt, pred, engine)


def test_gt_segment_missing_from_png_and_the_reverse(broken):
    paths, gt, pred = broken
    gt["annotations"][1]["segments_info"].append(
        {"id": 99, "category_id": 1, "iscrowd": 0, "area": 5}
    )
    with pytest.raises(
        EvaluationError, match="image 1: ground truth segment 99 is in segments_info but not"
    ):
        _evaluate(paths, gt, pred)
    gt["annotations"][1]["segments_info"].pop()
    removed = gt["annotations"][1]["segments_info"].pop(0)
    with pytest.raises(
        EvaluationError, match=f"image 1: ground truth segment {removed['id']} is in the PNG"
    ):
        _evaluate(paths, gt, pred)


@pytest.mark.parametrize("engine", ["numpy", "hotcoco"])
@pytest.mark.parametrize("which", ["gt", "pred"])
def test_unknown_category(broken, which, engine):
    if engine == "hotcoco":
        pytest.importorskip("hotcoco")
    paths, gt, pred = broken
    data = gt if which == "gt" else pred
    seg = data["annotations"][4]["segments_info"][0]
    seg["category_id"] = 777
    with pytest.raises(
        EvaluationError, match=f"image 4: segment {seg['id']} has unknown category_id 777"
    ):
        _evaluate(paths, gt, pred, engine)


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_duplicate_image_ids(broken, which):
    paths, gt, pred = broken
    data = gt if which == "gt" else pred
    data["annotations"].append(dict(data["annotations"][3]))
    with pytest.raises(EvaluationError, match="image id 3 has two annotations"):
        _evaluate(paths, gt, pred, "auto")


@pytest.mark.parametrize("engine", ["numpy", "hotcoco"])
def test_size_mismatch(broken, engine):
    if engine == "hotcoco":
        pytest.importorskip("hotcoco")
    paths, gt, pred = broken
    name = pred["annotations"][6]["file_name"]
    ids = read_panoptic_png(paths["pred_dir"] / name)
    write_panoptic_png(paths["pred_dir"] / name, ids[:, :-1])
    # numpy: "ground truth PNG is 160x120 but prediction PNG is 159x120"; hotcoco: "... 120×159"
    with pytest.raises(EvaluationError, match="image 6: ground truth .*159"):
        _evaluate(paths, gt, pred, engine)


def test_cli_prints_the_table_and_writes_panopticapi_json(pair_set, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = [
        "evaluate", "--gt-json", str(pair_set.gt_json), "--gt-dir", str(pair_set.gt_dir),
        "--pred-json", str(pair_set.pred_json), "--pred-dir", str(pair_set.pred_dir),
        "--per-class", "--no-progress", "--engine", "numpy", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    for row in ("All", "Things", "Stuff"):
        assert any(line.startswith(row) for line in printed.splitlines())
    per_class_rows = [ln.split() for ln in printed.splitlines() if ln[:5].strip().isdigit()]
    assert {int(row[0]) for row in per_class_rows} - set(NEVER_USED)  # --per-class
    results = json.loads(out.read_text())
    reference = _official(*_args(pair_set))
    reference["per_class"] = {str(k): v for k, v in reference["per_class"].items()}
    _assert_same(results, reference)


def test_cli_bad_input_is_one_line(pair_set, tmp_path, capsys):
    args = [
        "evaluate", "--gt-json", str(pair_set.gt_json), "--gt-dir", str(pair_set.gt_dir),
        "--pred-json", str(tmp_path / "none.json"), "--pred-dir", str(pair_set.pred_dir),
        "--no-progress",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.json" in err[0]


@pytest.mark.parametrize("engine", ["numpy", "hotcoco"])
def test_segment_id_listed_twice(broken, engine):
    if engine == "hotcoco":
        pytest.importorskip("hotcoco")
    paths, gt, pred = broken
    segments = pred["annotations"][7]["segments_info"]
    segments.append(dict(segments[0]))
    with pytest.raises(
        EvaluationError, match=f"image 7: segment id {segments[0]['id']} is listed twice"
    ):
        _evaluate(paths, gt, pred, engine)


@pytest.mark.parametrize("rename", [lambda i: f"{i:012d}", None], ids=["stems", "empty"])
def test_no_predicted_image_id_in_ground_truth_fails_in_one_line(broken, capsys, rename):
    """Predictions under other ids (file stems, say) used to give PQ 0.0 and exit 0."""
    paths, gt, pred = broken
    if rename is None:
        pred["annotations"] = []
    for ann in pred["annotations"]:
        ann["image_id"] = rename(ann["image_id"])
    _dump(paths["gt_json"], gt)
    _dump(paths["pred_json"], pred)
    args = [
        "evaluate", "--gt-json", str(paths["gt_json"]), "--gt-dir", str(paths["gt_dir"]),
        "--pred-json", str(paths["pred_json"]), "--pred-dir", str(paths["pred_dir"]),
        "--no-progress", "--engine", "numpy",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pred.json" in err[0]
    expected = "no predicted image id matches" if rename else "no prediction annotations"
    assert expected in err[0]
