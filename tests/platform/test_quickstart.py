"""The main job end to end: `maxdeeplab quickstart` trains, sweeps, tracks, plots, and learns.

The floor is far below what the quickstart reaches (best PQ 44-47 on the synthetic val split
measured on 2 cores) and far above what a broken loss or post-processing gives (PQ ~0).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maxdeeplab.cli.main import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PQ_FLOOR = 30.0


def test_quickstart_learns_and_writes_table_plots_and_runs(
    ray_session, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the quickstart's work dir is ./runs
    assert main(["quickstart"]) == 0
    out = capsys.readouterr().out
    best = next(line for line in out.splitlines() if line.startswith("best trial"))
    pq = float(best.rsplit("PQ", 1)[1])
    assert pq >= PQ_FLOOR, f"the quickstart stopped learning: {best}"
    assert "sweep quickstart: 2 trials" in out
    plots = list((tmp_path / "runs" / "sweeps" / "quickstart" / "plots").glob("*.png"))
    assert plots, "no sweep plots written"
    assert (Path("runs") / "mlflow.db").is_file()
