"""What a training run shows and logs as it goes: progress lines, ETA, the PQ tables.

Rank 0 prints through a logger of its own (`console_logger`); each line carries `CONSOLE_MARKER`,
by which the launcher tells them from Ray's own worker output (`platform/training/launch.py`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from maxdeeplab.models.losses.criterion import LOSS_KEYS
from maxdeeplab.platform import tracking
from maxdeeplab.platform.data.coco import DatasetInfo
from maxdeeplab.platform.eval.report import format_per_class, format_table
from maxdeeplab.platform.training.checkpoint import TrainingState

if TYPE_CHECKING:  # for annotations only: loop.py imports this module
    from maxdeeplab.platform.training.step import StepResult
    from maxdeeplab.platform.training.validation import EvalResult

CONSOLE_MARKER = "[maxdeeplab]"  # the launcher shows only worker lines carrying it (Ray noise)


def marked_text(line: str) -> str | None:
    """What a console line of the loop says (the text after the marker), else None."""
    if CONSOLE_MARKER not in line:
        return None
    return line.split(CONSOLE_MARKER, 1)[1][1:]  # "<marker> <text>": the marker and its space


def log_evaluation(
    evaluation: EvalResult,
    step: int,
    info: DatasetInfo,
    console: logging.Logger | None,
    logger: tracking.RunLogger | None,
    *,
    final: bool,
) -> None:
    """Rank 0: the PQ line (and, at the end, the tables) on the console and into MLflow."""
    if console is None:
        return
    m = evaluation.metrics(info)
    console.info(
        "%s eval step %d: PQ %.1f  PQ_th %.1f  PQ_st %.1f  SQ %.1f  RQ %.1f  (pipeline PQ %.1f)",
        CONSOLE_MARKER,
        step,
        *(100 * m[k] for k in tracking.VAL_METRICS),
    )
    names = {c.id: c.name for c in info.categories}
    table = format_table(evaluation.official)
    per_class = format_per_class(evaluation.official, names)
    if final:
        for line in (table + "\n\n" + per_class).splitlines():
            console.info("%s %s", CONSOLE_MARKER, line)
    if logger is not None and not logger.is_replay(tracking.VAL_PQ, step):
        logger.log_metrics(m, step=step)
        logger.log_text(f"{table}\n\n{per_class}\n", f"pq/step_{step:09d}.txt")
        for index, image in enumerate(evaluation.visualizations):
            logger.log_image(image, f"predictions/step_{step:09d}_{index}.png")


class Meter:
    """Loss averages, images/s and ETA over a log interval (rank-averaged at flush time)."""

    def __init__(self, now: float, step: int) -> None:
        self.start, self.start_step = now, step
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.lr = 0.0
        self.excluded = 0.0  # seconds spent in evaluation/checkpoints since the last flush

    def add(self, result: StepResult) -> None:
        """Count a step's losses (if it was applied) and its learning rate."""
        if result.applied:
            for key, value in result.losses.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
            self.count += 1
        self.lr = result.lr

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (evaluation, checkpoints) out of the rate."""
        self.excluded += seconds

    def flush(
        self, state: TrainingState, batch_size: int, total: int, console: logging.Logger | None
    ) -> dict[str, float]:
        """The interval's metrics, averaged over ranks (every rank calls it); rank 0 prints them."""
        now = time.perf_counter()
        keys = list(LOSS_KEYS)
        values = torch.stack([torch.as_tensor(self.sums.get(k, 0.0)).float().cpu() for k in keys])
        stats = torch.cat([values, torch.tensor([float(self.count)])])
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            stats = stats.to(device)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            stats = stats.cpu()
        # No applied step in the interval (all non-finite): the mean loss is undefined.
        count = float(stats[-1]) or float("nan")
        losses = {
            tracking.loss_metric(k): float(v) / count for k, v in zip(keys, stats, strict=False)
        }
        elapsed = max(now - self.start - self.excluded, 1e-9)
        images_per_s = (state.step - self.start_step) * batch_size / elapsed
        metrics = {
            **losses,
            tracking.TRAIN_LR: self.lr,
            tracking.TRAIN_IMAGES_PER_S: images_per_s,
            tracking.TRAIN_BAD_STEPS: float(state.bad_steps_total),
        }
        if console is not None:
            remaining = (total - state.step) * batch_size / max(images_per_s, 1e-9)
            console.info(
                "%s step %d/%d  loss %.4f  lr %.2e  %.1f img/s  ETA %s",
                CONSOLE_MARKER,
                state.step,
                total,
                losses[tracking.LOSS_TOTAL],
                self.lr,
                images_per_s,
                format_duration(remaining),
            )
        self.sums, self.count, self.excluded = {}, 0, 0.0
        self.start, self.start_step = now, state.step
        return metrics


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def console_logger(prefix: str = "") -> logging.Logger:
    """Rank 0's progress logger, printing plain lines to stdout whatever Ray configured.

    Args:
        prefix: follows the marker on every line (`[maxdeeplab] [lr=0.002] step ...`): a sweep
            names the trial each line comes from.
    """
    console = logging.getLogger("maxdeeplab.progress")
    if not console.handlers:
        console.addHandler(logging.StreamHandler())
        console.setLevel(logging.INFO)
        console.propagate = False
    for handler in console.handlers:  # one process may run several runs (Ray Train local mode)
        handler.setFormatter(_PrefixFormatter(prefix))
    return console


class _PrefixFormatter(logging.Formatter):
    """`[maxdeeplab] step ...` -> `[maxdeeplab] <prefix> step ...` (launch.py drops the marker)."""

    def __init__(self, prefix: str) -> None:
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.prefix:
            return text
        return text.replace(CONSOLE_MARKER, f"{CONSOLE_MARKER} {self.prefix}", 1)
