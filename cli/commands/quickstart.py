"""`maxdeeplab quickstart`: the main job, end to end on the built-in synthetic dataset.

Generates the synthetic COCO-panoptic set, runs the quickstart sweep (`experiments/quickstart/
sweep.yaml`, shipped inside the package) with Ray Tune + Ray Train, prints the PQ table, writes the
plots and says how to open the dashboard. Running it again resumes the same sweep (finished trials
are kept); `--fresh` starts over.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sweep", default=None, help="another sweep YAML (default: the packaged quickstart sweep)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard the saved quickstart sweep and start over"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="find and validate the sweep, say what would run, and stop (nothing is trained)",
    )


def run(args: argparse.Namespace) -> int:
    from importlib.resources import as_file, files

    from maxdeeplab.platform.sweep_config import load_sweep

    with as_file(files("maxdeeplab") / "experiments" / "quickstart") as packaged:
        path = args.sweep or str(packaged / "sweep.yaml")
        sweep = load_sweep(path)
        cfg = sweep.trial_config({})
        print(
            f"quickstart: {sweep.num_trials} trials of {cfg.model.variant} at crop "
            f"{cfg.data.crop_size}, {cfg.train.steps} steps each, on the synthetic dataset "
            f"(work dir {cfg.work_dir})",
            flush=True,
        )
        if args.check:
            print(f"sweep {path}: valid")
            return 0
        # Ray Tune takes seconds to load: only now that the first line is out.
        from maxdeeplab.cli.commands.sweep import write_plots
        from maxdeeplab.platform.sweep_dirs import sweep_dir
        from maxdeeplab.platform.tune import run_sweep

        if args.fresh:
            sweep_dir(sweep).remove_tree()
        result = run_sweep(path)
    write_plots(result)
    best = result.best
    print(f"best trial {best.name}: PQ {100 * best.metrics.get('val/pq', 0.0):.1f}")
    print(f"open the dashboard: maxdeeplab dashboard --work-dir {cfg.work_dir}")
    return 0
