"""Ground truth at the loss resolution (stride 4) for the MaX-DeepLab losses.

Described in docs/deeplab2.md#ground-truth-at-stride-4.

deeplab2 (`model/loss/max_deeplab_loss.py`, `_pre_process_ground_truth`) subsamples the crop-size
labels with `x[:, ::4, ::4]` and builds a dense one-hot over `max_thing_id + num_stuff` mask columns
(128 thing ids + 53 stuff classes = 181 for COCO): a pixel goes to its thing id if it has one, else
to the column of its stuff class; void pixels go nowhere. A column is void when it is padding, when
its mask vanished in the subsampling, or when its stuff class is absent from the image.

Here the same columns are built, then **compacted**: only the non-void columns of each image are
kept (in deeplab2's column order), padded to the largest count in the batch, M. This is lossless for
every loss term: a void column has no pixels, is excluded from matching (deeplab2 pads its row with
+-999), gets dice weight 0 and is masked with -99999 in instance discrimination, so it contributes
nothing anywhere. `mask_columns` keeps each compact mask's deeplab2 column index for reference.

Edge cases made explicit (docs/deeplab2.md#more-masks-than-slots):
- thing ids >= `max_thing_id` (deeplab2 asserts in its data pipeline; its `tf.one_hot` would drop
  them): such pixels belong to no mask (no matching, dice, mask-ID or instance-discrimination
  signal) but keep their semantic label (semantic loss, non-void for the void ratio). Their number
  is reported in `num_dropped_thing_pixels` so the data side can warn.
- a thing id whose class in `thing_classes` is not a real class (-1 padding or > K): the column is
  void.
- a pixel with semantic 0 (void) is never part of a mask even if it carries a thing id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maxdeeplab.models.structures import PanopticTargets


@dataclass
class MaskTargets:
    """Per-batch targets at the loss resolution, with the GT masks compacted to the non-void ones.

    Shape letters: B batch, L = H * W stride-4 pixels, M the most non-void GT masks of any image in
    the batch (at least 1), K real classes.

    Attributes:
        pixel_mask: B x L int64, the compact GT-mask index of each pixel, -1 if it is in no mask
        (void,
            or a dropped thing id).
        mask_classes: B x M int64, the class index of each mask in the class head's order
            (semantic - 1, things first), -1 on padding.
        mask_valid: B x M bool, False on padding columns.
        mask_is_thing: B x M bool, the mask is a thing instance (else a stuff class region).
        mask_area: B x M float32, pixels of each mask at stride 4 (0 on padding).
        mask_columns: B x M int64, deeplab2's column index of each mask (thing id, or
            max_thing_id + stuff index), -1 on padding.
        pixel_nonvoid: B x L bool, semantic != 0.
        pixel_thing: B x L bool, the pixel is in a valid thing mask (instance discrimination's
        weight). semantic: B x L int64, the subsampled semantic label (0 = void).
        pixel_weights: B x L float32, the subsampled per-pixel semantic-loss weight.
        height: H, the stride-4 height.
        width: W, the stride-4 width.
        num_dropped_thing_pixels: B int64, stride-4 pixels whose thing id was >= max_thing_id.
        num_columns: deeplab2's number of mask columns, max_thing_id + stuff classes (181 on COCO).
    """

    pixel_mask: torch.Tensor
    mask_classes: torch.Tensor
    mask_valid: torch.Tensor
    mask_is_thing: torch.Tensor
    mask_area: torch.Tensor
    mask_columns: torch.Tensor
    pixel_nonvoid: torch.Tensor
    pixel_thing: torch.Tensor
    semantic: torch.Tensor
    pixel_weights: torch.Tensor
    height: int
    width: int
    num_dropped_thing_pixels: torch.Tensor
    num_columns: int

    def mask_onehot(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense pixel-to-mask one-hot, B x L x M (all zeros for pixels in no mask)."""
        B, L = self.pixel_mask.shape
        M = self.mask_valid.shape[1]
        onehot = torch.zeros(B, L, M + 1, dtype=dtype, device=self.pixel_mask.device)
        # Column M collects the pixels in no mask and is dropped.
        index = torch.where(self.pixel_mask < 0, M, self.pixel_mask)
        onehot.scatter_(2, index.unsqueeze(2), 1.0)
        return onehot[:, :, :M]


