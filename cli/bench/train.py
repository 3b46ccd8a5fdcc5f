"""`maxdeeplab bench train`: the step rate inside a 1-worker Ray TorchTrainer vs a plain loop.

Both sides run the same code (`timed_steps`: the synthetic loader, the model,
`step.step_once`) with the same thread count, on the same device (CPU, or one GPU with `--gpu`), in
the same invocation; only the process differs: this one, or a Ray Train worker actor. The plain
loop runs before and after the Ray run and the faster of the two is the reference (conservative
when the machine's load drifts). Goal: Ray >= 0.95x the plain loop. Warm-up steps (allocator,
oneDNN kernel selection) are not timed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used at run time: `maxdeeplab --help` stays fast
    from maxdeeplab.platform.config import ExperimentConfig

GOAL = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="max_deeplab_tiny", help="model.variant")
    parser.add_argument("--crop", type=int, default=129, help="data.crop_size (16k+1)")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (= worker CPUs)"
    )
    parser.add_argument("--work-dir", default="runs/bench", help="synthetic data cache")
    parser.add_argument("--synthetic-train", type=int, default=200, help="synthetic images (200)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster")
    parser.add_argument("--gpu", action="store_true", help="both sides on one GPU")
    parser.add_argument("--data-workers", type=int, default=0, help="loader processes (0)")


def bench_experiment(args: argparse.Namespace) -> ExperimentConfig:
    from maxdeeplab.platform.config import load_experiment

    return load_experiment(
        None,
        [
            f"model.variant={args.variant}",
            f"data.crop_size={args.crop}",
            f"train.batch_size={args.batch}",
            f"train.steps={args.warmup + args.steps}",
            f"data.num_workers={args.data_workers}",
            f"work_dir={os.path.abspath(args.work_dir)}",
            f"data.synthetic_train={args.synthetic_train}",
            "data.synthetic_val=1",  # never evaluated
            f"resources.cpus_per_worker={args.threads}",
        ],
    )


def plain_loop(
    cfg: ExperimentConfig, device: Any = None
) -> tuple[Any, Any, Any, Callable[[int], None]]:
    """A model, its optimiser, the batch stream and `step(i)`: the loop without Ray, on `device`
    (default CPU)."""
    import torch

    from maxdeeplab.models.network import build_model, parameter_groups
    from maxdeeplab.platform.config import cache_dir
    from maxdeeplab.platform.data.loader import build_loader, build_train_dataset, iterate_from
    from maxdeeplab.platform.training.optim import build_optimizer
    from maxdeeplab.platform.training.step import step_once

    train_set = build_train_dataset(cfg.data, cfg.loss, cache_dir=cache_dir(cfg), seed=cfg.seed)
    info = train_set.split.info
    cfg = replace(cfg, model=replace(cfg.model, num_classes=info.num_classes))
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(*parameter_groups(model), cfg.optim)
    loader = build_loader(
        train_set, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers
    )
    batches = iterate_from(loader, 0)

    def step(index: int) -> None:
        step_once(
            model,
            optimizer,
            batches,
            step=index,
            passes=1,
            rank=0,
            cfg=cfg,
            num_thing_classes=info.num_thing_classes,
            device=device,
        )

    return model, optimizer, batches, step


def timed_steps(
    cfg: ExperimentConfig, *, steps: int, warmup: int, threads: int, device: Any = None
) -> float:
    """Training steps per second over `steps` steps after `warmup` untimed ones."""
    import torch

    torch.set_num_threads(threads)
    device = device or torch.device("cpu")
    _, _, _, step = plain_loop(cfg, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = 0.0
    for index in range(warmup + steps):
        if index == warmup:
            sync()
            start = time.perf_counter()
        step(index)
    sync()
    return steps / (time.perf_counter() - start)


def _ray_worker(config: dict[str, Any]) -> None:
    import tempfile

    import ray.train
    import ray.train.torch

    rate = timed_steps(
        config["cfg"],
        steps=config["steps"],
        warmup=config["warmup"],
        threads=config["threads"],
        device=ray.train.torch.get_device(),
    )
    with tempfile.TemporaryDirectory() as directory:
        # Result.metrics holds the last report that carried a checkpoint
        # (docs/architecture.md#exact-resume).
        ray.train.report(
            {"steps_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(directory)
        )


def ray_steps_per_s(cfg: ExperimentConfig, args: argparse.Namespace) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "cfg": cfg,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
        },
        scaling_config=ScalingConfig(
            num_workers=1,
            use_gpu=args.gpu,
            resources_per_worker={"CPU": args.threads},
        ),
        run_config=RunConfig(
            name=f"bench-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=os.path.join(cfg.work_dir, "ray"),
        ),
    )
    metrics = trainer.fit().metrics or {}  # None only if the worker never reported
    return float(metrics["steps_per_s"])


def run(args: argparse.Namespace) -> int:
    race(args)
    return 0


def race(args: argparse.Namespace) -> dict[str, float]:
    """The plain loop, Ray Train, the plain loop again: steps/s of each, and Ray / plain."""
    import ray
    import torch

    from maxdeeplab.platform.training.launch import prepare_experiment, start_ray

    cfg = prepare_experiment(bench_experiment(args))  # generates the synthetic set once
    device = torch.device("cuda" if args.gpu else "cpu")
    print(
        f"bench train: {args.variant}, crop {args.crop}, batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup}, {args.threads} threads, {device}"
    )
    kwargs = dict(steps=args.steps, warmup=args.warmup, threads=args.threads, device=device)
    plain_before = timed_steps(cfg, **kwargs)
    print(f"  plain loop (before): {plain_before:7.3f} steps/s")
    if not ray.is_initialized():
        start_ray(args.address, quiet=True)
    in_ray = ray_steps_per_s(cfg, args)
    print(f"  Ray Train, 1 worker: {in_ray:7.3f} steps/s")
    plain_after = timed_steps(cfg, **kwargs)
    print(f"  plain loop (after):  {plain_after:7.3f} steps/s")
    # The faster plain run is the reference: conservative when the machine's load drifts.
    plain = max(plain_before, plain_after)
    ratio = in_ray / plain
    print(f"  images/s: plain {plain * args.batch:.2f}, Ray {in_ray * args.batch:.2f}")
    verdict = "meets" if ratio >= GOAL else "misses"
    print(f"  ratio Ray / plain:   {ratio:7.3f}  ({verdict} the goal >= {GOAL})")
    return {
        "plain_before_steps_per_s": plain_before,
        "ray_steps_per_s": in_ray,
        "plain_after_steps_per_s": plain_after,
        "ratio": ratio,
    }
