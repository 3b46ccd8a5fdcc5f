"""Learning-rate schedule (docs/deeplab2.md#solver) and the backbone's 0.1x group."""

from __future__ import annotations

import math

import pytest
import torch

from maxdeeplab.models.config import ModelConfig, variant_overrides
from maxdeeplab.models.network import build_model, parameter_groups
from maxdeeplab.platform.config import OptimConfig
from maxdeeplab.platform.training.optim import build_optimizer, learning_rate, set_learning_rate


def test_warmup_is_linear_from_exactly_zero() -> None:
    kwargs = dict(base_lr=1e-3, total_steps=100_000, warmup_steps=5000, power=0.9)
    assert learning_rate(0, **kwargs) == 0.0
    assert learning_rate(2500, **kwargs) == pytest.approx(5e-4)
    assert learning_rate(4999, **kwargs) == pytest.approx(1e-3 * 4999 / 5000)


@pytest.mark.parametrize(
    ("total", "expected_ratio"), [(100_000, 0.955), (200_000, 0.977), (400_000, 0.989)]
)
def test_poly_uses_the_unshifted_step(total: int, expected_ratio: float) -> None:
    # At the end of the warmup the rate is base * (1 - 5000 / T) ** 0.9, not base
    # (docs/deeplab2.md#solver).
    lr = learning_rate(5000, base_lr=1.0, total_steps=total, warmup_steps=5000, power=0.9)
    assert lr == pytest.approx(expected_ratio, abs=5e-4)
    assert lr == pytest.approx((1 - 5000 / total) ** 0.9)


def test_poly_decays_to_end_lr_and_stays_there() -> None:
    kwargs = dict(base_lr=1e-3, total_steps=1000, warmup_steps=0, power=0.9, end_lr=1e-5)
    assert learning_rate(0, **kwargs) == pytest.approx(1e-3)
    mid = (1e-3 - 1e-5) * 0.5**0.9 + 1e-5
    assert learning_rate(500, **kwargs) == pytest.approx(mid)
    assert learning_rate(1000, **kwargs) == pytest.approx(1e-5)
    assert learning_rate(5000, **kwargs) == pytest.approx(1e-5)
    rates = [learning_rate(s, **kwargs) for s in range(0, 1001, 50)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))


def test_backbone_group_gets_a_tenth_of_the_rate() -> None:
    cfg = ModelConfig(**variant_overrides("max_deeplab_tiny"), num_classes=5)
    model = build_model(cfg)
    backbone, others = parameter_groups(model)
    assert backbone and others
    optim_cfg = OptimConfig(lr=2e-3, warmup_steps=10)
    optimizer = build_optimizer(backbone, others, optim_cfg)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["eps"] == 1e-7 and optimizer.defaults["weight_decay"] == 0.0
    base = set_learning_rate(optimizer, 5, optim_cfg, total_steps=100)
    assert base == pytest.approx(1e-3)
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert [by_id[id(p)] for p in backbone] == pytest.approx([1e-4] * len(backbone))
    assert [by_id[id(p)] for p in others] == pytest.approx([1e-3] * len(others))
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        1 for p in model.parameters() if p.requires_grad
    )
    # the encoder's transformer / memory parameters are not backbone
    # (docs/deeplab2.md#backbone-learning-rate)
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any("transformer" in names[id(p)] for p in backbone)
    assert any(names[id(p)].startswith("encoder.") for p in others)
    assert math.isclose(by_id[id(backbone[0])] / by_id[id(others[0])], 0.1)
