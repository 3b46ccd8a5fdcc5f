"""Checkpoints are data that can be checked: finite when written, verified against a manifest when
read, never code (`weights_only`), and a resume falls back past a corrupt newest one."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from maxdeeplab.platform.errors import CheckpointError
from maxdeeplab.platform.storage import Location
from maxdeeplab.platform.training.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    TrainingState,
    checkpoint_dir_name,
    latest_good_checkpoint,
    load_checkpoint,
    next_generation,
    save_checkpoint,
    stored_checkpoints,
    verify_checkpoint,
)


def small_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def write_run(run_dir: Path, steps: list[int]) -> None:
    model, optimizer = small_model()
    for step in steps:
        directory = run_dir / checkpoint_dir_name(step, 0)
        directory.mkdir(parents=True)
        save_checkpoint(directory, model=model, optimizer=optimizer, state=TrainingState(step))


def test_a_non_finite_state_is_never_written(tmp_path: Path) -> None:
    model, optimizer = small_model()
    with torch.no_grad():
        model[1].running_var.fill_(float("inf"))  # what a NaN batch used to leave in BatchNorm
    with pytest.raises(CheckpointError, match=r"step 7 was not written: 1 tensors.*running_var"):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, state=TrainingState(7))
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_catches_truncation_and_bit_flips(tmp_path: Path) -> None:
    write_run(tmp_path, [2])
    location = Location.parse(tmp_path / "checkpoint_000000002")
    manifest = json.loads((tmp_path / "checkpoint_000000002" / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"state.pt", "model.pt"}
    verify_checkpoint(location)
    state = tmp_path / "checkpoint_000000002" / STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    verify_checkpoint(location, hashes=False)  # same size: only the hash can tell
    with pytest.raises(CheckpointError, match=r"state.pt: SHA-256 differs"):
        verify_checkpoint(location)
    state.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=r"state.pt: 100 bytes, expected"):
        verify_checkpoint(location, hashes=False)


def test_resume_takes_the_newest_intact_checkpoint_and_names_the_corrupt_one(
    tmp_path: Path,
) -> None:
    write_run(tmp_path, [2, 4, 6])
    (tmp_path / "checkpoint_000000006" / STATE_FILE).write_bytes(b"truncated")
    (tmp_path / "checkpoint_000000008").mkdir()  # an upload cut short: no manifest
    run_dir = Location.parse(tmp_path)
    assert [d.name for d in stored_checkpoints(run_dir)][:2] == [
        "checkpoint_000000008",
        "checkpoint_000000006",
    ]
    reported: list[str] = []
    found = latest_good_checkpoint(run_dir, report=reported.append)
    assert found is not None and found.name == "checkpoint_000000004"
    assert len(reported) == 2
    assert "checkpoint_000000008: incomplete" in reported[0]
    assert f"{tmp_path}/checkpoint_000000006/state.pt: 9 bytes" in reported[1]
    model, optimizer = small_model()
    state, _ = load_checkpoint(found.local_path(), model=model, optimizer=optimizer)
    assert state.step == 4
    # the steps replayed after the fallback are written beside the corrupt folders, not into them
    generation = next_generation(run_dir)
    assert checkpoint_dir_name(6, generation) == "checkpoint_000000006-r1"
    (tmp_path / "checkpoint_000000006-r1").mkdir()
    assert stored_checkpoints(run_dir)[1].name == "checkpoint_000000006-r1"
    assert next_generation(run_dir) == 2


def test_no_intact_checkpoint_is_one_error_naming_the_run(tmp_path: Path) -> None:
    write_run(tmp_path, [2])
    (tmp_path / "checkpoint_000000002" / STATE_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoints in .* is intact"):
        latest_good_checkpoint(Location.parse(tmp_path))
    assert latest_good_checkpoint(Location.parse(tmp_path / "absent")) is None
    # Only an incomplete folder (an upload cut short, never registered): start from step 0.
    (tmp_path / "checkpoint_000000002" / STATE_FILE).unlink()
    assert latest_good_checkpoint(Location.parse(tmp_path)) is None


class _Touch:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def test_a_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    torch.save({"step": 1, "model": _Touch(victim)}, tmp_path / STATE_FILE, pickle_module=pickle)
    model, optimizer = small_model()
    with pytest.raises(CheckpointError, match=r"state.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer)
    assert not victim.exists()
