"""`maxdeeplab bench NAME ...`: every benchmark reports a ratio against a reference timed in the
same run.

Benchmarks live in `maxdeeplab.cli.bench.<name>`, each with `add_arguments(parser)` and
`run(args) -> int` like the CLI verbs.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, str] = {
    "pq": "our PQ evaluator vs panopticapi and hotcoco",
    "model": "forward / train step: eager vs channels_last vs torch.compile",
    "data": "loader images/s vs the model's consumption rate",
    "loss": "matching + losses as a share of a training step",
    "train": "Ray Train step rate vs a plain loop",
    "checkpoint": "checkpoint save + upload: a bucket vs local disk, as a share of training time",
    "deeplab2": "MaX-DeepLab-S train step: ours vs deeplab2's own (needs DEEPLAB2_ENV)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"maxdeeplab.cli.bench.{name}")
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_run(args) or 0)
