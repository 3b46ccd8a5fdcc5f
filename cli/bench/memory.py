"""`maxdeeplab bench memory`: the peak memory of a training step, ours vs a reference.

Each side runs in a fresh subprocess (so nothing of one is in the other's peak) that builds the
model and its optimiser and runs `--steps` training steps (forward in training mode, the loss with
its matching, backward, the optimiser; the first step also allocates Adam's state) on one synthetic
batch of `--batch` crops of `--crop` pixels:
- ours: `platform/training/step.py` `train_step`, the production step (train.amp as `--amp` says);
- `--against deeplab2`: deeplab2's own `trainer.Trainer` step (`scripts/deeplab2_train_step.py`)
  in its reference environment (`--env` or $DEEPLAB2_ENV, CPU only);
- `--against checkpointing`: ours again with `model.use_checkpointing` on (recompute the axial
  blocks in backward): memory saved and time added, as ratios (`--against checkpointing deeplab2`
  runs both references; deeplab2 recomputes its axial blocks by default).

What is measured: on CPU, the child process's peak resident set size (`ru_maxrss` from `wait4`),
which is everything the process ever held at once: the interpreter, the framework, the model, its
gradients and optimiser state and the step's activations (nothing subtracted; TensorFlow's runtime
is larger than PyTorch's, which counts against deeplab2). On GPU, `torch.cuda.max_memory_allocated`.
The ratio printed last is deeplab2 / ours: above 1 means we need less.

`--breakdown` adds, for ours, the bytes saved for backward per part of the network
(`memory_breakdown.py`). Results and commands: docs/benchmarks.md#memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEEPLAB2_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "deeplab2_train_step.py"
MIB = 2.0**20
RU_MAXRSS_UNIT = 1024  # bytes per unit of ru_maxrss on Linux (KiB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="max_deeplab_s", help="model variant (default S)")
    parser.add_argument("--crop", type=int, default=641, help="crop side 16k+1 (default 641)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per side (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads, both sides (2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--amp", action="store_true", help="ours: bf16 autocast (train.amp=bf16)")
    parser.add_argument("--checkpointing", action="store_true", help="ours: recompute axial blocks")
    parser.add_argument(
        "--against",
        nargs="+",
        choices=("deeplab2", "checkpointing"),
        help="references: deeplab2's own step, and/or ours with checkpointing",
    )
    parser.add_argument(
        "--env",
        default=os.environ.get("DEEPLAB2_ENV", ""),
        help="with --against deeplab2: the reference environment (default $DEEPLAB2_ENV)",
    )
    parser.add_argument("--breakdown", action="store_true", help="ours: saved bytes per part")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.models.strides import is_valid_crop_size
    from maxdeeplab.platform.errors import ConfigError

    if not is_valid_crop_size(args.crop) or args.batch < 1 or args.steps < 1:
        raise ConfigError("--crop must be 16k+1 (e.g. 641, 1025), --batch and --steps >= 1")
    if args.child:
        return _child(args)
    device = _device(args.device)
    against = args.against or []
    if "deeplab2" in against:
        if device != "cpu":
            raise ConfigError("--against deeplab2: its environment is CPU-only; use --device cpu")
        deeplab2_python(args.env)  # before minutes of our side
    what = "peak RSS" if device == "cpu" else "CUDA max allocated"
    print(
        f"bench memory: {args.variant} crop {args.crop} batch {args.batch}, {args.steps} steps, "
        f"{device} ({what}), {args.threads} threads{', bf16' if args.amp else ''}"
    )
    ours = measure_ours(args, device, checkpointing=args.checkpointing)
    _print_side("ours" + (", checkpointing" if args.checkpointing else ""), ours)
    results: dict[str, Any] = {
        "variant": args.variant,
        "crop": args.crop,
        "batch": args.batch,
        "steps": args.steps,
        "device": device,
        "measure": what,
        "amp": args.amp,
        "checkpointing": args.checkpointing,
        "ours_peak_mib": ours["peak_mib"],
        "ours_step_s": ours["step_s"],
    }
    if args.breakdown:
        results["breakdown"] = ours["breakdown"]
        _print_breakdown(ours["breakdown"])
    lines = []
    if "checkpointing" in against and not args.checkpointing:
        recomputed = measure_ours(args, device, checkpointing=True)
        _print_side("ours, checkpointing", recomputed)
        results.update(
            checkpointing_peak_mib=recomputed["peak_mib"],
            checkpointing_step_s=recomputed["step_s"],
            memory_ratio=recomputed["peak_mib"] / ours["peak_mib"],
            time_ratio=recomputed["step_s"] / ours["step_s"],
        )
        lines.append(
            f"  checkpointing: peak x{results['memory_ratio']:.3f}, "
            f"step time x{results['time_ratio']:.3f}"
        )
    if "deeplab2" in against:
        theirs = measure_deeplab2(args)
        _print_side("deeplab2", theirs)
        results.update(deeplab2_peak_mib=theirs["peak_mib"], deeplab2_step_s=theirs["step_s"])
        results["ratio"] = theirs["peak_mib"] / ours["peak_mib"]
        if "checkpointing_peak_mib" in results:
            # deeplab2 recomputes its axial blocks too (axial_use_recompute_grad): like for like.
            results["ratio_checkpointing"] = theirs["peak_mib"] / results["checkpointing_peak_mib"]
            lines.append(
                f"  ratio deeplab2 / ours with checkpointing: {results['ratio_checkpointing']:.3f}"
            )
        verdict = "meets" if results["ratio"] >= 1 else "misses"
        lines.append(f"  ratio deeplab2 / ours peak: {results['ratio']:.3f} ({verdict} the goal)")
    for line in lines:  # the ratios last
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_ours(args: argparse.Namespace, device: str, *, checkpointing: bool) -> dict[str, Any]:
    """Our training step in a fresh `maxdeeplab bench memory --child` process."""
    argv = [sys.executable, "-m", "maxdeeplab.cli", "bench", "memory", "--child"]
    argv += ["--variant", args.variant, "--crop", str(args.crop), "--batch", str(args.batch)]
    argv += ["--steps", str(args.steps), "--threads", str(args.threads), "--device", device]
    argv += ["--amp"] * args.amp + ["--checkpointing"] * checkpointing
    argv += ["--breakdown"] * args.breakdown
    report, rss_mib = run_measured(argv, None, "our training step")
    report["peak_mib"] = report.get("cuda_peak_mib", rss_mib)
    return report


def deeplab2_python(env: str) -> Path:
    """The reference environment's interpreter.

    Raises:
        ConfigError: `env` is not an environment built by scripts/deeplab2_env.sh.
    """
    from maxdeeplab.platform.errors import ConfigError

    python = Path(env) / "venv" / "bin" / "python"
    if not env or not python.is_file() or not (Path(env) / "src" / "deeplab2").is_dir():
        raise ConfigError(
            f"--env {env!r}: not a deeplab2 reference environment (no venv/bin/python and "
            "src/deeplab2); build one with scripts/deeplab2_env.sh and pass it or set DEEPLAB2_ENV"
        )
    return python


def measure_deeplab2(args: argparse.Namespace) -> dict[str, Any]:
    """deeplab2's training step (its first step traces the tf.function) in its environment."""
    python = deeplab2_python(args.env)
    env_dir = Path(args.env)
    env = dict(os.environ, PYTHONPATH=str(env_dir / "src"))
    env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    argv = [str(python), str(DEEPLAB2_SCRIPT), "--variant", args.variant, "--crop", str(args.crop)]
    argv += ["--batch", str(args.batch), "--threads", str(args.threads)]
    argv += ["--steps", str(max(args.steps - 1, 1))]  # after its first (tracing) step
    report, rss_mib = run_measured(argv, env, "deeplab2's training step")
    return {"peak_mib": rss_mib, "step_s": report["train_step_s"]}


