"""`maxdeeplab config show EXP.yaml [key=value ...]` and `maxdeeplab config check FILE.yaml`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the resolved experiment config as YAML")
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

    if args.action == "show":
        print(to_yaml(load_experiment(args.experiment, args.overrides)), end="")
        return 0
    if "search" in read_yaml(Path(args.file)):
        from maxdeeplab.platform.sweep_config import load_sweep

        sweep = load_sweep(args.file)
        varied = ", ".join(sweep.search) or "nothing"
        print(
            f"{args.file}: valid sweep {sweep.name!r}: {sweep.num_trials} trials (varies {varied})"
        )
    else:
        cfg = load_experiment(args.file, args.overrides)
        print(
            f"{args.file}: valid experiment {cfg.name!r} "
            f"({cfg.model.variant}, crop {cfg.data.crop_size})"
        )
    return 0
