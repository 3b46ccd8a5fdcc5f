"""`maxdeeplab bench data`: does the loader keep up with the model?

For each crop size, on the built-in synthetic set (generated once under WORK_DIR/data):
1. loader: images/s delivered by `build_loader` with N worker processes (decode + deeplab2
   augmentation + targets + collate), after each worker's first batch; reported in total and per
   worker process;
2. model: images/s consumed by training steps of `build_model` (forward, the real losses on a
   real batch from the loader, backward, Adam) at batch 2 on ONE thread (one core of model;
   batch 2 because a train-mode batch of 1 cannot pass the ASPP image-pooling BatchNorm);
3. the ratio of (1) per worker to (2). Goal: >= 2, i.e. one loader worker per core feeds at least
   twice what one core of model consumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--crop", type=int, nargs="+", default=[641], help="crop sizes 16k+1 (default 641)"
    )
    parser.add_argument("--workers", type=int, default=2, help="loader processes (default 2)")
    parser.add_argument("--images", type=int, default=120, help="images timed (default 120)")
    parser.add_argument("--batch", type=int, default=1, help="loader batch size (default 1)")
    parser.add_argument("--variant", default="max_deeplab_s", help="model variant (default S)")
    parser.add_argument("--steps", type=int, default=2, help="timed train steps (default 2)")
    parser.add_argument(
        "--model-batch", type=int, default=2, help="train-step batch (default 2; BN needs > 1)"
    )
    parser.add_argument("--no-model", action="store_true", help="time the loader only")
    parser.add_argument("--work-dir", default="runs", help="where the synthetic set is cached")
    parser.add_argument(
        "--synthetic-train", type=int, default=200, help="synthetic training images (default 200)"
    )
    parser.add_argument(
        "--synthetic-val", type=int, default=50, help="synthetic val images (default 50)"
    )
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


def time_loader(dataset: Any, workers: int, batch: int, images: int) -> dict[str, float]:
    """Images/s of a training loader over `images` images, after each worker's first batch."""
    from maxdeeplab.platform.data.loader import build_loader, iterate_from

    loader = build_loader(dataset, batch_size=batch, num_workers=workers, pin_memory=False)
    batches = iterate_from(loader)
    for _ in range(max(workers, 1)):  # worker start-up and first decode are not steady state
        next(batches)
    count, start = 0, time.perf_counter()
    while count < images:
        count += len(next(batches)["index"])
    seconds = time.perf_counter() - start
    batches.close()  # type: ignore[attr-defined]
    rate = count / seconds
    return {"images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1)}


def time_model(dataset: Any, variant: str, steps: int, batch: int) -> float:
    """Images/s of training steps on one thread, on real batches from `dataset`."""
    import torch

    from maxdeeplab.models.config import LossConfig, ModelConfig, variant_overrides
    from maxdeeplab.models.losses.criterion import compute_losses
    from maxdeeplab.models.network import build_model
    from maxdeeplab.platform.data.dataset import batch_targets, collate_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = dataset.split.info
        cfg = ModelConfig(
            **{**variant_overrides(variant), "variant": variant},
        )
        cfg.num_classes, cfg.num_thing_classes = info.num_classes, info.num_thing_classes
        model = build_model(cfg).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
        batches = [
            collate_train([dataset[(i * batch + j) % len(dataset)] for j in range(batch)])
            for i in range(steps + 1)
        ]

        def step(batch: dict[str, torch.Tensor]) -> None:
            optimizer.zero_grad(set_to_none=True)
            losses = compute_losses(
                model(batch["image"]),
                batch_targets(batch),
                loss_cfg=LossConfig(),
                num_thing_classes=info.num_thing_classes,
            )
            losses["total"].backward()
            optimizer.step()

        step(batches[0])  # warm-up
        start = time.perf_counter()
        for timed in batches[1:]:
            step(timed)
        return steps * batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    import os

    from maxdeeplab.models.config import LossConfig
    from maxdeeplab.models.strides import is_valid_crop_size
    from maxdeeplab.platform.config import DataConfig
    from maxdeeplab.platform.data.loader import build_train_dataset
    from maxdeeplab.platform.errors import ConfigError

    for crop in args.crop:
        if not is_valid_crop_size(crop):
            raise ConfigError(f"--crop {crop}: must be of the form 16k+1 (e.g. 65, 641, 1025)")
    if args.workers < 0 or args.images < 1 or args.batch < 1 or args.steps < 1:
        raise ConfigError("--workers must be >= 0; --images, --batch and --steps >= 1")
    results: dict[str, Any] = {"workers": args.workers, "cpus": os.cpu_count(), "crops": {}}
    print(
        f"bench data: synthetic set, {args.workers} loader worker(s), batch {args.batch}, "
        f"{os.cpu_count()} CPU(s); model {args.variant} batch {args.model_batch} on 1 thread"
    )
    for crop in args.crop:
        dataset = build_train_dataset(
            DataConfig(
                crop_size=crop,
                synthetic_train=args.synthetic_train,
                synthetic_val=args.synthetic_val,
            ),
            LossConfig(),
            cache_dir=Path(args.work_dir),
            seed=0,
        )
        row: dict[str, Any] = time_loader(dataset, args.workers, args.batch, args.images)
        line = (
            f"  crop {crop:5d}: loader {row['images_per_s']:7.1f} img/s "
            f"({row['images_per_s_per_worker']:.1f} per worker)"
        )
        print(line, end="", flush=True)
        line = ""
        if not args.no_model:
            row["model_images_per_s_one_thread"] = time_model(
                dataset, args.variant, args.steps, args.model_batch
            )
            row["ratio_per_worker_to_model_core"] = (
                row["images_per_s_per_worker"] / row["model_images_per_s_one_thread"]
            )
            line = (
                f" | model {row['model_images_per_s_one_thread']:.3f} img/s per core"
                f" | ratio {row['ratio_per_worker_to_model_core']:.0f}x (goal >= 2x)"
            )
        print(line, flush=True)
        results["crops"][str(crop)] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
