"""The batched criterion equals the bench's per-image deeplab2-style reference; the bench runs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from maxdeeplab.cli.bench import loss as bench_loss
from maxdeeplab.models.config import LossConfig
from maxdeeplab.models.losses.criterion import compute_losses


@pytest.mark.parametrize(
    ("slots", "masks", "negative_weighting"),
    [
        (16, 6, "void_ratio"),  # N < columns: deeplab2 pads void rows with +999
        (160, 6, "constant"),  # N > columns (128 + 8): void rows get -999
        (4, 12, "void_ratio"),  # more GT masks than slots: the unmatched-mask guard
    ],
)
def test_batched_criterion_equals_reference(
    slots: int, masks: int, negative_weighting: str
) -> None:
    gen = torch.Generator().manual_seed(slots + masks)
    targets = bench_loss.synthetic_targets(
        batch=3,
        crop=4 * 16 + 1,
        num_masks=masks,
        num_classes=14,
        num_thing_classes=6,
        generator=gen,
    )
    output = bench_loss.random_output(
        batch=3,
        slots=slots,
        size=17,
        num_classes=14,
        embed_dim=8,
        generator=gen,
        device=torch.device("cpu"),
    )
    cfg = LossConfig(negative_weighting=negative_weighting)
    batched = compute_losses(output, targets, loss_cfg=cfg, num_thing_classes=6)
    reference = bench_loss.reference_losses(output, targets, loss_cfg=cfg, num_thing_classes=6)
    for key, value in batched.items():
        assert torch.allclose(value, reference[key], rtol=1e-4, atol=1e-6), key

    # Same gradients too.
    grads = []
    for losses in (batched, reference):
        grads.append(
            torch.autograd.grad(losses["total"], [output.class_logits, output.mask_logits])
        )
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_bench_runs_small(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    bench_loss.add_arguments(parser)
    out = tmp_path / "loss.json"
    args = parser.parse_args(
        [
            "--batch",
            "2",
            "--slots",
            "8",
            "--size",
            "9",
            "--masks",
            "5",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--skip-step",
            "--json",
            str(out),
        ]
    )
    assert bench_loss.run(args) == 0
    results = json.loads(out.read_text())
    assert results["batched_s"] > 0 and results["reference_s"] > 0
