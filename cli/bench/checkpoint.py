"""`maxdeeplab bench checkpoint`: what a checkpoint costs the loop, on local disk vs a bucket.

A checkpoint stalls every rank: rank 0 writes `state.pt` + `model.pt` (`save_checkpoint`), then
Ray Train copies the folder to the run's storage with pyarrow before `ray.train.report` returns.
This benchmark builds the variant with a real optimiser state (one training step on the synthetic
set, which also gives the step time here), then times, in the same run:
- save: `save_checkpoint` into a local temporary folder;
- upload to local disk: pyarrow's `copy_files` into a local folder (the reference);
- upload to the bucket: the same copy to `--to` (s3:// or gs://, configured by the standard
  variables, e.g. AWS_ENDPOINT_URL).
It reports the upload ratio (bucket / local) and the stall per checkpoint as a fraction of the
training time between two checkpoints (`train.checkpoint_interval` of the model-zoo configs x the
step time; `--step-s` replaces the step time measured here, e.g. with one measured on a GPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ZOO_BASE = "model_zoo/_coco_base.yaml"  # under the packaged experiments: the zoo's shared settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, help="bucket prefix to upload to (s3://, gs://)")
    parser.add_argument("--variant", default="max_deeplab_s", help="model variant (default S)")
    parser.add_argument("--crop", type=int, default=641, help="crop for the step time (641)")
    parser.add_argument("--repeats", type=int, default=3, help="timed saves/uploads, median (3)")
    parser.add_argument("--step-s", type=float, default=0.0, help="step time to compare against")
    parser.add_argument("--interval", type=int, default=0, help="default: the zoo configs'")
    parser.add_argument("--work-dir", default="runs/bench", help="cache for the synthetic set")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.errors import ConfigError
    from maxdeeplab.platform.storage import Location, check_writable

    target = Location.parse(args.to)
    if target.is_local:
        raise ConfigError(f"--to {args.to}: give object storage (s3://bucket/prefix, gs://...)")
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    check_writable(target)
    target_existed = target.exists()
    zoo = load_experiment(str(files("maxdeeplab") / "experiments" / ZOO_BASE))
    interval = args.interval or zoo.train.checkpoint_interval
    model, optimizer, state, measured_step_s = _trained_one_step(args)
    step_s = args.step_s or measured_step_s
    with tempfile.TemporaryDirectory(prefix="maxdeeplab-bench-ckpt-") as scratch:
        saves, local_uploads, bucket_uploads = [], [], []
        size = 0
        for i in range(args.repeats):
            folder = Path(scratch) / f"ckpt_{i}"
            folder.mkdir()
            saves.append(_timed(lambda f=folder: _save(f, model, optimizer, state)))
            size = sum(p.stat().st_size for p in folder.iterdir())
            local = Location.parse(Path(scratch) / f"local_{i}")
            local_uploads.append(_timed(lambda f=folder, d=local: _upload(f, d)))
            remote = target / f"bench-checkpoint-{int(time.time())}-{i}"
            bucket_uploads.append(_timed(lambda f=folder, d=remote: _upload(f, d)))
            remote.remove_tree()
            shutil.rmtree(folder)
    if not target_existed:  # leave the bucket as it was ("folder" markers included)
        target.remove_tree()
    save, up_local, up_bucket = map(statistics.median, (saves, local_uploads, bucket_uploads))
    between = interval * step_s
    result: dict[str, Any] = {
        "variant": args.variant,
        "checkpoint_mib": size / 2**20,
        "save_s": save,
        "upload_local_s": up_local,
        "upload_bucket_s": up_bucket,
        "upload_ratio_bucket_to_local": up_bucket / up_local,
        "step_s": step_s,
        "step_s_measured_here": not args.step_s,
        "checkpoint_interval": interval,
        "stall_fraction_local": (save + up_local) / between,
        "stall_fraction_bucket": (save + up_bucket) / between,
    }
    print(
        f"bench checkpoint: {args.variant}, {result['checkpoint_mib']:.0f} MiB per checkpoint; "
        f"save {save:.2f} s, upload to local disk {up_local:.2f} s, to {target} {up_bucket:.2f} s"
    )
    source = "measured here" if not args.step_s else "given"
    print(
        f"  stall per checkpoint every {interval} steps of {step_s:.2f} s ({source}): "
        f"local {100 * result['stall_fraction_local']:.3f} %, "
        f"bucket {100 * result['stall_fraction_bucket']:.3f} % of the training time"
    )
    print(f"ratio (bucket / local upload): {result['upload_ratio_bucket_to_local']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _trained_one_step(args: argparse.Namespace) -> tuple[Any, Any, Any, float]:
    """The model and optimiser after real steps (Adam's moments exist), and a step's time."""
    from maxdeeplab.cli.bench.train import plain_loop
    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.training.checkpoint import TrainingState

    cfg = load_experiment(
        None,
        [
            f"model.variant={args.variant}",
            f"data.crop_size={args.crop}",
            "train.batch_size=1",
            "data.synthetic_train=2",
            "data.synthetic_val=1",
            f"work_dir={args.work_dir}",
        ],
    )
    model, optimizer, _, step = plain_loop(cfg)
    times = []
    for index in range(2):  # the first step pays one-off costs (allocations, Adam state)
        start = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - start)
    return model, optimizer, TrainingState(step=2), times[-1]


def _save(folder: Path, model: Any, optimizer: Any, state: Any) -> None:
    from maxdeeplab.platform.training.checkpoint import save_checkpoint

    save_checkpoint(folder, model=model, optimizer=optimizer, state=state)


def _upload(folder: Path, destination: Any) -> None:
    """What Ray Train does with a reported checkpoint folder: pyarrow's copy_files."""
    from pyarrow import fs

    destination.mkdir()
    filesystem, path = destination.filesystem()
    fs.copy_files(
        str(folder),
        path,
        source_filesystem=fs.LocalFileSystem(),
        destination_filesystem=filesystem,
        use_threads=True,
    )


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
