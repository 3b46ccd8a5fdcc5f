"""`maxdeeplab predict`: files written per image, readable by the PQ evaluator, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maxdeeplab.cli.main import main
from maxdeeplab.models.network import build_model
from maxdeeplab.platform.config import load_experiment, to_yaml
from maxdeeplab.platform.data.panoptic_format import read_panoptic_png
from maxdeeplab.platform.training.checkpoint import MODEL_FILE
from maxdeeplab.platform.training.launch import prepare_experiment


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
