"""`maxdeeplab predict`: files written per image, readable by the PQ evaluator, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from maxdeeplab.cli.main import main
from maxdeeplab.models.network import build_model
from maxdeeplab.platform.config import load_experiment, to_yaml
from maxdeeplab.platform.data.coco import CocoPanoptic
from maxdeeplab.platform.data.image_io import read_image
from maxdeeplab.platform.data.panoptic_format import read_panoptic_png
from maxdeeplab.platform.errors import DataError
from maxdeeplab.platform.predict import predict_files
from maxdeeplab.platform.training.checkpoint import MODEL_FILE
from maxdeeplab.platform.training.launch import prepare_experiment
from maxdeeplab.platform.visualize import GAP, MIN_PANEL_SIDE, upscale_factor


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as training leaves it: config.yaml and checkpoint_*/model.pt."""
    work = tmp_path_factory.mktemp("work")
    cfg = prepare_experiment(
        load_experiment(
            None,
            [
                "model.variant=max_deeplab_tiny",
                "data.crop_size=65",
                "data.synthetic_train=2",
                "data.synthetic_val=2",
                "data.synthetic_size=[97,129]",
                f"work_dir={work}",
                "postprocess.class_threshold=0.0",  # untrained weights: keep every slot
                "postprocess.pixel_threshold=0.0",
                "postprocess.thing_area_limit=0",
                "postprocess.stuff_area_limit=0",
            ],
        )
    )
    run = work / "ray" / "run"
    (run / "checkpoint_000000001").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    torch.save(build_model(cfg.model).state_dict(), run / "checkpoint_000000001" / MODEL_FILE)
    return run


def test_predict_writes_png_overlay_and_coco_json(run_dir, tmp_path, capsys):
    images = sorted((run_dir.parents[1] / "data").rglob("val2017/*.jpg"))
    assert len(images) == 2
    out = tmp_path / "out"
    code = main(
        ["predict", str(run_dir / "checkpoint_000000001"), *map(str, images), "--out", str(out)]
    )
    assert code == 0
    result = json.loads((out / "predictions.json").read_text())
    categories = {c["id"] for c in result["categories"]}
    assert [a["file_name"] for a in result["annotations"]] == [f"{p.stem}.png" for p in images]
    for image, annotation in zip(images, result["annotations"], strict=True):
        ids = read_panoptic_png(out / annotation["file_name"])
        assert ids.shape == (97, 129)  # back at the raw image size
        segments = {s["id"]: s for s in annotation["segments_info"]}
        assert segments, "with zero thresholds some segment must survive"
        assert set(np.unique(ids)) - {0} == set(segments)
        for segment_id, segment in segments.items():
            assert segment["category_id"] in categories
            assert segment["area"] == int((ids == segment_id).sum())
        assert (out / f"{image.stem}_overlay.png").is_file()


def test_evaluate_model_prints_pq_and_writes_panopticapi_json(run_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    ckpt = str(run_dir / "checkpoint_000000001")
    assert main(["evaluate-model", ckpt, "--out", str(out), "--per-class"]) == 0
    printed = capsys.readouterr().out
    assert "Things" in printed and "Stuff" in printed and "pipeline PQ" in printed
    results = json.loads(out.read_text())
    for group in ("All", "Things", "Stuff"):
        assert 0.0 <= results[group]["pq"] <= 1.0
    assert results["All"]["n"] == results["Things"]["n"] + results["Stuff"]["n"] > 0


def test_predict_bad_input_is_one_line(run_dir, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert (
        main(
            ["predict", str(run_dir / "checkpoint_000000001"), str(missing), "--out", str(tmp_path)]
        )
        == 2
    )
    assert f"{missing}: image not found" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "ckpt"), str(missing), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _val_root(run_dir: Path) -> Path:
    """The synthetic set `prepare_experiment` generated for the run (its val2017 split)."""
    (json_path,) = (run_dir.parents[1] / "data").rglob("annotations/panoptic_val2017.json")
    return json_path.parents[1]


def test_predict_then_evaluate_gives_the_in_memory_pq(run_dir, tmp_path, capsys):
    """`predict --data-root` writes the dataset's image ids and categories, so `evaluate` scores
    every image: the same PQ as `evaluate-model` computes without files."""
    root, ckpt, out = _val_root(run_dir), str(run_dir / "checkpoint_000000001"), tmp_path / "p"
    assert main(["predict", ckpt, "--data-root", str(root), "--out", str(out)]) == 0
    gt = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    pred = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in pred["annotations"]] == [i["id"] for i in gt["images"]]
    assert pred["categories"] == gt["categories"]
    files = [
        "evaluate", "--gt-json", str(root / "annotations" / "panoptic_val2017.json"),
        "--gt-dir", str(root / "annotations" / "panoptic_val2017"),
        "--pred-json", str(out / "predictions.json"), "--pred-dir", str(out),
        "--engine", "numpy", "--no-progress", "--out", str(tmp_path / "files.json"),
    ]  # fmt: skip
    assert main(files) == 0
    assert main(["evaluate-model", ckpt, "--out", str(tmp_path / "memory.json")]) == 0
    from_files = json.loads((tmp_path / "files.json").read_text())
    in_memory = json.loads((tmp_path / "memory.json").read_text())
    assert from_files["meta"]["missing_predictions"] == 0
    for group in ("All", "Things", "Stuff"):
        assert from_files[group]["n"] == in_memory[group]["n"] > 0
        assert from_files[group]["pq"] == pytest.approx(in_memory[group]["pq"], abs=1e-9)


def test_predict_skips_a_corrupt_image_and_writes_the_others(run_dir, tmp_path, capsys):
    root = _val_root(run_dir)
    good, bad = sorted((root / "val2017").glob("*.jpg"))
    corrupt = tmp_path / bad.name
    corrupt.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    gt_json = root / "annotations" / "panoptic_val2017.json"
    out = tmp_path / "out"
    ckpt = str(run_dir / "checkpoint_000000001")
    args = ["predict", ckpt, str(good), str(corrupt), "--gt-json", str(gt_json), "--out", str(out)]
    assert main([*args, "--alpha", "0"]) == 0
    captured = capsys.readouterr()
    assert f"skipped {corrupt}: unreadable or corrupt image" in captured.err
    assert "1 predictions" in captured.out
    pred = json.loads((out / "predictions.json").read_text())
    ids = {i["file_name"]: i["id"] for i in json.loads(gt_json.read_text())["images"]}
    assert [a["image_id"] for a in pred["annotations"]] == [ids[good.name]]
    assert not (out / f"{corrupt.stem}.png").exists()
    # --alpha 0: the prediction panel of the overlay is the image itself, as is the input panel
    overlay = read_image(out / f"{good.stem}_overlay.png")
    raw = read_image(good)
    H, W = raw.shape[:2]
    k = upscale_factor(H, W)
    assert overlay.shape[0] == k * H >= MIN_PANEL_SIDE
    assert np.array_equal(overlay[::k, : k * W : k], raw)
    assert np.array_equal(overlay[::k, k * W + GAP : 2 * k * W + GAP : k], raw)


def test_predict_with_no_readable_image_is_one_error(run_dir, tmp_path):
    info = CocoPanoptic(_val_root(run_dir), "val2017").info
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"not a jpeg")
    predictor = SimpleNamespace(info=info)  # never called: no image is readable
    with pytest.raises(DataError, match=r"no image could be read: .*broken.jpg: unreadable"):
        predict_files(predictor, [corrupt, tmp_path / "gone.jpg"], tmp_path / "out")
