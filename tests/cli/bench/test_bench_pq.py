"""`maxdeeplab bench pq` on a tiny set: it runs every evaluator and they all agree."""

from __future__ import annotations

import argparse

import pytest

from maxdeeplab.cli.bench import pq as bench_pq


@pytest.mark.slow
def test_bench_pq_runs_and_everything_agrees(tmp_path, capsys):
    pytest.importorskip("panopticapi")
    pytest.importorskip("hotcoco")
    parser = argparse.ArgumentParser()
    bench_pq.add_arguments(parser)
    args = parser.parse_args(
        ["--images", "6", "--size", "96", "64", "--segments", "8", "--workers", "1",
         "--keep", str(tmp_path)]
    )  # fmt: skip
    assert bench_pq.run(args) == 0
    out = capsys.readouterr().out
    for method in bench_pq.LABELS.values():
        assert method in out
    assert "in-memory accumulator" in out
    assert "all agree with panopticapi within 1e-09: yes" in out
