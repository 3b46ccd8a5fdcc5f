"""`maxdeeplab bench loss`: matching + all losses as a share of a training step, vs a per-image
reference.

Three timings in one run, on one device:
1. the batched criterion (`models.losses.criterion.compute_losses`): forward + backward of the loss
   graph for B images, N slots, an H x W stride-4 output and about M GT masks per image;
2. a straightforward per-image implementation written the way deeplab2 writes it: dense one-hot over
   all max_thing_id + num_stuff columns, the Hungarian matrix padded to square with +-999, slot
   logits permuted by the full permutation matrix (`reference_losses`, also used by the tests as an
   independent check of the batched code);
3. a MaX-DeepLab-S training step (forward, criterion, backward, Adam) at batch 1 and crop 4(H-1)+1,
   scaled by B, when `models/network.py` provides `build_model` (skipped otherwise, and said so).
Goal: the batched criterion costs <= 10 % of the training step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from maxdeeplab.models.config import LossConfig
from maxdeeplab.models.strides import HIGH_RESOLUTION_OUTPUT_STRIDE
from maxdeeplab.models.structures import MaXDeepLabOutput, PanopticTargets

# deeplab2 max_deeplab_loss.py constants (docs/deeplab2.md#constants).
_MATCHING_NEGATIVE = -999.0
_MATCHING_POSITIVE = 999.0
_SOFTMAX_MASKING = -99999.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=16, help="B (default 16)")
    parser.add_argument("--slots", type=int, default=128, help="N mask slots (default 128)")
    parser.add_argument("--size", type=int, default=161, help="stride-4 side H = W (default 161)")
    parser.add_argument(
        "--masks", type=int, default=20, help="GT masks per image, about (default 20)"
    )
    parser.add_argument("--num-classes", type=int, default=133, help="K real classes (default 133)")
    parser.add_argument("--num-thing-classes", type=int, default=80, help="(default 80)")
    parser.add_argument("--embed-dim", type=int, default=128, help="D (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, median (default 5)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--skip-step", action="store_true", help="do not time the model train step")
    parser.add_argument("--variant", default="max_deeplab_s", help="model variant for the step")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    gen = torch.Generator().manual_seed(0)
    crop = HIGH_RESOLUTION_OUTPUT_STRIDE * (args.size - 1) + 1
    targets = synthetic_targets(
        batch=args.batch,
        crop=crop,
        num_masks=args.masks,
        num_classes=args.num_classes,
        num_thing_classes=args.num_thing_classes,
        generator=gen,
    ).to(device)
    output = random_output(
        batch=args.batch,
        slots=args.slots,
        size=args.size,
        num_classes=args.num_classes,
        embed_dim=args.embed_dim,
        generator=gen,
        device=device,
    )
    cfg = LossConfig()
    results: dict[str, Any] = {
        "device": str(device),
        "batch": args.batch,
        "slots": args.slots,
        "size": args.size,
        "masks_per_image": args.masks,
    }
    print(
        f"bench loss on {device}: B={args.batch} N={args.slots} "
        f"{args.size}x{args.size} M~{args.masks}"
    )

    from maxdeeplab.models.losses.criterion import compute_losses

    def batched() -> None:
        losses = compute_losses(
            output, targets, loss_cfg=cfg, num_thing_classes=args.num_thing_classes
        )
        losses["total"].backward()

    def reference() -> None:
        losses = reference_losses(
            output, targets, loss_cfg=cfg, num_thing_classes=args.num_thing_classes
        )
        losses["total"].backward()

    results["batched_s"] = _time(batched, device, args.repeats)
    print(f"  batched criterion (fwd+bwd)      {results['batched_s'] * 1e3:9.1f} ms")
    results["reference_s"] = _time(reference, device, max(1, min(args.repeats, 3)))
    print(f"  per-image reference (fwd+bwd)    {results['reference_s'] * 1e3:9.1f} ms")
    results["speedup_vs_reference"] = results["reference_s"] / results["batched_s"]
    print(f"  speed-up vs reference            {results['speedup_vs_reference']:9.1f} x")

    if not args.skip_step:
        step = _time_train_step(args, crop, device)
        if step is None:
            print("  train step: models/network.py build_model not available; loss alone reported")
        else:
            results["train_step_b1_s"] = step
            results["train_step_scaled_s"] = step * args.batch
            results["loss_share_of_step"] = results["batched_s"] / (step * args.batch)
            print(
                f"  train step {args.variant} @ {crop}, B=1 {step * 1e3:9.1f} ms  (x{args.batch})"
            )
            print(
                f"  loss share of a B={args.batch} step      {results['loss_share_of_step']:9.1%}"
                "  (goal <= 10%)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_train_step(args: argparse.Namespace, crop: int, device: torch.device) -> float | None:
    try:
        from maxdeeplab.models.network import build_model
    except ImportError:
        return None
    from maxdeeplab.models.config import ModelConfig, variant_overrides
    from maxdeeplab.models.losses.criterion import compute_losses

    model_cfg = ModelConfig(**{**variant_overrides(args.variant), "variant": args.variant})
    model = build_model(model_cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)
    gen = torch.Generator().manual_seed(1)
    targets = synthetic_targets(
        batch=1,
        crop=crop,
        num_masks=args.masks,
        num_classes=model_cfg.num_classes,
        num_thing_classes=model_cfg.num_thing_classes,
        generator=gen,
    ).to(device)
    images = torch.rand(1, 3, crop, crop, generator=gen).mul(255).to(device)
    autocast = device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(images)
        losses = compute_losses(
            out, targets, loss_cfg=LossConfig(), num_thing_classes=model_cfg.num_thing_classes
        )
        losses["total"].backward()
        optimizer.step()

    return _time(step, device, max(1, min(args.repeats, 3)))


def synthetic_targets(
    *,
    batch: int,
    crop: int,
    num_masks: int,
    num_classes: int,
    num_thing_classes: int,
    generator: torch.Generator,
) -> PanopticTargets:
    """Voronoi-like labels: about 2/3 of the regions are thing instances, the rest stuff, a void
    band.

    Returns:
        PanopticTargets with semantic / thing_ids B x crop x crop and thing_classes B x 128.
    """
    ys, xs = torch.meshgrid(torch.arange(crop), torch.arange(crop), indexing="ij")
    semantic = torch.zeros(batch, crop, crop, dtype=torch.long)
    thing_ids = torch.full((batch, crop, crop), -1, dtype=torch.long)
    thing_classes = torch.full((batch, 128), -1, dtype=torch.long)
    num_things = max(1, (2 * num_masks) // 3)
    for b in range(batch):
        seeds = torch.randint(0, crop, (num_masks, 2), generator=generator)
        dist = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
        region = dist.argmin(dim=0)  # crop x crop
        classes = torch.cat(
            [
                torch.randint(1, num_thing_classes + 1, (num_things,), generator=generator),
                num_thing_classes
                + 1
                + torch.randperm(num_classes - num_thing_classes, generator=generator)[
                    : num_masks - num_things
                ],
            ]
        )
        semantic[b] = classes[region]
        is_thing = region < num_things
        thing_ids[b] = torch.where(is_thing, region, -1)
        thing_classes[b, :num_things] = classes[:num_things]
        semantic[b, : crop // 20] = 0  # a void band, like padding
        thing_ids[b, : crop // 20] = -1
    return PanopticTargets(
        semantic=semantic,
        thing_ids=thing_ids,
        thing_classes=thing_classes,
        pixel_weights=torch.ones(batch, crop, crop),
    )


def random_output(
    *,
    batch: int,
    slots: int,
    size: int,
    num_classes: int,
    embed_dim: int,
    generator: torch.Generator,
    device: torch.device,
) -> MaXDeepLabOutput:
    """Random leaf tensors that require grad, shaped like the model's training outputs."""

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device).requires_grad_()

    embed = F.normalize(torch.randn(batch, embed_dim, size, size, generator=generator), dim=1)
    return MaXDeepLabOutput(
        class_logits=leaf(batch, slots, num_classes + 1),
        mask_logits=leaf(batch, slots, size, size, scale=3.0),
        pixel_embed=embed.to(device).requires_grad_(),
        semantic_logits=leaf(batch, num_classes + 1, size, size),
    )


