"""`maxdeeplab bench deeplab2`: the training-step race against google-research/deeplab2.

Both sides run MaX-DeepLab-S at the same crop and batch with the same CPU thread count, in the same
invocation, one after the other:
- deeplab2: its own `trainer.Trainer` step (forward in training mode + DeepLabFamilyLoss + backward
  + its two Adam optimizers), in the reference environment (`scripts/deeplab2_env.sh`), through
  `scripts/deeplab2_train_step.py` in a subprocess;
- ours: forward in training mode + `compute_losses` (matching included) + backward + Adam over the
  backbone / other parameter groups (`build_optimizer`), on a ground truth with things and stuff.
Each is the median of `--steps` timed steps after one untimed step (deeplab2's first step traces its
tf.function). The ratio deeplab2 / ours > 1 means we are faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "deeplab2_train_step.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env",
        default=os.environ.get("DEEPLAB2_ENV", ""),
        help="the deeplab2 reference environment (default $DEEPLAB2_ENV)",
    )
    parser.add_argument("--crop", type=int, default=641, help="crop side 16k+1 (default 641)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, median (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads, both sides (2)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.models.strides import is_valid_crop_size
    from maxdeeplab.platform.errors import ConfigError

    if not args.env or not (Path(args.env) / "venv" / "bin" / "python").is_file():
        raise ConfigError(
            f"--env {args.env!r}: not a deeplab2 reference environment (no venv/bin/python); "
            "build one with scripts/deeplab2_env.sh and pass it or set DEEPLAB2_ENV"
        )
    if not is_valid_crop_size(args.crop) or args.batch < 1 or args.steps < 1:
        raise ConfigError("--crop must be 16k+1, --batch and --steps >= 1")
    theirs = _time_deeplab2(args)
    ours = _time_ours(args)
    ratio = theirs / ours
    print(
        f"MaX-DeepLab-S train step at {args.crop}, batch {args.batch}, {args.threads} threads: "
        f"deeplab2 {theirs:.2f} s, ours {ours:.2f} s -> ours is {ratio:.2f}x "
        f"{'faster' if ratio >= 1 else 'the speed'}"
    )
    if args.json:
        results = {"deeplab2_train_step_s": theirs, "ours_train_step_s": ours, "ratio": ratio}
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def reference_command(env_dir: Path, script_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The argument list and environment that run SCRIPT in the deeplab2 reference environment.

    What ENV_DIR/activate.sh (written by scripts/deeplab2_env.sh) sets, without a shell: paths
    stay single arguments, whatever characters they hold.
    """
    venv = env_dir / "venv"
    env = dict(os.environ, VIRTUAL_ENV=str(venv), TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PATH"] = os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(env_dir / "src"), os.environ.get("PYTHONPATH", "")) if p
    )
    return [str(venv / "bin" / "python"), str(SCRIPT), *script_args], env


def _time_deeplab2(args: argparse.Namespace) -> float:
    from maxdeeplab.platform.errors import MaXDeepLabError

    argv, env = reference_command(
        Path(args.env),
        ["--crop", str(args.crop), "--batch", str(args.batch), "--steps", str(args.steps)]
        + ["--threads", str(args.threads)],
    )
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise MaXDeepLabError(f"deeplab2 train step failed in {args.env}: {tail[0]}")
    return float(json.loads(lines[-1])["train_step_s"])


def _time_ours(args: argparse.Namespace) -> float:
    import torch

    from maxdeeplab.models.config import LossConfig, ModelConfig
    from maxdeeplab.models.losses.criterion import compute_losses
    from maxdeeplab.models.network import build_model, parameter_groups
    from maxdeeplab.platform.config import OptimConfig
    from maxdeeplab.platform.training.optim import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg).train()
    optimizer = build_optimizer(*parameter_groups(model), OptimConfig())
    images = torch.rand(args.batch, 3, args.crop, args.crop) * 255.0
    targets = race_targets(args.crop, args.batch)

    def step() -> None:
        losses = compute_losses(
            model(images), targets, loss_cfg=LossConfig(), num_thing_classes=cfg.num_thing_classes
        )
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def race_targets(crop: int, batch: int) -> Any:
    """Two stuff classes (halves) and eight thing boxes of four classes, every image the same."""
    import torch

    from maxdeeplab.models.structures import PanopticTargets

    semantic = torch.full((crop, crop), 101, dtype=torch.long)
    semantic[crop // 2 :] = 121
    thing_ids = torch.full((crop, crop), -1, dtype=torch.long)
    thing_classes = torch.full((128,), -1, dtype=torch.long)
    cell = crop // 4
    for index in range(8):
        row, col = divmod(index, 4)
        top, left = row * cell + 8, col * cell + 8
        semantic[top : top + cell // 2, left : left + cell // 2] = 1 + 10 * (index % 4)
        thing_ids[top : top + cell // 2, left : left + cell // 2] = index
        thing_classes[index] = 1 + 10 * (index % 4)
    return PanopticTargets(
        semantic=semantic.expand(batch, -1, -1).clone(),
        thing_ids=thing_ids.expand(batch, -1, -1).clone(),
        thing_classes=thing_classes.expand(batch, -1).clone(),
        pixel_weights=torch.ones(batch, crop, crop),
    )
