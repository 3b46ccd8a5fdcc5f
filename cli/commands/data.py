"""`maxdeeplab data synthetic|check`: write the synthetic set or validate a COCO panoptic split."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    syn = sub.add_parser(
        "synthetic",
        help="write the seeded synthetic dataset in COCO panoptic format",
        description="Write the synthetic dataset (splits train2017 and val2017) under OUT.",
    )
    syn.add_argument("out", metavar="OUT", help="output folder (the dataset root)")
    syn.add_argument("--train", type=int, default=200, help="training images (default 200)")
    syn.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    syn.add_argument(
        "--size", type=int, nargs=2, default=(321, 321), metavar=("H", "W"), help="image size"
    )
    syn.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    syn.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT, replacing its annotations/, train2017/ and val2017/",
    )
    syn.set_defaults(data_run=run_synthetic)

    check = sub.add_parser(
        "check",
        help="validate a COCO panoptic split and list every problem",
        description="Validate ROOT/annotations/panoptic_SPLIT.json, its PNGs and images.",
    )
    check.add_argument("root", metavar="ROOT", help="dataset root")
    check.add_argument("--split", default="val2017", help="split name (default val2017)")
    check.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    check.set_defaults(data_run=run_check)


def run(args: argparse.Namespace) -> int:
    return int(args.data_run(args) or 0)


def run_synthetic(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from maxdeeplab.platform.data.synthetic import generate_synthetic
    from maxdeeplab.platform.errors import DataError

    height, width = args.size
    if args.train < 0 or args.val < 0:
        raise DataError(f"--train and --val must be >= 0 (got {args.train}, {args.val})")
    if height < 16 or width < 16:
        raise DataError(f"--size must be at least 16 16 (got {height} {width})")
    _make_room(Path(args.out), overwrite=args.overwrite)
    start = time.perf_counter()
    with tqdm(total=args.train + args.val, unit="img", disable=None) as bar:
        root = generate_synthetic(
            args.out,
            num_train=args.train,
            num_val=args.val,
            height=height,
            width=width,
            seed=args.seed,
            progress=bar.update,
        )
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.train} train2017 + {args.val} val2017 images of {height}x{width} "
        f"to {root} in {seconds:.1f} s"
    )
    return 0


def _make_room(out: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless `overwrite`; then clear what the generator writes.

    Raises:
        DataError: `out` is a file, or a non-empty folder without --overwrite.
    """
    import shutil

    from maxdeeplab.platform.data.synthetic import SPLITS
    from maxdeeplab.platform.errors import DataError

    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"{out}: folder is not empty; choose another OUT or pass --overwrite")
    for name in ("annotations", *SPLITS):
        shutil.rmtree(out / name, ignore_errors=True)


def run_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from maxdeeplab.platform.data.check import check_split

    checked = 0

    def advance(n: int) -> None:
        nonlocal checked
        checked += n
        bar.update(n)

    with tqdm(unit="img", disable=None, desc=f"checking {args.split}") as bar:
        problems = check_split(args.root, args.split, workers=args.workers, progress=advance)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.root} split {args.split}", file=sys.stderr)
        return 1
    print(f"ok: {args.root} split {args.split}: {checked} images, no problems")
    return 0
