"""Trial names: what a sweep's trial is called on the console, in the table, in MLflow and plots."""

from __future__ import annotations

from pathlib import Path

from maxdeeplab.platform.sweep_config import Sweep, load_sweep, trial_name

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
BASE = EXPERIMENTS / "quickstart" / "train.yaml"


def names(sweep: Sweep, points: list[dict]) -> list[str]:
    return [trial_name(sweep, point, f"a1b2c_{i:05d}") for i, point in enumerate(points)]


def write_sweep(tmp_path: Path, search: str, tune: str = "{}") -> Sweep:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: study\nbase: {BASE}\nsearch:\n{search}\ntune: {tune}\n")
    return load_sweep(path)


def test_a_trial_is_named_by_its_searched_keys_and_values():
    sweep = load_sweep(EXPERIMENTS / "sweeps" / "drop_path_study.yaml")
    assert names(sweep, sweep.grid_points())[:2] == [
        "drop_path_schedule=linear, drop_path_keep_prob=0.7",
        "drop_path_schedule=linear, drop_path_keep_prob=0.8",
    ]


def test_a_bundle_is_named_by_its_first_value_and_floats_are_short(tmp_path):
    sweep = load_sweep(EXPERIMENTS / "sweeps" / "model_zoo_grid.yaml")
    assert names(sweep, sweep.grid_points())[0] == "resolution=641, steps=100000"
    sweep = write_sweep(tmp_path, "  optim.lr: {grid: [0.0012345678, 10.0]}")
    assert names(sweep, sweep.grid_points()) == ["lr=0.001235", "lr=10"]


def test_keys_that_end_alike_keep_their_full_names(tmp_path):
    sweep = write_sweep(tmp_path, "  train.batch_size: {grid: [8]}\n  eval.batch_size: {grid: [2]}")
    assert names(sweep, sweep.grid_points()) == ["train.batch_size=8, eval.batch_size=2"]


def test_points_that_can_coincide_get_the_trial_index(tmp_path):
    repeated = write_sweep(tmp_path, "  optim.lr: {grid: [1.0e-3]}", "{num_samples: 2}")
    point = repeated.grid_points()[0]
    assert names(repeated, [point, point]) == ["lr=0.001 #0", "lr=0.001 #1"]
    alike = write_sweep(tmp_path, "  optim.lr: {grid: [1.00001e-3, 1.00002e-3]}")
    assert names(alike, alike.grid_points()) == ["lr=0.001 #0", "lr=0.001 #1"]
