"""`maxdeeplab bench data` runs end to end (tiny model, tiny crop) and reports its ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maxdeeplab.cli.main import main


def test_bench_data_reports_loader_model_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = "bench data --crop 65 --workers 0 --images 3 --steps 1 --variant max_deeplab_tiny"
    argv += f" --synthetic-train 4 --synthetic-val 1 --work-dir {tmp_path} --json {out}"
    assert main(argv.split()) == 0
    row = json.loads(out.read_text())["crops"]["65"]
    assert row["images_per_s"] > 0 and row["model_images_per_s_one_thread"] > 0
    expected = row["images_per_s_per_worker"] / row["model_images_per_s_one_thread"]
    assert row["ratio_per_worker_to_model_core"] == pytest.approx(expected)
    assert "ratio" in capsys.readouterr().out
    assert main(["bench", "data", "--crop", "64"]) == 2  # not 16k + 1
