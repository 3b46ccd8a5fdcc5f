"""`maxdeeplab sweep SWEEP.yaml [--resume | --fresh] [--address ADDR]`: a Ray Tune sweep in MLflow.

Prints each trial's progress lines under its name, then the summary table (trial, PQ, PQ_th, PQ_st,
steps, wall time, status) and writes the sweep's plots to `<work_dir>/sweeps/<name>/plots` (also
logged to the parent MLflow run). Ray's and Tune's own messages go to the sweep's `sweep.log`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from maxdeeplab.platform.tune import SweepResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML (check it first with `maxdeeplab config check`)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep's saved state (also automatic when its directory exists)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start the sweep anew in a new directory (the old one is kept); needed when the "
        "sweep YAML changed since the sweep of this name ran",
    )
    parser.add_argument("--address", default="", help="Ray cluster (default: RAY_ADDRESS or local)")


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.platform.sweep_config import load_sweep

    sweep = load_sweep(args.sweep)  # a bad sweep fails here, before Ray is loaded (seconds)
    searched = ", ".join(sweep.search) or "no key"
    print(
        f"sweep {sweep.name}: {sweep.num_trials} trials over {searched}; loading Ray Tune...",
        flush=True,
    )
    from maxdeeplab.platform.tune import run_sweep

    result = run_sweep(args.sweep, resume=args.resume, fresh=args.fresh, address=args.address)
    write_plots(result)
    return 0


def write_plots(result: SweepResult) -> None:
    """The sweep's plots (PQ vs step per trial, PQ vs each varied key), in the sweep's directory
    (local or object storage) and in MLflow."""
    import tempfile
    from pathlib import Path

    from maxdeeplab.dashboards.plots import plot_sweep
    from maxdeeplab.platform import tracking

    out = result.directory / "plots"
    with tempfile.TemporaryDirectory(prefix="maxdeeplab-plots-") as scratch:
        local = out.local_path() if out.is_local else Path(scratch)
        paths = plot_sweep(result.parent_run_id, local, uri=tracking.tracking_uri(result.config))
        if not out.is_local:
            for path in paths:
                (out / path.name).write_bytes(path.read_bytes())
    print(f"plots: {len(paths)} PNGs in {out}")
