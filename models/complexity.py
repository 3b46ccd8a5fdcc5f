"""Model size and cost: parameter counts by part and multiply-accumulates at a crop size.

The counts reproduce deeplab2's unit-test sets (docs/deeplab2.md#parameter-and-mac-counts):
MaX-DeepLab-S on COCO has 61,900,200 trainable parameters without the auxiliary semantic branch,
an encoder of 61,726,624 and an ImageNet-pretrained part of 41,343,424; MaX-DeepLab-L's encoder
has 450,523,232. Everything here works on the meta device, so even -L is counted without
allocating memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from maxdeeplab.models.backbone.axial_resnet import MEMORY_FEATURE
from maxdeeplab.models.backbone.block_group import TRANSFORMER, BlockGroup
from maxdeeplab.models.network import MaXDeepLab, parameter_groups


@dataclass
class ParameterCounts:
    """Trainable parameter counts.

    Attributes:
        total: everything.
        without_aux: total minus the auxiliary semantic branch.
        encoder: backbone + dual-path transformer + pixel decoder + memory (deeplab2's encoder).
        backbone: the ImageNet-pretrained part = the 0.1x learning-rate group.
        aux_semantic: the auxiliary semantic branch.
    """

    total: int
    without_aux: int
    encoder: int
    backbone: int
    aux_semantic: int


def _count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def count_parameters(model: MaXDeepLab) -> ParameterCounts:
    """Count the trainable parameters by part (no values are read: meta tensors work)."""
    aux = _count(model.aux_semantic.parameters()) if model.aux_semantic is not None else 0
    total = _count(model.parameters())
    return ParameterCounts(
        total=total,
        without_aux=total - aux,
        encoder=_count(model.encoder.parameters()),
        backbone=_count(parameter_groups(model)[0]),
        aux_semantic=aux,
    )


def parameter_breakdown(model: MaXDeepLab) -> dict[str, int]:
    """Parameters per part, in forward order: each encoder stage (its dual-path layers apart), the
    decoder stages, the memory and its FFNs, the heads and the auxiliary branch."""
    parts: dict[str, int] = {}
    for name, child in model.encoder.named_children():
        if isinstance(child, BlockGroup):
            layers = [p for n, p in child.named_parameters() if TRANSFORMER in n]
            parts[name] = _count(child.parameters()) - _count(layers)
            if layers:
                parts[f"{name} (dual-path layers)"] = _count(layers)
        else:
            parts[name] = _count(child.parameters())
    parts[MEMORY_FEATURE] = model.encoder.memory_feature.numel()
    parts["pixel_space_head"] = _count(model.pixel_space_head.parameters())
    parts["mask_class_head"] = _count(model.mask_class_head.parameters())
    if model.aux_semantic is not None:
        parts["aux_semantic"] = _count(model.aux_semantic.parameters())
    return parts


def count_macs(model: MaXDeepLab, crop: int, batch: int = 1) -> dict[str, float]:
    """Multiply-accumulates of one inference forward at crop x crop, per top-level part.

    Counted by torch's FlopCounterMode (convolutions, matmuls, einsums incl. attention; MACs =
    FLOPs / 2) in eval mode on the model's device: build the model on the meta device to count a
    large model instantly.

    Returns:
        {'total', 'without_aux', 'encoder', 'pixel_space_head', 'mask_class_head',
        'aux_semantic'} in MACs.
    """
    device = next(model.parameters()).device
    images = torch.zeros(batch, 3, crop, crop, device=device)
    was_training = model.training
    model.eval()
    try:
        # No torch.no_grad(): FlopCounterMode's module tracker rejects views of parameters made
        # under no_grad (the memory is such a view).
        with FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    root = type(model).__name__
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    parts = ["encoder", "pixel_space_head", "mask_class_head", "aux_semantic"]
    macs = {part: by_module.get(f"{root}.{part}", 0) / 2 for part in parts}
    macs["total"] = counter.get_total_flops() / 2
    macs["without_aux"] = macs["total"] - macs["aux_semantic"]
    return macs
