"""`maxdeeplab predict CKPT IMAGE... --out DIR`: panoptic PNG + COCO JSON + overlay per image."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a run's checkpoint directory (checkpoint_*) or model.pt"
    )
    parser.add_argument("images", nargs="+", help="image files (JPEG or PNG)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--config", default=None, help="the run's config.yaml (default: found beside CKPT)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from maxdeeplab.platform.predict import load_predictor, predict_files

    predictor = load_predictor(args.checkpoint, config=args.config, device=args.device)
    images = [Path(p) for p in args.images]
    result = predict_files(predictor, images, Path(args.out))
    print(
        f"{len(images)} predictions in {args.out} ({result.name}, <image>.png, <image>_overlay.png)"
    )
    return 0
