"""`loss.matcher = 'deeplab2'` against deeplab2 itself: its Hungarian solver and its loss.

deeplab2's float32 solver rounds similarity differences below ~6e-5 away
(docs/deeplab2.md#matching), so on weak predictions its assignment is often not the exact optimum
that our default finds. Here
deeplab2 runs in its own TensorFlow environment (`scripts/deeplab2_matching.py`, in a subprocess)
on random weak costs and on weak predictions, and the port must return exactly its assignments and,
through the loss, every loss term. Skipped unless DEEPLAB2_ENV names a reference environment built
by `scripts/deeplab2_env.sh` (CI has no TensorFlow).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from maxdeeplab.models.config import LossConfig, ModelConfig
from maxdeeplab.models.deeplab2_hungarian import (
    MATCHING_NEGATIVE_CONSTANT,
    MATCHING_POSITIVE_CONSTANT,
    deeplab2_hungarian,
)
from maxdeeplab.models.losses.criterion import compute_losses_and_matching
from maxdeeplab.models.structures import MaXDeepLabOutput, PanopticTargets
from maxdeeplab.models.targets import build_mask_targets

ROOT = Path(__file__).resolve().parents[2]
ENV = os.environ.get("DEEPLAB2_ENV", "")
COLUMNS, SLOTS, LOGITS = 181, 128, 134  # COCO: 128 thing ids + 53 stuff; MaX-S slots; 133 + void
LOSS_NAMES = {  # ours -> deeplab2's DeepLabFamilyLoss key (both already weighted)
    "pq_class": "pq_style_loss_class_term",
    "pq_dice": "pq_style_loss_mask_dice_term",
    "mask_id": "mask_id_cross_entropy_loss",
    "instance_discrimination": "instance_discrimination_loss",
    "semantic": "semantic_loss",
    "total": "total_loss",
}
LOSS_RELATIVE_TOLERANCE = 1e-4

pytestmark = pytest.mark.skipif(
    not ENV or not (Path(ENV) / "activate.sh").is_file(),
    reason="DEEPLAB2_ENV does not point to a deeplab2 reference environment "
    "(build one with scripts/deeplab2_env.sh)",
)


def _run_deeplab2(mode: str, inputs: dict[str, np.ndarray], folder: Path) -> dict[str, np.ndarray]:
    given, out = folder / f"{mode}_in.npz", folder / f"{mode}_out.npz"
    np.savez(given, **inputs)
    script = ROOT / "scripts" / "deeplab2_matching.py"
    command = f'source "{ENV}/activate.sh" && python "{script}" {mode} "{given}" "{out}"'
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(np.load(out))


def _layout_costs(
    rng: np.random.Generator, batch: int, rows: int, slots: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Costs as deeplab2's loss builds them: -similarity on a random set of valid rows, void rows
    at +999 (fewer slots than rows) or -999, padded to square with -999. Returns (costs, valid)."""
    valid = np.zeros((batch, rows), bool)
    for b in range(batch):
        valid[b, rng.choice(rows, size=rng.integers(1, min(rows, 60) + 1), replace=False)] = True
    similarity = (scale * rng.random((batch, rows, slots))).astype(np.float32)
    void = MATCHING_POSITIVE_CONSTANT if slots < rows else MATCHING_NEGATIVE_CONSTANT
    costs = np.where(valid[..., None], -similarity, np.float32(void)).astype(np.float32)
    size = max(rows, slots)
    padding = ((0, 0), (0, size - rows), (0, size - slots))
    return np.pad(costs, padding, constant_values=MATCHING_NEGATIVE_CONSTANT), valid


