"""`maxdeeplab table [--experiment NAME] [--format md|csv|html] [--out FILE]`.

The published model-zoo numbers beside our best MLflow run of each config
(`maxdeeplab.dashboards.zoo_table`). With `--experiment` or `--log-run` the table is also logged as
an MLflow artifact.
"""

from __future__ import annotations

import argparse

from maxdeeplab.cli.commands.dashboard import add_store_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", help="only this MLflow experiment's runs (default: all)")
    parser.add_argument("--format", choices=("md", "csv", "html"), default="md", help="default md")
    parser.add_argument("--out", help="also write the table to this file")
    # `args.run` is taken: the CLI stores each verb's entry point there.
    parser.add_argument("--log-run", metavar="RUN_ID", help="log the table into this MLflow run")
    add_store_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from maxdeeplab.dashboards.zoo_table import (
        artifact_name,
        build_table,
        log_table,
        published_table,
        render_table,
    )
    from maxdeeplab.platform.config import ExperimentConfig, TrackingConfig
    from maxdeeplab.platform.errors import ConfigError
    from maxdeeplab.platform.tracking import tracking_uri

    cfg = ExperimentConfig(work_dir=args.work_dir, tracking=TrackingConfig(uri=args.uri))
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:") and not Path(uri.split(":///", 1)[-1]).is_file():
        if args.log_run or args.experiment:
            raise ConfigError(f"{uri}: no tracking store there (pass --uri or --work-dir)")
        print(f"note: no tracking store at {uri}: published numbers only", file=sys.stderr)
        table = published_table()
    else:
        table = build_table(uri, args.experiment)
    text = render_table(table, args.format)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if args.log_run or args.experiment:
        run_id = log_table(uri, text, args.format, run_id=args.log_run, experiment=args.experiment)
        name = artifact_name(args.format)
        print(f"logged as artifact {name} of MLflow run {run_id}", file=sys.stderr)
    return 0
