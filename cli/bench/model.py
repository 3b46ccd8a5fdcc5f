"""`maxdeeplab bench model`: forward and training-step speed of a variant, eager vs channels_last vs
torch.compile, measured in one run on one device.

Each mode times, after warm-up steps:
- forward: an inference forward (eval mode, no_grad);
- train step: forward in train mode + a surrogate loss touching every output + backward + Adam step
  (the real criterion is timed by `maxdeeplab bench loss`; this isolates the network);
and reports images/s of the train step, peak memory (CUDA: max allocated; CPU: the process's peak
RSS, which only grows across modes) and GMACs (torch's FlopCounterMode, inference, batch 1 x B).
Eager is the reference: the other modes print their speed-up over it.
Goal: >= 25 train images/s for MaX-DeepLab-S at 641 with bf16 autocast on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="max_deeplab_s", help="model variant (default S)")
    parser.add_argument("--crop", type=int, default=641, help="crop side 16k+1 (default 641)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, median (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast in every mode")
    parser.add_argument("--checkpointing", action="store_true", help="recompute axial blocks")
    parser.add_argument("--no-aux", action="store_true", help="switch the aux semantic branch off")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument(
        "--against",
        choices=("deeplab2",),
        default=None,
        help="race deeplab2's own train step instead (`maxdeeplab bench deeplab2`; needs --env)",
    )
    parser.add_argument(
        "--env",
        default=os.environ.get("DEEPLAB2_ENV", ""),
        help="with --against deeplab2: the reference environment (default $DEEPLAB2_ENV)",
    )


def run(args: argparse.Namespace) -> int:
    if args.against == "deeplab2":
        from maxdeeplab.cli.bench import deeplab2

        if not args.threads:
            args.threads = 2
        return deeplab2.run(args)
    import torch

    from maxdeeplab.models.complexity import count_macs
    from maxdeeplab.models.network import build_model
    from maxdeeplab.models.strides import is_valid_crop_size
    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.errors import ConfigError

    if not is_valid_crop_size(args.crop):
        raise ConfigError(f"--crop {args.crop}: must be of the form 16k+1 (e.g. 65, 641, 1025)")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise ConfigError("--batch and --steps must be >= 1, --warmup >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    overrides = [f"model.variant={args.variant}", f"model.use_aux_semantic={not args.no_aux}"]
    cfg = load_experiment(None, overrides).model
    cfg.use_checkpointing = args.checkpointing
    with torch.device("meta"):
        macs = count_macs(build_model(cfg), args.crop)
    modes = ["eager"] + (["channels_last"] if args.channels_last else [])
    modes += ["compile"] if args.compile else []
    results: dict[str, Any] = {
        "variant": cfg.variant,
        "crop": args.crop,
        "batch": args.batch,
        "device": str(device),
        "amp": args.amp,
        "checkpointing": args.checkpointing,
        "aux": not args.no_aux,
        "gmacs_per_image": macs["total"] / 1e9,
        "threads": torch.get_num_threads(),
        "modes": {},
    }
    print(
        f"{cfg.variant} crop {args.crop} batch {args.batch} on {device}"
        f"{' (bf16 autocast)' if args.amp else ''}, {torch.get_num_threads()} CPU threads: "
        f"{macs['total'] / 1e9:.4g} GMACs/image ({macs['without_aux'] / 1e9:.4g} without the aux "
        "branch)"
    )
    for mode in modes:
        torch.manual_seed(0)
        timing = _time_mode(cfg, mode, args, device)
        results["modes"][mode] = timing
        base = results["modes"]["eager"]
        speedup = base["train_step_s"] / timing["train_step_s"]
        print(
            f"  {mode:<14} forward {timing['forward_s'] * 1e3:9.1f} ms   train step "
            f"{timing['train_step_s'] * 1e3:9.1f} ms   {timing['train_images_per_s']:7.2f} img/s"
            f"   peak {timing['peak_memory_gib']:6.2f} GiB ({timing['memory_kind']})"
            f"   x{speedup:.2f} vs eager"
        )
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def _time_mode(cfg: Any, mode: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from maxdeeplab.models.network import build_model

    model = build_model(cfg).to(device)
    images = torch.rand(args.batch, 3, args.crop, args.crop, device=device) * 255.0
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    forward: Callable[[Any], Any] = torch.compile(model) if mode == "compile" else model

    def autocast() -> AbstractContextManager[Any]:
        if not args.amp:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            forward(images)

    def train_step() -> None:
        model.train()
        with autocast():
            out = forward(images)
            loss = _surrogate_loss(out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forward_s = _median_time(infer, args.warmup, args.steps, device)
    train_s = _median_time(train_step, args.warmup, args.steps, device)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**30, "max allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
    return {
        "forward_s": forward_s,
        "train_step_s": train_s,
        "train_images_per_s": args.batch / train_s,
        "forward_images_per_s": args.batch / forward_s,
        "peak_memory_gib": peak,
        "memory_kind": kind,
    }


def _surrogate_loss(out: Any) -> Any:
    loss = out.class_logits.float().logsumexp(-1).mean() + out.mask_logits.float().square().mean()
    loss = loss + out.pixel_embed.float().mean()
    if out.semantic_logits is not None:
        loss = loss + out.semantic_logits.float().logsumexp(1).mean()
    return loss


def _median_time(fn: Callable[[], None], warmup: int, steps: int, device: Any) -> float:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
