"""Training checkpoints: what a restarted worker group needs to continue exactly where it stopped.

A checkpoint holds the model (unwrapped from DDP, BN buffers included), the optimiser state (Adam's
moments), the global step and the non-finite-step counters. Nothing else is needed for an exact
resume because everything else is a function of (seed, step): the learning rate (`optim.py`), the
data order and augmentation (`EpochSampler` + the dataset's (seed, epoch, index) generators) and the
per-step torch RNG (`loop.seed_step`). The RNG state at save time is therefore not stored: it is
rebuilt from the step.

Ray Train persists the directory (`ray.train.Checkpoint.from_directory`) and hands the latest one
back through `ray.train.get_checkpoint()` after a failure or `train --resume`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maxdeeplab.platform.errors import ConfigError

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"  # the weights alone, for `predict` and the MLflow artifact
FORMAT_VERSION = 1


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
    """Write `state.pt` (everything) and `model.pt` (weights only) into `directory`.

    Args:
        directory: an existing, empty directory.
        model: the model, DDP-wrapped or not.
        optimizer: the optimiser.
        state: the next step and the counters.
        extra: small picklable metadata (e.g. the MLflow run id).

    Returns:
        The directory.
    """
    directory = Path(directory)
    weights = unwrap(model).state_dict()
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "step": state.step,
            "bad_steps_in_a_row": state.bad_steps_in_a_row,
            "bad_steps_total": state.bad_steps_total,
            "extra": dict(extra or {}),
        },
        directory / STATE_FILE,
    )
    torch.save(weights, directory / MODEL_FILE)
    return directory


def load_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[TrainingState, dict[str, Any]]:
    """Restore the model (and optimiser) from `directory`; return the loop state and the metadata.

    Call before wrapping the model in DDP and after the optimiser is built over its parameters.
    """
    saved = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
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
