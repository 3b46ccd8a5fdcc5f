"""Training checkpoints: what a restarted worker group needs to continue exactly where it stopped.

A checkpoint holds the model (unwrapped from DDP, BN buffers included), the optimiser state (Adam's
moments), the global step and the non-finite-step counters. Nothing else is needed for an exact
resume because everything else is a function of (seed, step): the learning rate (`optim.py`), the
data order and augmentation (`EpochSampler` + the dataset's (seed, epoch, index) generators) and the
per-step torch RNG (`loop.seed_step`). The RNG state at save time is therefore not stored: it is
rebuilt from the step.

Ray Train persists the directory (`ray.train.Checkpoint.from_directory`) as `checkpoint_<step>/` in
the run directory. A checkpoint is trusted only as far as it can be checked
(docs/architecture.md#checkpoints): it is written only when every tensor in it is finite, its
`manifest.json` (each file's size and SHA-256, computed by reading the written files back) is
written last, and a resumed run takes the newest checkpoint that matches its manifest, reporting
every newer one it skips. Files load with `torch.load(weights_only=True)`: a checkpoint is data,
never code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maxdeeplab.platform.errors import CheckpointError, ConfigError
from maxdeeplab.platform.storage import Location

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"  # the weights alone, for `predict` and the MLflow artifact
MANIFEST_FILE = "manifest.json"  # written last: a checkpoint without it is incomplete
FORMAT_VERSION = 1


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint folder without its manifest or one of its files: never finished."""


_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:-r(\d+))?$")


@dataclass
class TrainingState:
    """The loop's position: the next step to run and the non-finite-loss counters."""

    step: int = 0
    bad_steps_in_a_row: int = 0
    bad_steps_total: int = 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `state.pt` (everything), `model.pt` (the weights) and `manifest.json` to `directory`.

    Args:
        directory: an existing, empty directory.
        model: the model, DDP-wrapped or not.
        optimizer: the optimiser.
        state: the next step and the counters.
        extra: small metadata of plain types (e.g. the MLflow run id).

    Returns:
        The directory.

    Raises:
        CheckpointError: a tensor of the model or the optimiser is not finite (nothing is written).
    """
    directory = Path(directory)
    weights = unwrap(model).state_dict()
    optimizer_state = optimizer.state_dict()
    bad = non_finite_tensors({"model": weights, "optimizer": optimizer_state["state"]})
    if bad:
        raise CheckpointError(
            f"the checkpoint of step {state.step} was not written: {len(bad)} tensors are not "
            f"finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        )
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model": weights,
            "optimizer": optimizer_state,
            "step": state.step,
            "bad_steps_in_a_row": state.bad_steps_in_a_row,
            "bad_steps_total": state.bad_steps_total,
            "extra": dict(extra or {}),
        },
        directory / STATE_FILE,
    )
    torch.save(weights, directory / MODEL_FILE)
    # Hash what is on disk, not what was meant to be: this reads every written byte back.
    files = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in (STATE_FILE, MODEL_FILE)
    }
    manifest = {"format_version": FORMAT_VERSION, "step": state.step, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return directory


def non_finite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """The names (`a/b/c`) of the floating-point tensors in nested dicts/lists that hold NaN/inf."""
    if isinstance(tree, torch.Tensor):
        finite = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return [] if finite else [prefix or "tensor"]
    items: Any = ()
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    return [
        name
        for key, value in items
        for name in non_finite_tensors(value, f"{prefix}/{key}".lstrip("/"))
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint to resume from


def checkpoint_step(location: Location) -> int | None:
    """The step of a `checkpoint_<step>` (or `checkpoint_<step>-r<k>`) folder; None otherwise."""
    match = _CHECKPOINT_NAME.match(location.name)
    return int(match.group(1)) if match else None


def stored_checkpoints(run_dir: Location) -> list[Location]:
    """The run's checkpoint folders, newest step first (a rewritten step: the later one first)."""

    def order(location: Location) -> tuple[int, int]:
        match = _CHECKPOINT_NAME.match(location.name)
        assert match is not None
        return int(match.group(1)), int(match.group(2) or 0)

    found = [d for d in run_dir.list_dirs() if checkpoint_step(d) is not None]
    return sorted(found, key=order, reverse=True)


def checkpoint_dir_name(step: int, generation: int) -> str:
    """`checkpoint_<step>`; after resuming past corrupt checkpoints `-r<generation>` keeps the
    names of the steps replayed apart from the corrupt folders, which Ray Train still lists."""
    return f"checkpoint_{step:09d}" + (f"-r{generation}" if generation else "")


def next_generation(run_dir: Location) -> int:
    """The `-r<k>` suffix for checkpoints written after skipping corrupt ones: one past any used."""
    used = [_CHECKPOINT_NAME.match(d.name) for d in stored_checkpoints(run_dir)]
    return 1 + max((int(m.group(2) or 0) for m in used if m), default=0)


