"""`maxdeeplab train EXP.yaml [key=value ...] [--resume RUN] [--address ADDR]`.

Trains one experiment with Ray Train (an embedded local Ray unless `--address` or RAY_ADDRESS names
a cluster), tracked in MLflow. `--resume RUN` continues a stopped run (a name under
`<work_dir>/ray/` or a run directory) from its latest checkpoint, in the same MLflow run; the run's
saved config is used, with any `key=value` overrides on top (e.g. more `train.steps`).
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="EXP.yaml | key=value",
        help="the experiment YAML (optional with --resume), then config overrides",
    )
    parser.add_argument("--resume", metavar="RUN", help="continue this run (name or directory)")
    parser.add_argument("--address", metavar="ADDR", help="an existing Ray cluster (RAY_ADDRESS)")
    parser.add_argument("--name", metavar="RUN", help="the run name (default <name>-<UTC time>)")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where to look for --resume RUN by name: a path or s3://, gs:// URI "
        "(default: the experiment's work_dir)",
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray's own worker logs")


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(experiment path or None, overrides): the first item is the YAML unless it is `key=value`."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, list(items)


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.platform import tracking
    from maxdeeplab.platform.config import load_experiment, load_saved_experiment
    from maxdeeplab.platform.errors import ConfigError
    from maxdeeplab.platform.training.launch import CONFIG_FILE, find_run, train

    if not args.verbose:  # MLflow's store set-up messages are not for the console
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    path, overrides = split_items(args.items)
    run_name = args.name
    if args.resume:
        hint = args.work_dir
        if hint is None:
            hint = load_experiment(path, []).work_dir if path else "runs"
        run_dir = find_run(args.resume, hint)
        # The run's own resolved config; overrides apply on top.
        cfg = load_saved_experiment(run_dir / CONFIG_FILE, overrides)
        run_name = run_dir.name
        cfg.work_dir = str(run_dir.parent.parent)  # <work_dir>/ray/<run>, wherever it now lives
    else:
        if path is None:
            raise ConfigError("train: give an experiment YAML (or --resume RUN)")
        cfg = load_experiment(path, overrides)
    what = f"resuming run {run_name}" if args.resume else f"training {cfg.name}"
    print(
        f"{what}: {cfg.model.variant}, {cfg.train.steps} steps on {cfg.resources.num_workers} "
        f"worker(s) (work dir {cfg.work_dir})",
        flush=True,
    )
    outcome = train(
        cfg,
        run_name=run_name,
        resume=bool(args.resume),
        address=args.address,
        quiet=not args.verbose,
    )
    metrics = outcome.metrics
    print(f"run {outcome.run_name} finished: {outcome.run_dir}")
    if tracking.VAL_PQ in metrics:
        pq, thing, stuff = (
            100 * metrics[k]
            for k in (tracking.VAL_PQ, tracking.VAL_PQ_THING, tracking.VAL_PQ_STUFF)
        )
        print(f"PQ {pq:.1f}  PQ_thing {thing:.1f}  PQ_stuff {stuff:.1f}")
    if outcome.mlflow_run_id:
        print(f"MLflow run {outcome.mlflow_run_id} (maxdeeplab dashboard to browse it)")
    return 0