def run_measured(
    argv: list[str], env: dict[str, str] | None, what: str
) -> tuple[dict[str, Any], float]:
    """Run `argv`; return its last JSON line on stdout and its peak RSS in MiB.

    Raises:
        MaXDeepLabError: the process failed (killed, e.g. out of memory, or an error).
    """
    from maxdeeplab.platform.errors import MaXDeepLabError

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        # wait4 gives this child's own resource usage (RUSAGE_CHILDREN would be the maximum over
        # every child this process ever waited for).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    rss_mib = usage.ru_maxrss * RU_MAXRSS_UNIT / MIB
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        if process.returncode < 0:
            reason = f"killed by signal {-process.returncode} at {rss_mib:.0f} MiB (out of memory?)"
        else:
            reason = (stderr.strip().splitlines() or ["no output"])[-1]
        raise MaXDeepLabError(f"{what} failed: {reason}")
    return json.loads(lines[-1]), rss_mib


def _print_side(name: str, report: dict[str, Any]) -> None:
    print(f"  {name:<22} peak {report['peak_mib']:9.0f} MiB   step {report['step_s']:7.2f} s")
    sys.stdout.flush()


def _print_breakdown(breakdown: dict[str, Any]) -> None:
    print(
        f"  saved for backward: {breakdown['saved_mib_total']:.0f} MiB; parameters + gradients "
        f"+ Adam: {breakdown['training_state_mib']:.0f} MiB"
    )
    for group, mib in breakdown["saved_mib_by_group"].items():
        print(f"    {group:<24} {mib:9.1f} MiB")
    print("  largest saved tensors:")
    for item in breakdown["largest_saved"]:
        shape = " x ".join(map(str, item["shape"]))
        print(f"    {item['mib']:8.1f} MiB  {item['group']:<24} {shape} {item['dtype']}")