def verify_checkpoint(location: Location, *, hashes: bool = True) -> None:
    """Check a stored checkpoint against its manifest (sizes; with `hashes` also SHA-256).

    Raises:
        CheckpointError: the manifest or a file is missing, or a size or hash differs.
    """
    manifest_file = location / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{location}: incomplete (no {MANIFEST_FILE})") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_file}: unreadable manifest") from None
    for name, expected in files.items():
        size = (location / name).size()
        if size < 0:  # e.g. an upload cut short (Ray copies the files one by one)
            raise IncompleteCheckpoint(f"{location / name}: missing")
        if size != expected["bytes"]:
            raise CheckpointError(f"{location / name}: {size} bytes, expected {expected['bytes']}")
        if (
            hashes
            and hashlib.sha256((location / name).read_bytes()).hexdigest() != expected["sha256"]
        ):
            raise CheckpointError(f"{location / name}: SHA-256 differs from its manifest")


def latest_good_checkpoint(
    run_dir: Location, *, hashes: bool = True, report: Callable[[str], None] | None = None
) -> Location | None:
    """The newest checkpoint of the run that passes `verify_checkpoint` (None if there is none).

    Every newer one that fails is passed to `report` as a one-line message with its path.

    Raises:
        CheckpointError: the run has checkpoints but none of them is intact (folders that are
            only incomplete, uploads cut short that Ray Train never registered, do not count:
            without any other the run starts from step 0).
    """
    stored = stored_checkpoints(run_dir)
    problems = []
    for location in stored:
        try:
            verify_checkpoint(location, hashes=hashes)
        except CheckpointError as exc:
            if not isinstance(exc, IncompleteCheckpoint):
                problems.append(str(exc))
            if report is not None:
                report(f"skipping a corrupt checkpoint: {exc}")
            continue
        return location
    if problems:
        raise CheckpointError(
            f"none of the {len(stored)} checkpoints in {run_dir} is intact ({problems[0]}); "
            "start a new run, or restore a checkpoint folder from a backup"
        )
    return None


@contextlib.contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """The checkpoint folder on this machine: itself when local, else a temporary download."""
    if location.is_local:
        yield location.local_path()
        return
    with tempfile.TemporaryDirectory(prefix="maxdeeplab-resume-") as scratch:
        for name in (STATE_FILE, MODEL_FILE, MANIFEST_FILE):
            if (location / name).is_file():
                (Path(scratch) / name).write_bytes((location / name).read_bytes())
        yield Path(scratch)


def load_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[TrainingState, dict[str, Any]]:
    """Restore the model (and optimiser) from `directory`; return the loop state and the metadata.

    Call before wrapping the model in DDP and after the optimiser is built over its parameters.

    Raises:
        CheckpointError: `state.pt` cannot be read as a checkpoint (truncated, not one of ours, or
            a pickle that would run code: only tensors and plain types load).
    """
    path = Path(directory) / STATE_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    unwrap(model).load_state_dict(saved["model"])
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    state = TrainingState(
        step=int(saved["step"]),
        bad_steps_in_a_row=int(saved["bad_steps_in_a_row"]),
        bad_steps_total=int(saved["bad_steps_total"]),
    )
    return state, dict(saved.get("extra", {}))


def load_initial_weights(model: nn.Module, path: str | Path) -> int:
    """Start `model` from `model.init_checkpoint`: a full model or a backbone-only `.pt`.

    A backbone-only file (`maxdeeplab import-tf` of an ImageNet checkpoint) holds the encoder's
    tensors alone; everything it holds must exist in the model with the same shape, and the rest
    (transformer, decoder, heads) keeps its initialisation, as deeplab2's `maybe_load_checkpoint`.

    Returns:
        How many tensors were loaded.

    Raises:
        ConfigError: the file is missing, or a tensor is unknown to the model or has another shape.
    """
    if not Path(path).exists():
        raise ConfigError(f"model.init_checkpoint: {path} not found")
    weights = load_model_weights(path)
    own = unwrap(model).state_dict()
    unknown = sorted(k for k in weights if k not in own)
    mismatched = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    )
    if unknown or mismatched:
        listed = ", ".join([*unknown[:5], *mismatched[:5]])
        more = ", ..." if len(unknown) > 5 or len(mismatched) > 5 else ""
        raise ConfigError(
            f"model.init_checkpoint {path}: {len(unknown)} unknown and {len(mismatched)} "
            f"mis-shaped tensors for this model ({listed}{more})"
        )
    unwrap(model).load_state_dict(weights, strict=False)
    return len(weights)


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory (`model.pt` in it) or of a `model.pt` file."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    return torch.load(path, map_location="cpu", weights_only=True)
