"""`maxdeeplab predict CKPT IMAGE... --out DIR`: panoptic PNG + COCO JSON + overlay per image.

With `--gt-json G.json` (or `--data-root ROOT --split S`) the JSON carries the ground truth's
image ids and categories, so `maxdeeplab evaluate` scores it against that ground truth.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a run's checkpoint directory (checkpoint_*) or model.pt"
    )
    parser.add_argument(
        "images",
        nargs="*",
        help="image files (JPEG or PNG); with --data-root and none given: every image of the split",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--config", default=None, help="the run's config.yaml (default: found beside CKPT)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    truth = parser.add_mutually_exclusive_group()
    truth.add_argument(
        "--gt-json",
        default=None,
        help="ground-truth panoptic JSON: write its image ids and categories (for `evaluate`)",
    )
    truth.add_argument(
        "--data-root",
        default=None,
        help="a COCO-panoptic root: as --gt-json with ROOT/annotations/panoptic_SPLIT.json",
    )
    parser.add_argument("--split", default="val2017", help="with --data-root (default val2017)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="opacity of the prediction over the image in the overlay, 0..1 (default 0.5)",
    )


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from maxdeeplab.platform.errors import ConfigError
    from maxdeeplab.platform.predict import (
        dataset_ground_truth,
        load_predictor,
        predict_files,
        read_ground_truth,
    )
    from maxdeeplab.platform.visualize import OVERLAY_ALPHA

    images = [Path(p) for p in args.images]
    truth = None
    if args.data_root:
        truth, split_images = dataset_ground_truth(args.data_root, args.split)
        images = images or split_images
    elif args.gt_json:
        truth = read_ground_truth(args.gt_json)
    if not images:
        raise ConfigError("predict: give IMAGE files, or --data-root to predict a whole split")
    alpha = OVERLAY_ALPHA if args.alpha is None else args.alpha
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha {alpha}: must be between 0 and 1")
    predictor = load_predictor(args.checkpoint, config=args.config, device=args.device)
    result = predict_files(predictor, images, Path(args.out), ground_truth=truth, alpha=alpha)
    for line in result.skipped:
        print(f"warning: skipped {line}", file=sys.stderr)
    for path in result.not_in_ground_truth:
        print(
            f"warning: {path.name} is not in {truth.source if truth else ''}: written with "
            f"image id {path.stem!r}",
            file=sys.stderr,
        )
    print(
        f"{len(result.written)} predictions in {args.out} "
        f"({result.json_path.name}, <image>.png, <image>_overlay.png)"
        + (f"; {len(result.skipped)} unreadable image(s) skipped" if result.skipped else "")
    )
    return 0
