"""A sweep's outcome per trial, and the summary table printed and logged at its end."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maxdeeplab.platform import tracking
from maxdeeplab.platform.sweep_config import Sweep


@dataclass
class TrialSummary:
    trial_id: str
    name: str  # `sweep_config.trial_name`
    point: dict[str, Any]
    metrics: dict[str, float]
    steps: int
    wall_s: float
    status: str
    run_id: str
    error: str = ""  # a failed trial's cause, one line


def trial_id_from_path(path: str) -> str:
    """Tune names a trial's directory `<trainable>_<trial id>_<index>_<params>_<date>`."""
    match = re.match(r"run_trial_([0-9a-f]+_\d+)_", Path(path).name)
    return match.group(1) if match else Path(path).name


def format_table(sweep: Sweep, trials: list[TrialSummary]) -> str:
    """The sweep summary: trial (named by its searched values), PQ, PQ_th, PQ_st, steps, wall
    time, status and Tune's trial id."""
    header = ["trial", "PQ", "PQ_th", "PQ_st", "steps", "wall (s)", "status", "Tune id"]
    rows = []
    for t in sorted(trials, key=lambda t: -t.metrics.get(tracking.VAL_PQ, -1.0)):
        pq = [
            t.metrics.get(k)
            for k in (tracking.VAL_PQ, tracking.VAL_PQ_THING, tracking.VAL_PQ_STUFF)
        ]
        rows.append(
            [t.name]
            + [f"{100 * v:.1f}" if v is not None else "-" for v in pq]
            + [str(t.steps), f"{t.wall_s:.0f}", t.status, t.trial_id]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return f"sweep {sweep.name}: {len(trials)} trials\n" + "\n".join(lines)