def _nonzero_mean(values: torch.Tensor) -> torch.Tensor:
    count = (values != 0).sum()
    return values.sum() / count if count > 0 else values.sum() * 0.0


def reference_losses(
    output: MaXDeepLabOutput,
    targets: PanopticTargets,
    *,
    loss_cfg: LossConfig,
    num_thing_classes: int,
) -> dict[str, torch.Tensor]:
    """The same losses as `compute_losses`, image by image, in deeplab2's dense formulation.

    Same keys and values (up to float rounding) as the batched criterion, including its two guards:
    GT masks left unmatched when there are more than N are left out of the matched-slot terms, and
    thing ids >= max_thing_id or with an invalid class belong to no mask.
    """
    B, N, H, W = output.mask_logits.shape
    per_image = [
        _reference_image(output, targets, b, loss_cfg, num_thing_classes) for b in range(B)
    ]
    losses = {k: torch.stack([img[k] for img in per_image]).mean() for k in per_image[0]}
    result = {
        "pq_class": loss_cfg.pq_style_weight * losses["class"],
        "pq_dice": loss_cfg.pq_style_weight * (loss_cfg.alpha / N) * losses["dice"],
        "mask_id": loss_cfg.mask_id_weight * losses["mask_id"],
        "instance_discrimination": loss_cfg.instance_discrimination_weight * losses["inst"],
        "semantic": loss_cfg.semantic_weight * losses["semantic"],
    }
    result["total"] = sum(result.values(), torch.zeros((), device=output.mask_logits.device))
    return result