def test_hungarian_equals_deeplab2_on_weak_costs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases: dict[str, np.ndarray] = {}
    layouts: dict[str, tuple[np.ndarray, int]] = {}  # valid rows and slots of layout cases
    for scale in (1e-4, 1e-3, 1e-2, 1.0):  # weak (early training) to confident
        name = f"coco_{scale:g}"
        cases[name], valid = _layout_costs(rng, 4, COLUMNS, SLOTS, scale)
        layouts[name] = valid, SLOTS
    cases["tiny"], valid = _layout_costs(rng, 4, 130, 8, 1e-3)
    layouts["tiny"] = valid, 8
    cases["more_slots"], _ = _layout_costs(rng, 4, 20, 32, 1e-3)
    cases["square_ties"] = rng.integers(0, 4, (8, 12, 12)).astype(np.float32)
    cases["square"] = rng.normal(size=(8, 30, 30)).astype(np.float32)
    theirs = _run_deeplab2("hungarian", {f"weights_{k}": v for k, v in cases.items()}, tmp_path)

    not_optimal = {}
    for name, weights in cases.items():
        ours = deeplab2_hungarian(torch.from_numpy(weights)).numpy()
        assert np.array_equal(ours, theirs[f"permutation_{name}"]), name
        if name in layouts:  # how often deeplab2's choice is not the exact optimum
            valid, slots = layouts[name]
            not_optimal[name] = 0
            for costs, permutation, rows in zip(weights, ours, valid, strict=True):
                similarity = -costs[: len(rows), :slots][rows].astype(np.float64)
                best = similarity[linear_sum_assignment(similarity, maximize=True)].sum()
                chosen = (similarity * permutation[: len(rows), :slots][rows]).sum()
                not_optimal[name] += int(chosen < best)
    print("images where deeplab2's matching is not the exact optimum:", not_optimal)
    assert not_optimal["coco_0.0001"] > 0


CROP = 65  # stride 4 -> 17 x 17


