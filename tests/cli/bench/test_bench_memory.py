"""`maxdeeplab bench memory`: the subprocess peak, the breakdown by module group, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maxdeeplab.cli.bench.deeplab2 import race_targets
from maxdeeplab.cli.bench.memory_breakdown import LOSS_GROUP, SavedTensorCensus
from maxdeeplab.cli.main import main
from maxdeeplab.models.config import LossConfig
from maxdeeplab.models.losses.criterion import compute_losses
from maxdeeplab.models.network import build_model
from maxdeeplab.platform.config import load_experiment


def test_bench_memory_reports_the_peak_and_the_breakdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "memory.json"
    argv = "bench memory --variant max_deeplab_tiny --crop 65 --steps 1 --breakdown"
    assert main([*argv.split(), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["measure"] == "peak RSS" and results["ours_peak_mib"] > 100  # torch alone
    breakdown = results["breakdown"]
    groups = breakdown["saved_mib_by_group"]
    assert {"stem", "backbone stage5", "transformer", "decoder", "heads", LOSS_GROUP} <= set(groups)
    assert sum(groups.values()) == pytest.approx(breakdown["saved_mib_total"])
    assert "saved for backward" in capsys.readouterr().out


def test_census_charges_saved_tensors_to_module_groups() -> None:
    cfg = load_experiment(None, ["model.variant=max_deeplab_tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    census = SavedTensorCensus(model)
    images, targets = torch.rand(1, 3, 65, 65) * 255.0, race_targets(65, 1)
    totals = []
    for _ in range(2):  # each recording counts afresh
        with census.recording():
            output = model(images)
            compute_losses(output, targets, loss_cfg=LossConfig(), num_thing_classes=80)
        totals.append(dict(census.bytes))
    report = census.report(model)
    census.remove()
    # The network's part is the same each time; the criterion's varies by a few bytes with the
    # matching (how many masks it pairs depends on the model's state after the first pass's BN).
    network = [{k: v for k, v in t.items() if k != LOSS_GROUP} for t in totals]
    assert network[0] == network[1]
    assert totals[0][LOSS_GROUP] == pytest.approx(totals[1][LOSS_GROUP], rel=0.01)
    # The first stem conv saves the normalised image; the criterion saves its own tensors.
    assert census.bytes["stem"] >= 3 * 65 * 65 * 4 and census.bytes[LOSS_GROUP] > 0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report["training_state_mib"] == pytest.approx(4 * params / 2**20)
    assert report["largest_saved"][0]["mib"] >= report["largest_saved"][-1]["mib"] > 0


def test_bench_memory_errors() -> None:
    assert main(["bench", "memory", "--crop", "64"]) == 2  # not 16k + 1
    no_env = ["--against", "deeplab2", "--env", "/nonexistent", "--device", "cpu"]
    assert main(["bench", "memory", *no_env]) == 2
