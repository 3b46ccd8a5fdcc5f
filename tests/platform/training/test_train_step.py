"""`train_step`, `evaluate` and checkpoints without Ray (tiny variant, synthetic data, crop 65)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from maxdeeplab.models.network import build_model, parameter_groups
from maxdeeplab.platform.config import ExperimentConfig, load_experiment
from maxdeeplab.platform.data.loader import (
    build_eval_dataset,
    build_loader,
    build_train_dataset,
    iterate_from,
)
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.training.checkpoint import (
    TrainingState,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from maxdeeplab.platform.training.optim import build_optimizer
from maxdeeplab.platform.training.step import micro_batching, step_once, train_step
from maxdeeplab.platform.training.validation import evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, object, object]:
    work = tmp_path_factory.mktemp("train_step")
    cfg = load_experiment(
        None,
        [
            "model.variant=max_deeplab_tiny",
            "data.crop_size=65",
            "data.synthetic_train=8",
            "data.synthetic_val=4",
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
    return cfg, train_set, info


def fresh(cfg: ExperimentConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return model, build_optimizer(*parameter_groups(model), cfg.optim)


def test_train_step_decreases_the_loss_on_a_fixed_batch(setup) -> None:
    cfg, train_set, info = setup
    batch = next(iter(build_loader(train_set, batch_size=2)))
    model, optimizer = fresh(cfg)
    totals = []
    batches = itertools.repeat(batch)
    for step in range(12):
        result = step_once(
            model,
            optimizer,
            batches,
            step=step,
            passes=1,
            rank=0,
            cfg=cfg,
            num_thing_classes=info.num_thing_classes,
            device=CPU,
        )
        assert result.applied
        totals.append(float(result.losses["total"]))
    assert all(math.isfinite(t) for t in totals)
    assert min(totals[-3:]) < 0.8 * totals[0], totals


def test_non_finite_loss_skips_the_update(setup) -> None:
    cfg, train_set, info = setup
    batch = next(iter(build_loader(train_set, batch_size=2)))
    model, optimizer = fresh(cfg)
    poisoned = next(p for p in model.mask_class_head.parameters() if p.dim() > 1)
    with torch.no_grad():
        poisoned.fill_(float("nan"))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}  # buffers too
    result = train_step(
        model,
        optimizer,
        [batch],
        step=0,
        cfg=replace(cfg, optim=replace(cfg.optim, warmup_steps=0)),
        num_thing_classes=info.num_thing_classes,
        device=CPU,
    )
    assert not result.applied
    assert not math.isfinite(float(result.losses["total"]))
    # exactly as before the step: parameters and BatchNorm's running statistics (which the
    # forward pass in train mode had already updated)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) or torch.isnan(before[name]).any(), name
    assert not optimizer.state  # Adam never stepped


def test_gradient_accumulation_splits_the_batch() -> None:
    assert micro_batching(64, 8, 0) == (8, 1)
    assert micro_batching(64, 8, 2) == (2, 4)
    assert micro_batching(8, 2, 1) == (1, 4)
    with pytest.raises(ConfigError, match="resources.num_workers"):
        micro_batching(10, 4, 0)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        micro_batching(8, 2, 3)


def test_evaluate_reports_pq_of_the_val_split(setup) -> None:
    cfg, _, info = setup
    eval_set = build_eval_dataset(cfg.data, cache_dir=cfg.work_dir)
    loader = build_loader(eval_set, batch_size=2, train=False)
    model, _ = fresh(cfg)
    result = evaluate(model, loader, cfg=cfg, info=info, device=CPU, num_visualizations=2)
    groups = result.official.groups
    # every val category appears as ground truth, so all of them count (as FN at least)
    assert groups["All"]["n"] == groups["Things"]["n"] + groups["Stuff"]["n"] > 0
    assert 0.0 <= result.official.pq <= 1.0 and 0.0 <= result.pipeline.pq <= 1.0
    fn = sum(c["fn"] for c in result.official.per_class.values())
    assert fn > 0
    assert len(result.visualizations) == 2
    image = result.visualizations[0]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    metrics = result.metrics(info)
    assert {"val/pq", "val/pq_thing", "val/pq_stuff", "val/sq", "val/rq", "val/pq_pipeline"} <= set(
        metrics
    )
    assert any(k.startswith("val/pq_class/") for k in metrics)
    assert model.training  # evaluate restores the mode


def test_checkpoint_round_trip(setup, tmp_path: Path) -> None:
    cfg, train_set, info = setup
    batch = next(iter(build_loader(train_set, batch_size=2)))
    model, optimizer = fresh(cfg)
    train_step(
        model,
        optimizer,
        [batch],
        step=3,
        cfg=cfg,
        num_thing_classes=info.num_thing_classes,
        device=CPU,
    )
    state = TrainingState(step=4, bad_steps_in_a_row=1, bad_steps_total=2)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, state=state, extra={"k": "v"})
    other, other_optimizer = fresh(replace(cfg, seed=1))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    restored, extra = load_checkpoint(tmp_path, model=other, optimizer=other_optimizer)
    assert restored == state and extra == {"k": "v"}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert other_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    weights = load_model_weights(tmp_path)
    assert weights.keys() == model.state_dict().keys()


def test_resuming_from_a_checkpoint_replays_the_same_steps(setup, tmp_path: Path) -> None:
    """Steps 0-3 in one go equal steps 0-1, save, restore into a fresh model, steps 2-3."""
    cfg, train_set, info = setup

    def run(model, optimizer, start: int, stop: int) -> None:
        batches = iterate_from(build_loader(train_set, batch_size=2), start)
        for step in range(start, stop):
            step_once(
                model,
                optimizer,
                batches,
                step=step,
                passes=1,
                rank=0,
                cfg=cfg,
                num_thing_classes=info.num_thing_classes,
                device=CPU,
            )

    model, optimizer = fresh(cfg)
    run(model, optimizer, 0, 4)
    model_a, optimizer_a = fresh(cfg)
    run(model_a, optimizer_a, 0, 2)
    save_checkpoint(tmp_path, model=model_a, optimizer=optimizer_a, state=TrainingState(step=2))
    model_b, optimizer_b = fresh(cfg)
    state, _ = load_checkpoint(tmp_path, model=model_b, optimizer=optimizer_b)
    run(model_b, optimizer_b, state.step, 4)
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
