"""MaX-DeepLab losses: each term by hand, invariances, gradients, edge cases.

See docs/deeplab2.md#losses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maxdeeplab.models.config import LossConfig
from maxdeeplab.models.losses.criterion import (
    LOSS_KEYS,
    compute_losses,
    compute_losses_and_matching,
    losses_are_finite,
)
from maxdeeplab.models.losses.instance_discrimination import instance_discrimination_loss
from maxdeeplab.models.losses.mask_id import mask_id_cross_entropy
from maxdeeplab.models.losses.pq_style import (
    class_term_weights,
    pq_class_term,
    pq_dice_term,
    void_ratio,
)
from maxdeeplab.models.losses.reduction import mean_over_nonzero
from maxdeeplab.models.losses.semantic import semantic_cross_entropy
from maxdeeplab.models.structures import MaXDeepLabOutput, PanopticTargets

K, THINGS = 5, 3  # semantic 1-3 things, 4-5 stuff
CROP = 21  # stride 4 -> 6 x 6


def _log_softmax(values: list[float], index: int) -> float:
    return values[index] - math.log(sum(math.exp(v) for v in values))


# ---------------------------------------------------------------- each term by hand


def test_mean_over_nonzero() -> None:
    losses = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    assert mean_over_nonzero(losses).tolist() == [2.0, 0.0]


def test_class_term_by_hand() -> None:
    logits = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]]  # N = 2 slots, K = 2 + void
    target = torch.tensor([[1, 2]])  # slot 0 positive (class 1), slot 1 negative (void)
    weights = torch.tensor([[0.5, 0.2]])
    got = pq_class_term(torch.tensor([logits]), target, weights, alpha=0.75)
    ce0, ce1 = -_log_softmax(logits[0], 1), -_log_softmax(logits[1], 2)
    expected = (0.75 * 0.5 * ce0 + 0.25 * 0.2 * ce1) / 2
    assert math.isclose(float(got), expected, rel_tol=1e-6)


def test_class_weights_and_void_ratio_by_hand() -> None:
    vr = void_ratio(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[4.0, 3.0, 2.0]]))
    assert torch.allclose(vr, torch.tensor([[1 / 4.00001, 0.0, 2 / 2.00001]]))
    slot_mask = torch.tensor([[0, -1, -1]])
    dice = torch.tensor([[0.6, 0.0, 0.0]])
    w = class_term_weights(slot_mask, dice, vr, negative_weighting="void_ratio")
    assert torch.allclose(w, torch.tensor([[0.6, 1e-5, 2 / 2.00001]]))
    w = class_term_weights(slot_mask, dice, vr, negative_weighting="constant")
    assert w.tolist() == [[pytest.approx(0.6), 1.0, 1.0]]
    with pytest.raises(ValueError, match="negative_weighting"):
        class_term_weights(slot_mask, dice, vr, negative_weighting="paper")


def test_dice_term_by_hand() -> None:
    # Slot 1 matched to mask 0 (intersection 3, slot area 5, mask area 4, class prob 0.5);
    # mask 1 unmatched (no term).
    intersection = torch.tensor([[[0.0, 9.0], [3.0, 9.0]]])  # B x N x M
    got = pq_dice_term(
        intersection,
        torch.tensor([[7.0, 5.0]]),
        torch.tensor([[4.0, 6.0]]),
        torch.tensor([[1, -1]]),
        torch.tensor([[0.5, 0.9]]),
    )
    expected = 0.5 * (1 - (2 * 3 + 1) / (5 + 4 + 1))
    assert math.isclose(float(got), expected, rel_tol=1e-6)


def test_mask_id_by_hand() -> None:
    logits = [[1.0, 2.0, 0.0], [0.5, -0.5, 3.0]]  # two slots x three pixels
    target = torch.tensor([[1, 0, -1]])  # pixel 2 has no target
    got = mask_id_cross_entropy(torch.log_softmax(torch.tensor([logits]), dim=1), target)
    ce_p0 = -_log_softmax([logits[0][0], logits[1][0]], 1)
    ce_p1 = -_log_softmax([logits[0][1], logits[1][1]], 0)
    assert math.isclose(float(got), (ce_p0 + ce_p1) / 2, rel_tol=1e-6)


def test_instance_discrimination_by_hand() -> None:
    # D = 2, three pixels: p0, p1 in thing mask 0, p2 in stuff mask 1; mask 2 is padding.
    g = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    embed = torch.tensor(g).t()[None]  # 1 x D x L
    onehot = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    got = instance_discrimination_loss(
        embed,
        onehot,
        torch.tensor([[2.0, 1.0, 0.0]]),
        torch.tensor([[True, True, False]]),
        torch.tensor([[0, 0, 1]]),
        torch.tensor([[True, True, False]]),
        temperature=0.3,
    )
    t0 = [(1.0 + 0.6) / 2, 0.8 / 2]
    n0 = math.hypot(*t0)
    t0 = [t0[0] / n0, t0[1] / n0]
    t1 = [0.0, 1.0]

    def ce(p: list[float]) -> float:
        logits = [(p[0] * t[0] + p[1] * t[1]) / 0.3 for t in (t0, t1)]
        return -_log_softmax(logits, 0)  # the padding mask's -99999 adds nothing

    assert math.isclose(float(got), (ce(g[0]) + ce(g[1])) / 2, rel_tol=1e-5)


def test_semantic_by_hand() -> None:
    logits = [[0.2, 1.0, -1.0], [2.0, 0.0, 0.5]]  # two pixels, channels void/1/2
    got = semantic_cross_entropy(
        torch.tensor([logits]).transpose(1, 2), torch.tensor([[2, 0]]), torch.tensor([[3.0, 1.0]])
    )
    # Pixel 1 is void (ignored); pixel 0 weighs 3 and is the only non-zero term.
    assert math.isclose(float(got), -3 * _log_softmax(logits[0], 2), rel_tol=1e-6)


# ---------------------------------------------------------------- criterion fixtures


def _scene(batch: int = 2) -> PanopticTargets:
    """Two things (ids 0, 1), two stuff classes and a void corner, per image."""
    sem = torch.full((batch, CROP, CROP), 4, dtype=torch.long)
    ids = torch.full((batch, CROP, CROP), -1, dtype=torch.long)
    sem[:, 12:, :] = 5
    sem[:, 0:8, 0:8], ids[:, 0:8, 0:8] = 1, 0
    sem[:, 8:17, 12:21], ids[:, 8:17, 12:21] = 3, 1
    sem[:, 17:, 0:4] = 0
    classes = torch.full((batch, 128), -1, dtype=torch.long)
    classes[:, 0], classes[:, 1] = 1, 3
    return PanopticTargets(sem, ids, classes, torch.ones(batch, CROP, CROP))


def _perfect_output(targets: PanopticTargets, slots: int = 8, order: list[int] | None = None):
    """Logits that put GT mask i (thing 0, thing 1, stuff 4, stuff 5) on slot order[i]."""
    order = order or [5, 2, 7, 0]
    sem = targets.semantic[:, ::4, ::4]
    ids = targets.thing_ids[:, ::4, ::4]
    B, H, W = sem.shape
    regions = [ids == 0, ids == 1, (sem == 4) & (ids < 0), (sem == 5) & (ids < 0)]
    classes = [0, 2, 3, 4]
    mask_logits = torch.full((B, slots, H, W), -8.0)
    class_logits = torch.full((B, slots, K + 1), -8.0)
    class_logits[:, :, K] = 8.0  # unmatched slots: void
    embed = torch.zeros(B, 4, H, W)
    for i, (region, cls) in enumerate(zip(regions, classes, strict=True)):
        mask_logits[:, order[i]][region] = 8.0
        class_logits[:, order[i]] = -8.0
        class_logits[:, order[i], cls] = 8.0
        embed[:, i][region] = 1.0
    embed[:, 0][sem == 0] = 1.0  # void pixels: any unit vector
    semantic_logits = F.one_hot(sem, K + 1).permute(0, 3, 1, 2).float() * 16.0 - 8.0
    return MaXDeepLabOutput(class_logits, mask_logits, embed, semantic_logits)


def _losses(output: MaXDeepLabOutput, targets: PanopticTargets, **cfg) -> dict[str, torch.Tensor]:
    return compute_losses(output, targets, loss_cfg=LossConfig(**cfg), num_thing_classes=THINGS)


def _random_output(B: int = 2, N: int = 8, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = MaXDeepLabOutput(
        torch.randn(B, N, K + 1, generator=g),
        torch.randn(B, N, 6, 6, generator=g) * 3,
        F.normalize(torch.randn(B, 4, 6, 6, generator=g), dim=1),
        torch.randn(B, K + 1, 6, 6, generator=g),
    )
    if requires_grad:
        for name in ("class_logits", "mask_logits", "pixel_embed", "semantic_logits"):
            getattr(out, name).requires_grad_()
    return out


# ---------------------------------------------------------------- criterion properties


def test_keys_and_total() -> None:
    losses = _losses(_random_output(), _scene())
    assert tuple(losses) == LOSS_KEYS
    parts = sum(losses[k] for k in LOSS_KEYS[:-1])
    assert torch.allclose(losses["total"], parts)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())


def test_loss_invariant_to_permuting_slots() -> None:
    out, targets = _random_output(), _scene()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    permuted = MaXDeepLabOutput(
        out.class_logits[:, perm], out.mask_logits[:, perm], out.pixel_embed, out.semantic_logits
    )
    a, b = _losses(out, targets), _losses(permuted, targets)
    for key in LOSS_KEYS:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


def test_perfect_prediction_beats_perturbed_ones() -> None:
    targets = _scene()
    perfect = _perfect_output(targets)
    best = _losses(perfect, targets)
    # Only instance discrimination stays above 0: orthogonal unit embeddings with tau = 0.3 give
    # -log(e^(1/0.3) / (e^(1/0.3) + 3)) ~ 0.10 with 4 GT masks.
    assert float(best["total"] - best["instance_discrimination"]) < 1e-4
    assert float(best["instance_discrimination"]) < 0.11
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        noisy = MaXDeepLabOutput(
            perfect.class_logits + 4 * torch.randn(perfect.class_logits.shape, generator=g),
            perfect.mask_logits + 4 * torch.randn(perfect.mask_logits.shape, generator=g),
            F.normalize(
                perfect.pixel_embed + torch.rand(perfect.pixel_embed.shape, generator=g), dim=1
            ),
            perfect.semantic_logits + 4 * torch.randn(perfect.semantic_logits.shape, generator=g),
        )
        assert float(_losses(noisy, targets)["total"]) > float(best["total"]), trial
    # Swapping two slots' classes (a wrong class per thing) also costs more: the PQ-style similarity
    # drops, the matching moves, and the dice term (weighted by the now tiny class probability of
    # a well-placed slot, or unweighted for a badly placed one) grows.
    swapped = _perfect_output(targets)
    swapped.class_logits[:, [5, 2]] = swapped.class_logits[:, [2, 5]]
    assert float(_losses(swapped, targets)["total"]) > float(best["total"]) + 1.0


def test_mask_id_uses_the_matched_slot() -> None:
    # GT masks live on slots [5, 2, 7, 0], not on slots [0, 1, 2, 3]: the earlier PyTorch port's
    # target (the GT index) would give a large loss here.
    targets = _scene()
    losses, matching = compute_losses_and_matching(
        _perfect_output(targets), targets, loss_cfg=LossConfig(), num_thing_classes=THINGS
    )
    assert matching.mask_slot[0].tolist() == [5, 2, 7, 0]
    assert float(losses["mask_id"]) < 1e-3


def test_gradients_reach_outputs_but_not_through_stop_gradient_weights() -> None:
    targets = _scene()
    out = _random_output(requires_grad=True)
    _losses(out, targets)["total"].backward()
    for name in ("class_logits", "mask_logits", "pixel_embed", "semantic_logits"):
        grad = getattr(out, name).grad
        assert grad is not None and grad.abs().sum() > 0, name

    # The class term's weights (matched dice, void ratio) are stop-gradient: no mask-logit gradient.
    out = _random_output(requires_grad=True)
    _losses(out, targets)["pq_class"].backward()
    assert out.mask_logits.grad is None or out.mask_logits.grad.abs().max() == 0
    assert out.class_logits.grad.abs().sum() > 0
    # The dice term's weight (matched class probability) is stop-gradient: no class-logit gradient.
    out = _random_output(requires_grad=True)
    _losses(out, targets)["pq_dice"].backward()
    assert out.class_logits.grad is None or out.class_logits.grad.abs().max() == 0
    assert out.mask_logits.grad.abs().sum() > 0


def test_semantic_absent_and_zero_weights() -> None:
    out, targets = _random_output(), _scene()
    out.semantic_logits = None
    losses = _losses(out, targets)
    assert float(losses["semantic"]) == 0.0 and torch.isfinite(losses["total"])
    losses = _losses(_random_output(), targets, mask_id_weight=0.0, pq_style_weight=0.0)
    assert float(losses["mask_id"]) == float(losses["pq_class"]) == float(losses["pq_dice"]) == 0.0


def test_weights_scale_their_terms() -> None:
    out, targets = _random_output(), _scene()
    base = _losses(out, targets)
    doubled = _losses(out, targets, pq_style_weight=6.0, instance_discrimination_weight=2.0)
    assert torch.allclose(doubled["pq_class"], 2 * base["pq_class"])
    assert torch.allclose(doubled["pq_dice"], 2 * base["pq_dice"])
    assert torch.allclose(doubled["instance_discrimination"], 2 * base["instance_discrimination"])


def test_negative_weighting_switch() -> None:
    out, targets = _random_output(), _scene()
    a = _losses(out, targets, negative_weighting="void_ratio")
    b = _losses(out, targets, negative_weighting="constant")
    assert float(b["pq_class"]) > float(a["pq_class"])  # negatives weigh 1 instead of <= 1
    assert torch.allclose(a["pq_dice"], b["pq_dice"])


def test_nan_outputs_do_not_raise() -> None:
    out = _random_output()
    out.class_logits[0, 0, 0] = float("nan")
    out.mask_logits[1, 3] = float("inf")
    losses = _losses(out, _scene())
    assert not bool(losses_are_finite(losses))
    assert bool(losses_are_finite(_losses(_random_output(), _scene())))


def test_more_gt_masks_than_slots_is_guarded() -> None:
    # 4 GT masks, 2 slots: two masks stay unmatched; every term stays finite and moderate.
    targets = _scene()
    losses, matching = compute_losses_and_matching(
        _random_output(N=2), targets, loss_cfg=LossConfig(), num_thing_classes=THINGS
    )
    assert ((matching.mask_slot >= 0).sum(dim=1) == 2).all()
    assert all(torch.isfinite(v) and float(v) < 100 for v in losses.values())


def test_more_than_128_instances() -> None:
    # 300 thing instances in one crop with max_thing_id 128: ids >= 128 are dropped explicitly.
    crop = 4 * 40 + 1
    ids = (torch.arange(crop * crop).reshape(1, crop, crop) // 40) % 300
    sem = torch.ones(1, crop, crop, dtype=torch.long)
    classes = torch.ones(1, 128, dtype=torch.long)
    out = MaXDeepLabOutput(
        torch.randn(1, 16, K + 1),
        torch.randn(1, 16, 41, 41),
        F.normalize(torch.randn(1, 4, 41, 41), dim=1),
    )
    losses, matching = compute_losses_and_matching(
        out,
        PanopticTargets(sem, ids, classes, torch.ones(1, crop, crop)),
        loss_cfg=LossConfig(),
        num_thing_classes=THINGS,
    )
    assert all(torch.isfinite(v) and float(v) < 100 for v in losses.values())
    assert int((matching.mask_slot >= 0).sum()) == 16