def _child(args: argparse.Namespace) -> int:
    """One side's process: build, run the steps, print one JSON line (the parent reads RSS)."""
    import torch

    from maxdeeplab.cli.bench.deeplab2 import race_targets
    from maxdeeplab.cli.bench.memory_breakdown import SavedTensorCensus
    from maxdeeplab.models.network import build_model, parameter_groups
    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.training.optim import build_optimizer
    from maxdeeplab.platform.training.step import train_step

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_experiment(
        None,
        [
            f"model.variant={args.variant}",
            f"model.use_checkpointing={args.checkpointing}",
            f"data.crop_size={args.crop}",
            f"train.batch_size={args.batch}",
            f"train.amp={'bf16' if args.amp else 'fp32'}",
        ],
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device).train()
    optimizer = build_optimizer(*parameter_groups(model), cfg.optim)
    targets = race_targets(args.crop, args.batch)
    batch = {
        "image": torch.rand(args.batch, 3, args.crop, args.crop) * 255.0,
        "semantic": targets.semantic,
        "thing_ids": targets.thing_ids,
        "thing_classes": targets.thing_classes,
        "pixel_weights": targets.pixel_weights,
    }
    census = SavedTensorCensus(model) if args.breakdown else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.steps):
        last = step == args.steps - 1
        start = time.perf_counter()
        with census.recording() if census is not None and last else contextlib.nullcontext():
            train_step(
                model,
                optimizer,
                [batch],
                step=step,
                cfg=cfg,
                num_thing_classes=cfg.model.num_thing_classes,
                device=device,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    # The first step also allocates Adam's state (and traces, for deeplab2): the fastest other.
    report: dict[str, Any] = {"step_s": min(times[1:]) if len(times) > 1 else times[0]}
    if device.type == "cuda":
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    if census is not None:
        report["breakdown"] = census.report(model)
    print(json.dumps(report))
    return 0
