"""`maxdeeplab bench gpu`: is one GPU ready to train? One command, one JSON, under 8 minutes.

Sections, each against a reference measured in the same run, and each written to the JSON as soon
as it is measured (a run cut short still leaves what it got):
1. `train`: MaX-DeepLab-S at 641 with bf16 autocast and channels_last (`train.amp`,
   `train.channels_last`), the production step (`platform/training/step.py` `train_step`: forward,
   criterion with matching, backward, Adam) on a synthetic batch already on the GPU: images/s and
   peak memory (`torch.cuda.max_memory_allocated`) at each `--batches`; goal >= 25 images/s;
2. `channels_last`: the same step with channels_last off, at the first batch size: on / off;
3. `pq`: the PQ accumulator (`platform/eval/accumulator.py`) on maps already on the device, ms per
   image, against its numpy path on the same maps (one core): numpy / device;
4. `ray`: the 1-worker Ray Train step rate against the plain loop on the same GPU (`bench train
   --gpu`, its synthetic loader): Ray / plain, goal >= 0.95;
5. `compile`: the step with a `torch.compile`d model at the first batch size (its compile time
   reported apart): compiled / eager. Last, because compiling takes longest.
`--smoke` runs every section on CPU with tiny settings (tiny variant, crop 65, batches 1 and 2,
one step after one, the `eager` compile backend), so the check cannot rot
(tests/cli/bench/test_bench_gpu.py).
`scripts/gpu_check.sh` is the one line to run on a GPU machine (docs/benchmarks.md#gpu-check).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GOAL_IMAGES_PER_S = 25.0  # MaX-DeepLab-S at 641, bf16, one H100-class GPU (bench model's goal)
PQ_MAP_SIZE = (480, 640)  # a COCO-sized panoptic map
PQ_SEGMENTS = 40
SMOKE = {
    "variant": "max_deeplab_tiny",
    "crop": 65,
    "batches": [1, 2],
    "steps": 1,
    "warmup": 1,
    "device": "cpu",
    "compile_backend": "eager",
    "pq_images": 3,
    "ray_steps": 2,
    "ray_images": 4,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="max_deeplab_s", help="model variant (default S)")
    parser.add_argument("--crop", type=int, default=641, help="crop side 16k+1 (default 641)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="(8 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps, median (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--device", default="cuda", help="default cuda")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--pq-images", type=int, default=50, help="PQ maps timed (default 50)")
    parser.add_argument("--ray-steps", type=int, default=10, help="Ray section timed steps")
    parser.add_argument("--ray-images", type=int, default=200, help="Ray section's synthetic set")
    parser.add_argument("--skip-ray", action="store_true", help="skip the Ray Train section")
    parser.add_argument("--skip-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--work-dir", default="runs/bench", help="synthetic data for Ray")
    parser.add_argument("--smoke", action="store_true", help="tiny settings on CPU (for CI)")
    parser.add_argument("--json", default="gpu_check.json", help="(default gpu_check.json)")


def run(args: argparse.Namespace) -> int:
    import torch

    from maxdeeplab.models.strides import is_valid_crop_size
    from maxdeeplab.platform.errors import ConfigError

    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if not is_valid_crop_size(args.crop) or min(args.batches) < 1 or args.steps < 1:
        raise ConfigError("--crop must be 16k+1, --batches and --steps >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench gpu: no CUDA device here; --smoke runs the check on CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {"device": name, "variant": args.variant, "crop": args.crop}
    started = time.perf_counter()

    def record(section: str, values: dict[str, Any]) -> None:
        results[section] = values
        results["wall_s"] = time.perf_counter() - started
        Path(args.json).write_text(json.dumps(results, indent=2))

    print(f"bench gpu: {args.variant} at {args.crop} on {name}, bf16 autocast, {args.json}")
    trains = {}
    for batch in args.batches:
        trains[f"batch_{batch}"] = time_train_step(args, device, batch, channels_last=True)
        _print_row(f"train, batch {batch}", trains[f"batch_{batch}"])
    first = trains[f"batch_{args.batches[0]}"]
    record("train", trains | {"ratio_to_goal": first["images_per_s"] / GOAL_IMAGES_PER_S})
    plain = time_train_step(args, device, args.batches[0], channels_last=False)
    _print_row(f"channels_last off, batch {args.batches[0]}", plain)
    record("channels_last", {"off": plain, "ratio": first["images_per_s"] / plain["images_per_s"]})
    record("pq", time_pq_accumulator(args, device))
    if not args.skip_ray:
        record("ray", _or_error(lambda: ray_race(args)))
    if not args.skip_compile:

        def compiled() -> dict[str, Any]:
            row = time_train_step(
                args,
                device,
                args.batches[0],
                channels_last=True,
                compile_backend=args.compile_backend,
            )
            _print_row(f"compiled ({args.compile_backend})", row)
            return row | {"ratio": row["images_per_s"] / first["images_per_s"]}

        record("compile", _or_error(compiled))
    print(f"  wrote {args.json} in {results['wall_s']:.0f} s")
    ratio = results["train"]["ratio_to_goal"]
    print(f"  ratio train images/s / goal {GOAL_IMAGES_PER_S:g}: {ratio:.3f}")
    return 0


def _or_error(section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The section's numbers, or {"error": one line} when it fails: a finding, not a crash."""
    try:
        return section()
    except Exception as exc:  # any failure of the section is its result
        line = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        print(f"  failed: {line}", flush=True)
        return {"error": line}