def _reference_image(
    output: MaXDeepLabOutput,
    targets: PanopticTargets,
    b: int,
    cfg: LossConfig,
    num_thing_classes: int,
) -> dict[str, torch.Tensor]:
    _, N, H, W = output.mask_logits.shape
    K = output.class_logits.shape[-1] - 1
    T = cfg.max_thing_id
    stride = (targets.semantic.shape[-1] - 1) // (W - 1)
    dev = output.mask_logits.device
    sem = targets.semantic[b, ::stride, ::stride].reshape(-1).long().to(dev)
    tid = targets.thing_ids[b, ::stride, ::stride].reshape(-1).long().to(dev)
    weights = targets.pixel_weights[b, ::stride, ::stride].reshape(-1).float().to(dev)
    L = sem.numel()
    stuff_ids = list(range(num_thing_classes + 1, K + 1))
    C = T + len(stuff_ids)
    nonvoid = (sem != 0).float()

    # Dense one-hot over the C columns: thing id first, else stuff class.
    onehot = torch.zeros(L, C, device=dev)
    is_thing = (tid >= 0) & (tid < T) & (sem != 0)
    onehot[is_thing.nonzero()[:, 0], tid[is_thing]] = 1.0
    is_stuff = (tid < 0) & (sem > num_thing_classes)
    onehot[is_stuff.nonzero()[:, 0], T + sem[is_stuff] - num_thing_classes - 1] = 1.0
    col_class = torch.cat(
        [targets.thing_classes[b, :T].long().to(dev), torch.tensor(stuff_ids, device=dev)]
    )
    col_valid = (onehot.sum(0) > 0.5) & (col_class >= 1) & (col_class <= K)
    onehot = onehot * col_valid.float()
    area = onehot.sum(0)

    logits = output.mask_logits[b].reshape(N, L).t().float()  # L x N
    probs = torch.softmax(logits, dim=1)
    class_logits = output.class_logits[b].float()
    with torch.no_grad():
        p_valid = probs * nonvoid[:, None]
        dice = (onehot.t() @ p_valid) / ((area[:, None] + p_valid.sum(0)[None]) / 2 + 1e-5)
        class_probs = torch.softmax(class_logits, dim=-1)[:, :-1]
        class_sim = class_probs[:, (col_class - 1).clamp(0, K - 1)].t() * col_valid[:, None]
        cost = -dice * class_sim
        fill = _MATCHING_POSITIVE if N < C else _MATCHING_NEGATIVE
        cost = torch.where(col_valid[:, None], cost, fill)
        D = max(C, N)
        square = np.full((D, D), _MATCHING_NEGATIVE)
        square[:C, :N] = np.nan_to_num(cost.cpu().numpy(), nan=0.0)
        rows, cols = linear_sum_assignment(square)
        perm = torch.zeros(D, D, device=dev)
        perm[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
        matched = perm[:C, :N] * col_valid[:, None]  # C x N, real pairs only
        row_matched = matched.sum(1) > 0  # valid masks that got a real slot
        positive = matched.sum(0) > 0  # N
        matched_dice = (dice * matched).max(0).values
        matched_prob = (class_sim * matched).max(1).values

    # Class term.
    target = torch.full((N,), K, dtype=torch.long, device=dev)
    slot_of_row = matched.argmax(1)
    target[slot_of_row[row_matched]] = col_class[row_matched] - 1
    ce = F.cross_entropy(class_logits, target, reduction="none")
    alpha_w = torch.where(target == K, 1 - cfg.alpha, cfg.alpha)
    vr = (probs * (1 - nonvoid)[:, None]).sum(0) / (probs.sum(0) + 1e-5)
    neg_w = vr.clamp(min=1e-5) if cfg.negative_weighting == "void_ratio" else torch.ones_like(vr)
    w = torch.where(positive, matched_dice.clamp(min=1e-5), neg_w).detach()
    class_term = _nonzero_mean(alpha_w * ce * w)

    # Dice term and mask-ID CE on the slot logits permuted into GT-column order.
    full_logits = F.pad(logits, (0, D - N), value=_SOFTMAX_MASKING)  # L x D
    permuted = full_logits @ perm.t()  # column j = logit of the slot matched to GT row j
    full_onehot = F.pad(onehot, (0, D - C))
    valid_px = full_onehot.sum(1, keepdim=True)
    m_hat = torch.softmax(permuted, dim=1) * valid_px
    dice_loss = 1 - (2 * (m_hat * full_onehot).sum(0) + 1) / (m_hat.sum(0) + full_onehot.sum(0) + 1)
    dice_w = F.pad((col_valid & row_matched).float() * matched_prob.clamp(min=1e-5), (0, D - C))
    dice_term = (dice_loss * dice_w.detach()).sum()
    # Pixels of GT masks without a real slot give no mask-ID signal (guard,
    # docs/deeplab2.md#more-masks-than-slots).
    px_matched = onehot @ row_matched.float()
    ce_px = -(full_onehot * torch.log_softmax(permuted, dim=1)).sum(1) * nonvoid * px_matched
    mask_id = _nonzero_mean(ce_px)

    # Instance discrimination on thing pixels.
    embed = output.pixel_embed[b].reshape(-1, L).t().float()  # L x D
    feat = F.normalize((onehot.t() @ embed) / area.clamp(min=1)[:, None], dim=1, eps=1e-6)
    sim = (embed @ feat.t()) / cfg.temperature
    sim = torch.where(col_valid[None], sim, torch.full_like(sim, _SOFTMAX_MASKING))
    thing_px = onehot[:, :T].sum(1)
    inst = _nonzero_mean(-(onehot * torch.log_softmax(sim, dim=1)).sum(1) * thing_px)

    if output.semantic_logits is not None and cfg.semantic_weight:
        sem_logits = output.semantic_logits[b].reshape(K + 1, L).t().float()
        sem_ce = F.cross_entropy(sem_logits, sem, reduction="none") * weights * nonvoid
        semantic = _nonzero_mean(sem_ce)
    else:
        semantic = torch.zeros((), device=dev)
    return {
        "class": class_term,
        "dice": dice_term,
        "mask_id": mask_id,
        "inst": inst,
        "semantic": semantic,
    }
