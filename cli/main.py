"""The `maxdeeplab` command line (docs/architecture.md#command-line).

Each verb lives in its own module under `maxdeeplab.cli.commands` and exposes
`add_arguments(parser)` and `run(args) -> int`; those modules keep heavy imports (torch, ray,
mlflow) inside `run` so that `maxdeeplab --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from maxdeeplab.platform.errors import MaXDeepLabError
from maxdeeplab.platform.interrupts import Interrupted
from maxdeeplab.platform.ray_auth import use_token_if_found

# verb -> (module, one-line help). Order is the order `--help` shows.
VERBS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "generate the synthetic set, run the quickstart sweep, print PQ"),
    "config": ("config", "show a resolved experiment config or check a sweep"),
    "data": ("data", "generate the synthetic dataset or check a COCO-panoptic dataset"),
    "model": ("model", "model information (parameter counts, GMACs)"),
    "train": ("train", "train an experiment with Ray Train"),
    "sweep": ("sweep", "run a Ray Tune sweep from a sweep YAML"),
    "submit": ("submit", "run an experiment or a sweep as a job on a Ray cluster"),
    "jobs": ("jobs", "list a Ray cluster's jobs; follow or stop one"),
    "evaluate": ("evaluate", "PQ of COCO-panoptic prediction files against ground truth"),
    "evaluate-model": (
        "evaluate_model",
        "PQ of a checkpoint over a dataset split (inference + PQ)",
    ),
    "predict": ("predict", "panoptic predictions for images from a checkpoint"),
    "import-tf": ("import_tf", "convert a deeplab2 (TensorFlow) checkpoint to our weights"),
    "table": ("table", "our runs beside the published model-zoo table"),
    "dashboard": ("dashboard", "start the MLflow UI on 127.0.0.1"),
    "bench": ("bench", "benchmarks against references measured in the same run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maxdeeplab",
        description="MaX-DeepLab panoptic segmentation: train, sweep, evaluate, predict, compare.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(f"maxdeeplab.cli.commands.{module_name}")
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags too (`train EXP --name X lr=...`): argparse stops a
    # positional list at the first flag, so the rest of it arrives as "unknown" arguments.
    args, rest = parser.parse_known_args(argv)
    if rest:
        listed = next((name for name in ("items", "overrides") if hasattr(args, name)), None)
        if listed is None or any(item.startswith("-") for item in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        setattr(args, listed, [*getattr(args, listed), *rest])
    if (
        getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    ) and "ray" not in sys.modules:
        # Joining a cluster: a token found means Ray's token mode, which Ray reads once, when it
        # is first imported (a local instance keeps Ray's own default).
        use_token_if_found()
    # Our own messages at INFO; libraries (boto3, MLflow, Ray) only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("maxdeeplab").setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return int(args.run(args) or 0)
    except Interrupted as exc:  # what was stopped and how to continue it, in one line
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except MaXDeepLabError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line, the traceback on request
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(
            f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
