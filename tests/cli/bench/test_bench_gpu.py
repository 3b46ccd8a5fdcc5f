"""`maxdeeplab bench gpu --smoke`: the one-GPU check runs end to end on CPU with tiny settings.

Its Ray Train section is skipped here (`--skip-ray`); the same race is `bench train`'s, whose code
runs in the Ray tests of the training loop.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import pytest

from maxdeeplab.cli.main import main

SECTIONS = ("train", "channels_last", "pq", "compile")


def _numbers(tree: object) -> list[object]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _numbers(value)]
    return [tree]


def test_gpu_check_smoke_writes_every_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--smoke", "--skip-ray", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(SECTIONS) <= set(results) and "ray" not in results
    assert set(results["train"]) == {"batch_1", "batch_2", "ratio_to_goal"}
    for section in SECTIONS:
        leaves = _numbers(results[section])
        assert leaves and all(isinstance(v, numbers.Real) and v >= 0 for v in leaves), section
    assert results["train"]["batch_2"]["images_per_s"] > 0
    assert results["train"]["batch_2"]["peak_memory_mib"] > 0
    assert results["compile"]["compile_s"] > 0 and results["pq"]["device_ms_per_image"] > 0
    assert capsys.readouterr().out.splitlines()[-1].lstrip().startswith("ratio")