def strided_subsample(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """deeplab2's `strided_downsample`: `labels[:, ::s, ::s]` for the output size H x W.

    Args:
        labels: B x S x S (any dtype).
        height: H, the target height.
        width: W, the target width.

    Raises:
        ValueError: (S - 1) is not a multiple of (H - 1), or the two axes would need different
        strides.
    """
    in_h, in_w = labels.shape[-2:]
    if height == in_h and width == in_w:
        return labels
    if height < 2 or width < 2 or (in_h - 1) % (height - 1) or (in_w - 1) % (width - 1):
        raise ValueError(
            f"labels of size {in_h}x{in_w} cannot be strided down to {height}x{width}: the "
            "crop must be a multiple of the stride plus one (e.g. 641 -> 161)"
        )
    stride_h, stride_w = (in_h - 1) // (height - 1), (in_w - 1) // (width - 1)
    if stride_h != stride_w:
        raise ValueError(f"height stride {stride_h} != width stride {stride_w}")
    return labels[..., ::stride_h, ::stride_w]


def build_mask_targets(
    targets: PanopticTargets,
    *,
    height: int,
    width: int,
    num_classes: int,
    num_thing_classes: int,
    max_thing_id: int,
) -> MaskTargets:
    """Subsample the crop labels to H x W and build the compact GT masks.

    Runs on the device of `targets`, vectorised over the batch (no per-image Python loop).

    Args:
        targets: full-crop labels, semantic / thing_ids B x S x S, thing_classes B x T.
        height: H of the stride-4 outputs ((S - 1) / 4 + 1).
        width: W of the stride-4 outputs.
        num_classes: K, the real classes (semantic ids 1..K).
        num_thing_classes: semantic ids 1..num_thing_classes are things, the rest stuff.
        max_thing_id: deeplab2's thing-column count (128); ids at or beyond it are dropped.

    Returns:
        The targets at stride 4 with M = the most non-void masks in any image of the batch.
    """
    semantic = strided_subsample(targets.semantic, height, width).reshape(
        targets.semantic.shape[0], -1
    )
    thing_ids = strided_subsample(targets.thing_ids, height, width).reshape_as(semantic)
    weights = strided_subsample(targets.pixel_weights, height, width).reshape_as(semantic)
    semantic, thing_ids = semantic.long(), thing_ids.long()
    B, L = semantic.shape
    device = semantic.device
    num_stuff = num_classes - num_thing_classes
    num_columns = max_thing_id + num_stuff

    # Column of each pixel in deeplab2's layout: thing id, else max_thing_id + stuff index, else -1.
    nonvoid = semantic != 0
    has_thing_id = (thing_ids >= 0) & nonvoid
    dropped = has_thing_id & (thing_ids >= max_thing_id)
    is_thing_pixel = has_thing_id & ~dropped
    is_stuff_pixel = (
        ~has_thing_id & nonvoid & (semantic > num_thing_classes) & (semantic <= num_classes)
    )
    column = torch.full_like(semantic, -1)
    column = torch.where(is_thing_pixel, thing_ids, column)
    column = torch.where(is_stuff_pixel, max_thing_id + semantic - num_thing_classes - 1, column)

    # Class (0-based, class-head order) of every column; -1 for classes that are not real.
    thing_classes = targets.thing_classes.long()
    if thing_classes.shape[1] < max_thing_id:
        thing_classes = torch.nn.functional.pad(
            thing_classes, (0, max_thing_id - thing_classes.shape[1]), value=-1
        )
    thing_col_class = thing_classes[:, :max_thing_id] - 1
    thing_col_class = torch.where(
        (thing_col_class >= 0) & (thing_col_class < num_classes), thing_col_class, -1
    )
    stuff_col_class = torch.arange(num_thing_classes, num_classes, device=device).expand(
        B, num_stuff
    )
    column_class = torch.cat([thing_col_class, stuff_col_class], dim=1)  # B x (T + S)

    area = torch.zeros(B, num_columns + 1, device=device)
    area.scatter_add_(
        1, torch.where(column < 0, num_columns, column), torch.ones(B, L, device=device)
    )
    area = area[:, :num_columns]
    column_valid = (area > 0) & (column_class >= 0)
    # A pixel of a void column (e.g. a thing id with class -1) belongs to no mask.
    column = torch.where(
        column >= 0, torch.where(column_valid.gather(1, column.clamp(min=0)), column, -1), column
    )

    # Compact the valid columns, keeping their order.
    compact_index = torch.cumsum(column_valid.long(), dim=1) - 1  # B x (T + S)
    M = max(int(column_valid.sum(dim=1).max().item()) if B else 0, 1)
    slots = torch.where(column_valid, compact_index, M)  # invalid columns go to a dropped slot M
    mask_columns = torch.full((B, M + 1), -1, dtype=torch.long, device=device)
    mask_columns.scatter_(1, slots, torch.arange(num_columns, device=device).expand(B, num_columns))
    mask_columns = mask_columns[:, :M]
    mask_valid = mask_columns >= 0
    safe_columns = mask_columns.clamp(min=0)
    mask_classes = torch.where(mask_valid, column_class.gather(1, safe_columns), -1)
    mask_area = torch.where(mask_valid, area.gather(1, safe_columns), 0.0)
    mask_is_thing = mask_valid & (mask_columns < max_thing_id)
    pixel_mask = torch.where(column >= 0, compact_index.gather(1, column.clamp(min=0)), -1)
    pixel_thing = (pixel_mask >= 0) & (column < max_thing_id)

    return MaskTargets(
        pixel_mask=pixel_mask,
        mask_classes=mask_classes,
        mask_valid=mask_valid,
        mask_is_thing=mask_is_thing,
        mask_area=mask_area,
        mask_columns=mask_columns,
        pixel_nonvoid=nonvoid,
        pixel_thing=pixel_thing,
        semantic=semantic,
        pixel_weights=weights.float(),
        height=height,
        width=width,
        num_dropped_thing_pixels=dropped.sum(dim=1),
        num_columns=num_columns,
    )
