"""`maxdeeplab table [--experiment NAME] [--format md|csv|html] [--wide] [--out FILE]
[--log-run RUN_ID]`.

The published model-zoo numbers beside our best MLflow run of each config, then the best run of
each experiment that matches no config (`maxdeeplab.dashboards.zoo_table`). `--experiment` only
filters; the table goes into MLflow only with `--log-run`, as an artifact of that run.
"""

from __future__ import annotations

import argparse

from maxdeeplab.cli.commands.dashboard import add_store_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", help="only this MLflow experiment's runs (default: all)")
    parser.add_argument("--format", choices=("md", "csv", "html"), default="md", help="default md")
    parser.add_argument(
        "--wide",
        action="store_true",
        help="Markdown: every column, names unshortened (default: lines fit 120 columns)",
    )
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
    )
    from maxdeeplab.dashboards.zoo_table_formats import render_table
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
    text = render_table(table, args.format, wide=args.wide)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if args.log_run:
        log_table(uri, text, args.format, args.log_run)
        name = artifact_name(args.format)
        print(f"logged as artifact {name} of MLflow run {args.log_run}", file=sys.stderr)
    return 0
