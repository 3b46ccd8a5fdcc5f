"""`maxdeeplab bench train`'s race (also the Ray section of `bench gpu`): tiny model, one worker."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from maxdeeplab.cli.bench import train


@pytest.mark.ray
def test_race_reports_ray_against_the_faster_plain_loop(ray_session, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = "--variant max_deeplab_tiny --crop 65 --batch 1 --steps 2 --warmup 1 --threads 1"
    args = parser.parse_args([*argv.split(), "--synthetic-train", "4", "--work-dir", str(tmp_path)])
    result = train.race(args)
    plain = max(result["plain_before_steps_per_s"], result["plain_after_steps_per_s"])
    assert result["ray_steps_per_s"] > 0 and plain > 0
    assert result["ratio"] == pytest.approx(result["ray_steps_per_s"] / plain)
