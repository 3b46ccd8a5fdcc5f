"""`maxdeeplab bench NAME ...`: every benchmark reports a ratio against a reference timed in the
same run.

Benchmarks live in `maxdeeplab.cli.bench.<name>`, each with `add_arguments(parser)` and
`run(args) -> int` like the CLI verbs.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHMARKS: dict[str, str] = {
    "pq": "our PQ evaluator vs panopticapi and hotcoco",
    "model": "forward / train step: eager vs channels_last vs torch.compile",
    "data": "loader images/s vs the model's consumption rate",
    "loss": "matching + losses as a share of a training step",
    "train": "Ray Train step rate vs a plain loop",
    "checkpoint": "checkpoint save + upload: a bucket vs local disk, as a share of training time",
    "deeplab2": "MaX-DeepLab-S train step: ours vs deeplab2's own (needs DEEPLAB2_ENV)",
    "memory": "peak memory of a training step: ours vs deeplab2 or vs activation checkpointing",
    "gpu": "one-GPU readiness: bf16 step rate, memory, channels_last, compile, Ray, PQ (to JSON)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="benchmark", required=True, metavar="NAME", parser_class=_BenchmarkParser
    )
    for name, help_text in BENCHMARKS.items():
        sub.add_parser(name, help=help_text, description=help_text, benchmark=name)


class _BenchmarkParser(argparse.ArgumentParser):
    """A benchmark's parser, completed by its module only once that benchmark is chosen.

    Benchmark modules import torch and the like at their top (seconds); building every verb's
    parser must not, or each `maxdeeplab` command would wait for them before its first line.
    """

    def __init__(self, *args: Any, benchmark: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.benchmark = benchmark
        self.completed = False

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        if not self.completed:  # argparse's subparser action parses through this method
            module = importlib.import_module(f"maxdeeplab.cli.bench.{self.benchmark}")
            module.add_arguments(self)
            self.set_defaults(bench_run=module.run)
            self.completed = True
        return super().parse_known_args(*args, **kwargs)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_run(args) or 0)
