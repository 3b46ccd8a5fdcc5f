"""`maxdeeplab evaluate`: PQ of COCO-panoptic prediction files, panopticapi's numbers.

The definition: docs/deeplab2.md#panoptic-quality.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt-json", required=True, help="ground-truth panoptic JSON")
    parser.add_argument("--gt-dir", required=True, help="folder of ground-truth panoptic PNGs")
    parser.add_argument("--pred-json", required=True, help="prediction panoptic JSON")
    parser.add_argument("--pred-dir", required=True, help="folder of predicted panoptic PNGs")
    parser.add_argument("--workers", type=int, default=1, help="processes / threads (default 1)")
    parser.add_argument(
        "--crowd-as-void",
        action="store_true",
        help="deeplab2 pipeline PQ: crowd of any category counts as void (model zoo's PQ** column)",
    )
    parser.add_argument("--per-class", action="store_true", help="also print per-category PQ")
    parser.add_argument("--out", help="write the results JSON (panopticapi's structure) here")
    parser.add_argument(
        "--engine",
        choices=("auto", "numpy", "hotcoco"),
        default="auto",
        help="auto: hotcoco's Rust decoder when installed (official mode), else ours",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.platform.eval.files import evaluate_files
    from maxdeeplab.platform.eval.report import format_per_class, format_table, write_results

    evaluation = evaluate_files(
        args.gt_json,
        args.gt_dir,
        args.pred_json,
        args.pred_dir,
        workers=args.workers,
        crowd_as_void=args.crowd_as_void,
        progress=not args.no_progress,
        engine=args.engine,
    )
    mode = "crowd-as-void (deeplab2 pipeline)" if args.crowd_as_void else "official (panopticapi)"
    print(f"PQ, {mode}, {evaluation.num_images} images, engine {evaluation.engine}")
    print(format_table(evaluation.result))
    if args.per_class:
        print()
        print(format_per_class(evaluation.result))
    if evaluation.missing_predictions:
        print(
            f"warning: {len(evaluation.missing_predictions)} of {evaluation.num_images} images had "
            "no prediction and were counted as all false negatives"
        )
    if evaluation.unmatched_predictions:
        print(
            f"warning: {len(evaluation.unmatched_predictions)} predicted images are not in the "
            f"ground truth and were ignored (first: {evaluation.unmatched_predictions[0]!r})"
        )
    if args.out:
        meta = {
            "mode": "crowd_as_void" if args.crowd_as_void else "official",
            "engine": evaluation.engine,
            "num_images": evaluation.num_images,
            "missing_predictions": len(evaluation.missing_predictions),
            "unmatched_predictions": len(evaluation.unmatched_predictions),
        }
        write_results(args.out, evaluation.result, meta=meta)
        print(f"results written to {args.out}")
    return 0
