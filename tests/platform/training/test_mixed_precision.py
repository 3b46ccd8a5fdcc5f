"""bf16 autocast (`train.amp=bf16`) runs on CPU too, so CI covers the mixed-precision path.

A tiny model trained a few steps in bf16 (`step_once`, no Ray) ends within LOSS_TOLERANCE of the
same training in float32; the network's outputs are bf16 while the criterion's maths and the
matching run in float32 with autocast off; parameters, buffers and Adam's state (what a checkpoint
holds) stay float32.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import replace
from typing import Any

import pytest
import torch

from maxdeeplab.models.losses import criterion
from maxdeeplab.models.network import build_model, parameter_groups
from maxdeeplab.platform.config import ExperimentConfig, load_experiment
from maxdeeplab.platform.data.loader import build_loader, build_train_dataset
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.training.optim import build_optimizer
from maxdeeplab.platform.training.step import step_once
from maxdeeplab.platform.training.validation import autocast

STEPS = 6
# bf16 keeps 8 bits of mantissa: after STEPS Adam steps on one batch the total loss of a bf16 run
# stays within this relative distance of the float32 run (observed: under 0.1 %, 4.79 -> 3.69).
LOSS_TOLERANCE = 0.02
CPU = torch.device("cpu")
# The criterion's pieces that must see float32 inputs with autocast off.
CRITERION_PARTS = (
    "match_slots",
    "pq_class_term",
    "pq_dice_term",
    "mask_id_cross_entropy",
    "instance_discrimination_loss",
    "semantic_cross_entropy",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Any, int]:
    work = tmp_path_factory.mktemp("amp")
    cfg = load_experiment(
        None,
        [
            "model.variant=max_deeplab_tiny",
            "data.crop_size=65",
            "data.synthetic_train=4",
            "data.synthetic_val=1",
            "data.synthetic_size=[97,97]",
            f"work_dir={work}",
            "train.steps=100",
            "train.batch_size=2",
            "optim.warmup_steps=0",
            "optim.lr=2e-3",
        ],
    )
    train_set = build_train_dataset(cfg.data, cfg.loss, cache_dir=cfg.work_dir, seed=0)
    info = train_set.split.info
    cfg = replace(cfg, model=replace(cfg.model, num_classes=info.num_classes))
    batch = next(iter(build_loader(train_set, batch_size=2)))
    return cfg, batch, info.num_thing_classes


def _train(cfg: ExperimentConfig, batch: Any, num_thing_classes: int, amp: str) -> tuple:
    cfg = replace(cfg, train=replace(cfg.train, amp=amp))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(*parameter_groups(model), cfg.optim)
    batches = itertools.repeat(batch)
    totals = []
    for step in range(STEPS):
        result = step_once(
            model,
            optimizer,
            batches,
            step=step,
            passes=1,
            rank=0,
            cfg=cfg,
            num_thing_classes=num_thing_classes,
            device=CPU,
        )
        assert result.applied
        totals.append(float(result.losses["total"]))
    return totals, model, optimizer


def test_bf16_training_follows_float32_with_a_float32_criterion(setup, monkeypatch) -> None:
    cfg, batch, num_thing_classes = setup
    fp32, _, _ = _train(cfg, batch, num_thing_classes, "fp32")

    seen: dict[str, list[tuple[set[torch.dtype], bool]]] = {}

    def recorded(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            dtypes = {t.dtype for t in tensors if t.is_floating_point()}
            seen.setdefault(name, []).append((dtypes, torch.is_autocast_enabled("cpu")))
            return fn(*args, **kwargs)

        return wrapper

    for name in CRITERION_PARTS:
        monkeypatch.setattr(criterion, name, recorded(name, getattr(criterion, name)))
    outputs: list[torch.dtype] = []
    original = criterion._criterion

    def criterion_spy(output: Any, targets: Any, loss_cfg: Any) -> Any:
        outputs.append(output.mask_logits.dtype)
        losses, matching = original(output, targets, loss_cfg)
        assert {value.dtype for value in losses.values()} == {torch.float32}
        return losses, matching

    monkeypatch.setattr(criterion, "_criterion", criterion_spy)
    bf16, model, optimizer = _train(cfg, batch, num_thing_classes, "bf16")

    assert outputs == [torch.bfloat16] * STEPS  # the forward really ran under autocast
    assert set(seen) == set(CRITERION_PARTS)
    for name, calls in seen.items():
        assert all(dtypes == {torch.float32} and not on for dtypes, on in calls), (name, calls)
    relative = abs(bf16[-1] - fp32[-1]) / fp32[-1]
    assert relative < LOSS_TOLERANCE, (fp32, bf16)
    assert min(bf16[-3:]) < 0.8 * bf16[0], bf16  # and it trains
    tensors = list(model.state_dict().values())
    tensors += [t for s in optimizer.state_dict()["state"].values() for t in s.values()]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # an autocast object is all we need
def test_amp_modes() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert isinstance(autocast(cpu, "bf16"), torch.autocast)
    assert isinstance(autocast(cuda, "auto"), torch.autocast)
    assert not isinstance(autocast(cpu, "auto"), torch.autocast)  # CPU stays float32 by default
    assert not isinstance(autocast(cuda, "fp32"), torch.autocast)
    assert load_experiment(None, []).train.amp == "auto"
    # YAML booleans (run configs written before the modes) keep their meaning.
    assert load_experiment(None, ["train.amp=true"]).train.amp == "auto"
    assert load_experiment(None, ["train.amp=false"]).train.amp == "fp32"
    with pytest.raises(ConfigError, match="train.amp"):
        load_experiment(None, ["train.amp=fp16"])