def _ground_truth(batch: int) -> dict[str, np.ndarray]:
    """Four thing boxes on two stuff classes and a void box (deeplab2_reference's arrays)."""
    semantic = np.full((CROP, CROP), 81 + 20, np.int32)
    semantic[CROP // 2 :] = 81 + 40
    thing_ids = np.full((CROP, CROP), -1, np.int32)
    thing_classes = np.full(128, -1, np.int32)
    boxes = [(4, 4, 20, 24, 1), (10, 40, 28, 60, 5), (30, 8, 50, 20, 17), (40, 36, 60, 62, 1)]
    for instance, (top, left, bottom, right, klass) in enumerate(boxes):
        semantic[top:bottom, left:right] = klass
        thing_ids[top:bottom, left:right] = instance
        thing_classes[instance] = klass
    semantic[50:62, 2:14] = 0
    arrays = {"semantic": semantic, "thing_ids": thing_ids, "thing_classes": thing_classes}
    return {
        **{key: np.repeat(array[None], batch, axis=0) for key, array in arrays.items()},
        "pixel_weights": np.ones((batch, CROP, CROP), np.float32),
    }


def _weak_predictions(batch: int, seed: int) -> dict[str, np.ndarray]:
    """Near-uniform stride-4 outputs (NHWC, deeplab2's keys): similarities ~1e-4, as early on."""
    rng = np.random.default_rng(seed)
    side = (CROP - 1) // 4 + 1
    embed = rng.normal(size=(batch, side, side, 128))
    embed /= np.linalg.norm(embed, axis=-1, keepdims=True)
    arrays = {
        "transformer_class_logits": 0.1 * rng.normal(size=(batch, SLOTS, LOGITS)),
        "pixel_space_mask_logits": 0.1 * rng.normal(size=(batch, side, side, SLOTS)),
        "pixel_space_normalized_feature": embed,
        "semantic_logits": rng.normal(size=(batch, side, side, LOGITS)),
    }
    return {key: array.astype(np.float32) for key, array in arrays.items()}


def test_every_loss_term_equals_deeplab2_with_its_matcher(tmp_path: Path) -> None:
    """On weak predictions where the exact optimum differs from deeplab2's matching."""
    batch = 4
    gt, predictions = _ground_truth(batch), _weak_predictions(batch, seed=0)
    theirs = _run_deeplab2("loss", {**gt, **predictions}, tmp_path)
    targets = PanopticTargets(
        semantic=torch.from_numpy(gt["semantic"]).long(),
        thing_ids=torch.from_numpy(gt["thing_ids"]).long(),
        thing_classes=torch.from_numpy(gt["thing_classes"]).long(),
        pixel_weights=torch.from_numpy(gt["pixel_weights"]),
    )
    output = MaXDeepLabOutput(
        class_logits=torch.from_numpy(predictions["transformer_class_logits"]),
        mask_logits=_nchw(predictions["pixel_space_mask_logits"]),
        pixel_embed=_nchw(predictions["pixel_space_normalized_feature"]),
        semantic_logits=_nchw(predictions["semantic_logits"]),
    )
    model = ModelConfig()
    run = {
        matcher: compute_losses_and_matching(
            output,
            targets,
            loss_cfg=LossConfig(matcher=matcher),
            num_thing_classes=model.num_thing_classes,
        )
        for matcher in ("exact", "deeplab2")
    }
    side = (CROP - 1) // 4 + 1
    layout = build_mask_targets(
        targets,
        height=side,
        width=side,
        num_classes=model.num_classes,
        num_thing_classes=model.num_thing_classes,
        max_thing_id=LossConfig().max_thing_id,
    )

    # The solver alone, on the very costs deeplab2 built, padded to square as deeplab2 pads them.
    costs = torch.from_numpy(theirs["matched_weights"])  # B x 181 x 128
    their_permutation = torch.from_numpy(theirs["matched_permutation"]).bool()
    square = torch.nn.functional.pad(costs, (0, COLUMNS - SLOTS), value=MATCHING_NEGATIVE_CONSTANT)
    assert torch.equal(deeplab2_hungarian(square)[:, :, :SLOTS], their_permutation)

    # Our similarities equal deeplab2's up to float32 rounding, and the whole loss path gives its
    # matching with the switch; the default's exact optimum differs on these predictions.
    rows = layout.mask_columns.clamp(min=0).unsqueeze(2).expand(-1, -1, SLOTS)
    their_similarity = -costs.gather(1, rows)  # B x M x N
    ours = run["deeplab2"][1]
    difference = (ours.dice * ours.class_prob - their_similarity)[layout.mask_valid].abs().max()
    print(f"max |our similarity - deeplab2's|: {difference.item():.3g}")
    assert difference.item() < 1e-6
    their_matching = their_permutation & _deeplab2_rows(layout.mask_columns, layout.mask_valid)
    for name, (_, matching) in run.items():
        block = _deeplab2_layout(matching.mask_slot, layout.mask_columns, layout.mask_valid)
        assert torch.equal(block, their_matching) == (name == "deeplab2"), name

    means = {term: float(np.mean(theirs[f"loss_{key}"])) for term, key in LOSS_NAMES.items()}
    differences = {  # deeplab2 returns per-image terms; ours are batch means
        name: {
            term: abs(losses[term].item() - mean) / max(abs(mean), 1e-12)
            for term, mean in means.items()
        }
        for name, (losses, _) in run.items()
    }
    print("loss relative differences to deeplab2:", differences)
    assert all(d <= LOSS_RELATIVE_TOLERANCE for d in differences["deeplab2"].values())
    assert any(d > LOSS_RELATIVE_TOLERANCE for d in differences["exact"].values())


def _nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _deeplab2_rows(mask_columns: torch.Tensor, mask_valid: torch.Tensor) -> torch.Tensor:
    """B x rows x 1 bool: deeplab2's rows that hold a valid mask (its `mask_gt_non_void_mask`)."""
    rows = torch.zeros(mask_columns.shape[0], COLUMNS + 1, dtype=torch.bool)
    rows.scatter_(1, torch.where(mask_valid, mask_columns, COLUMNS), True)
    return rows[:, :COLUMNS, None]


def _deeplab2_layout(
    mask_slot: torch.Tensor, mask_columns: torch.Tensor, mask_valid: torch.Tensor
) -> torch.Tensor:
    """Compact mask -> slot assignments as deeplab2's B x rows x slots permutation block."""
    block = torch.zeros(mask_slot.shape[0], COLUMNS, SLOTS, dtype=torch.bool)
    image, row = torch.nonzero(mask_valid & (mask_slot >= 0), as_tuple=True)
    block[image, mask_columns[image, row], mask_slot[image, row]] = True
    return block