def _print_row(name: str, row: dict[str, float]) -> None:
    print(
        f"  {name:<28} {row['images_per_s']:8.2f} images/s   peak {row['peak_memory_mib']:8.0f} MiB"
        + (f"   compile {row['compile_s']:.0f} s" if "compile_s" in row else ""),
        flush=True,
    )


def time_train_step(
    args: argparse.Namespace,
    device: Any,
    batch_size: int,
    *,
    channels_last: bool,
    compile_backend: str | None = None,
) -> dict[str, float]:
    """images/s (median step) and peak memory of `train_step` on one synthetic batch."""
    import resource

    import torch

    from maxdeeplab.cli.bench.deeplab2 import race_targets
    from maxdeeplab.models.network import build_model, parameter_groups
    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.training.optim import build_optimizer
    from maxdeeplab.platform.training.step import train_step

    cfg = load_experiment(
        None,
        [
            f"model.variant={args.variant}",
            f"data.crop_size={args.crop}",
            f"train.batch_size={batch_size}",
            "train.amp=bf16",
            f"train.channels_last={channels_last}",
        ],
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(*parameter_groups(model), cfg.optim)
    network: Any = model
    compile_s = 0.0
    if compile_backend:
        network = torch.compile(model, backend=compile_backend)
    targets = race_targets(args.crop, batch_size)
    batch = {
        "image": torch.rand(batch_size, 3, args.crop, args.crop) * 255.0,
        "semantic": targets.semantic,
        "thing_ids": targets.thing_ids,
        "thing_classes": targets.thing_classes,
        "pixel_weights": targets.pixel_weights,
    }
    batch = {key: value.to(device) for key, value in batch.items()}

    def step(index: int) -> None:
        train_step(
            network,
            optimizer,
            [batch],
            step=index,
            cfg=cfg,
            num_thing_classes=cfg.model.num_thing_classes,
            device=device,
        )

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if compile_backend:
        start = time.perf_counter()
        step(0)  # compiles forward and backward
        _sync(device)
        compile_s = time.perf_counter() - start
    seconds = _median_time(step, args.warmup, args.steps, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the process's peak RSS so far: it only grows across sections
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"images_per_s": batch_size / seconds, "step_s": seconds, "peak_memory_mib": peak}
    return row | ({"compile_s": compile_s} if compile_backend else {})


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(step: Callable[[int], None], warmup: int, steps: int, device: Any) -> float:
    for index in range(warmup):
        step(index)
    _sync(device)
    times = []
    for index in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(index)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_pq_accumulator(args: argparse.Namespace, device: Any) -> dict[str, float]:
    """ms per image of `PQAccumulator.update` on device maps vs on numpy maps (one core)."""
    import numpy as np
    import torch

    from maxdeeplab.platform.eval.accumulator import PQAccumulator

    rng = np.random.default_rng(0)
    categories = [{"id": c, "isthing": int(c <= 80)} for c in range(1, 134)]
    maps = [_segment_map(rng) for _ in range(2 * args.pq_images)]
    pairs = list(zip(maps[::2], maps[1::2], strict=True))
    # On the device before timing, as post-processing leaves them during evaluation.
    on_device = [
        (torch.from_numpy(gt).to(device), torch.from_numpy(pred).to(device))
        for (gt, _), (pred, _) in pairs
    ]

    def seconds(use_device: bool) -> float:
        accumulator = PQAccumulator(categories)
        _sync(device)
        start = time.perf_counter()
        for index, ((gt, gt_segments), (pred, pred_segments)) in enumerate(pairs):
            if use_device:
                gt, pred = on_device[index]
            accumulator.update(pred, pred_segments, gt, gt_segments)
        _sync(device)
        return (time.perf_counter() - start) / len(pairs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds(True)  # warm-up: kernels, allocator
        device_s, numpy_s = seconds(True), seconds(False)
    finally:
        torch.set_num_threads(threads)
    print(f"  PQ accumulator: {device_s * 1e3:.2f} ms/image on {device}, numpy {numpy_s * 1e3:.2f}")
    return {
        "device_ms_per_image": device_s * 1e3,
        "numpy_ms_per_image": numpy_s * 1e3,
        "ratio": numpy_s / device_s,
    }


def _segment_map(rng: Any) -> tuple[Any, dict[int, int]]:
    """A random panoptic id map (rectangles of PQ_SEGMENTS segments over void) and its segments."""
    import numpy as np

    height, width = PQ_MAP_SIZE
    ids = np.zeros(PQ_MAP_SIZE, np.int64)
    segments: dict[int, int] = {}
    for index in range(PQ_SEGMENTS):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        size = rng.integers(8, 160, size=2)
        category = int(rng.integers(1, 134))
        segment = category * 256 + index + 1
        ids[top : top + size[0], left : left + size[1]] = segment
        segments[segment] = category
    present = set(np.unique(ids).tolist())
    return ids, {s: c for s, c in segments.items() if s in present}


def ray_race(args: argparse.Namespace) -> dict[str, float]:
    """`bench train`'s race (Ray Train vs the plain loop), on the GPU unless on CPU."""
    from maxdeeplab.cli.bench import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = ["--variant", args.variant, "--crop", str(args.crop), "--batch", str(args.batches[0])]
    argv += ["--steps", str(args.ray_steps), "--warmup", str(args.warmup)]
    argv += ["--work-dir", args.work_dir, "--threads", str(min(os.cpu_count() or 1, 8))]
    argv += ["--synthetic-train", str(args.ray_images)]
    if args.device != "cpu":
        argv += ["--gpu", "--data-workers", "4"]
    return train.race(parser.parse_args(argv))
