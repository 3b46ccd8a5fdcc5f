"""`maxdeeplab config show EXP.yaml [key=value ...]` and `maxdeeplab config check FILE.yaml`.

Both resolve the experiment as `train` does before it starts Ray (`prepare_experiment`): the class
counts come from the data (`data.root`'s categories, or the synthetic set's), and a missing
`data.root` is the same one-line error. Nothing is generated or written.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from maxdeeplab.platform.config import ExperimentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser(
        "show", help="print the resolved experiment config as YAML (class counts from the data)"
    )
    show.add_argument("experiment", help="experiment YAML")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    check = sub.add_parser(
        "check", help="validate an experiment or sweep YAML without starting anything"
    )
    check.add_argument("file", help="experiment or sweep YAML (a sweep has a `search:` key)")
    check.add_argument("overrides", nargs="*", metavar="key=value", help="experiment overrides")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from maxdeeplab.platform.config import load_experiment, read_yaml, to_yaml
    from maxdeeplab.platform.training.launch import prepare_experiment

    if args.action == "show":
        print(to_yaml(_show(load_experiment(args.experiment, args.overrides))), end="")
        return 0
    if "search" in read_yaml(Path(args.file)):
        from maxdeeplab.platform.sweep_config import load_sweep

        sweep = load_sweep(args.file)
        for point in sweep.grid_points():  # as `sweep` checks them before any trial
            prepare_experiment(sweep.trial_config(point), generate_data=False)
        varied = ", ".join(sweep.search) or "nothing"
        print(
            f"{args.file}: valid sweep {sweep.name!r}: {sweep.num_trials} trials (varies {varied})"
        )
    else:
        cfg = prepare_experiment(load_experiment(args.file, args.overrides), generate_data=False)
        print(
            f"{args.file}: valid experiment {cfg.name!r} ({cfg.model.variant}, crop "
            f"{cfg.data.crop_size}, {cfg.model.num_classes} classes)"
        )
    return 0


def _show(cfg: ExperimentConfig) -> ExperimentConfig:
    """The experiment as the run will use it; as written (and a warning) when the data is missing,
    so a config stays readable on a machine without its dataset."""
    import sys

    from maxdeeplab.platform.errors import ConfigError, DataError
    from maxdeeplab.platform.training.launch import prepare_experiment

    try:
        return prepare_experiment(cfg, generate_data=False)
    except (ConfigError, DataError) as exc:
        print(
            f"warning: {exc}; model.num_classes is the config's {cfg.model.num_classes}, "
            "not the data's",
            file=sys.stderr,
        )
        return cfg
