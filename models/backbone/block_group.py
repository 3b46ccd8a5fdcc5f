"""A stage of residual blocks, each optionally followed by a dual-path transformer layer.

deeplab2: `model/layers/axial_block_groups.py` BlockGroup; spec §1.2 and §1.7. The per-block rules
all hang on the block's *original ResNet stride* (its input stride in an un-dilated ResNet):
- axial attention iff that stride >= `use_axial_beyond_stride`; otherwise a conv bottleneck
  (ResNet-beta) or a basic block (Wide-ResNet, except its last stage which uses a [f, 2f, 4f]
  bottleneck);
- drop path iff that stride >= `drop_path_beyond_stride`, with stage = log2(stride) - 1;
- after block 1 applies the group's stride, the original stride doubles, and a dual-path layer
  follows each block iff the updated stride >= `use_transformer_beyond_stride`;
- the stride is applied only while below the output stride; beyond it, conv blocks get atrous
  rates instead (axial blocks are global and need none).
The transformer layer of a block uses the block's keep probability but draws its own masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from maxdeeplab.models.backbone.axial_attention import MAX_SPAN
from maxdeeplab.models.backbone.residual_block import ResidualBlock
from maxdeeplab.models.layers import checkpointed_call, drop_path_keep_prob, drop_path_mask
from maxdeeplab.models.transformer import DualPathDropMasks, DualPathTransformerLayer

# deeplab2 names the transformer layers `_block{i}_transformer`; the name carries the LR rule.
TRANSFORMER = "transformer"


class BlockGroup(nn.Module):
    """Residual blocks (+ dual-path layers) operating at one resolution.

    Args:
        in_channels: channels of the (non-activated) input.
        filters: the group's base width f (32 x original input stride x width multiplier).
        num_blocks: residual blocks in the group.
        original_resnet_stride: this group's stride in the original ResNet (1 or 2).
        original_resnet_input_stride: the original ResNet stride of the group's input.
        memory_channels: C_m of the memory, used if a transformer layer is built.
        output_stride: the network's output stride (16).
        backbone_type: 'resnet_beta' or 'wider_resnet'.
        transformer_expansion: DPT filters = 128 x this.
        drop_path_*: keep probability of the last stage, schedule, and the first eligible stride.
        axial: dict of AxialAttention2D settings (key/value expansion, heads, RPE length).
        transformer: dict of DualPathTransformerLayer settings.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        num_blocks: int,
        *,
        original_resnet_stride: int,
        original_resnet_input_stride: int,
        memory_channels: int,
        output_stride: int = 16,
        backbone_type: str = "resnet_beta",
        use_axial_beyond_stride: int = 16,
        use_transformer_beyond_stride: int = 32,
        attention_bottleneck_expansion: float = 2.0,
        transformer_expansion: float = 1.0,
        drop_path_keep_prob_last: float = 0.8,
        drop_path_beyond_stride: int = 16,
        drop_path_schedule: str = "constant",
        axial: dict | None = None,
        transformer: dict | None = None,
    ) -> None:
        super().__init__()
        axial = axial or {}
        transformer = transformer or {}
        self.num_blocks = num_blocks
        self.keep_probs: list[float] = []
        self.use_checkpointing = False
        current_stride = original_resnet_input_stride
        channels = in_channels
        for index in range(num_blocks):
            strides = (
                original_resnet_stride
                if index == 0 and original_resnet_input_stride < output_stride
                else 1
            )
            dilation = current_stride // output_stride if current_stride > output_stride else 1
            end_stride = original_resnet_input_stride * original_resnet_stride
            second_dilation = (
                end_stride // output_stride
                if index == 0 and end_stride > output_stride
                else dilation
            )
            if current_stride >= drop_path_beyond_stride:
                stage = int(round(math.log2(current_stride) - 1))
                keep = drop_path_keep_prob(drop_path_keep_prob_last, drop_path_schedule, stage)
            else:
                keep = 1.0
            self.keep_probs.append(keep)
            attention = current_stride >= use_axial_beyond_stride > 0
            block_filters = _block_filters(
                filters, attention, backbone_type, end_stride, attention_bottleneck_expansion
            )
            block = ResidualBlock(
                channels,
                block_filters,
                stride=strides,
                dilation=dilation,
                second_dilation=second_dilation,
                attention=attention,
                rpe_length=axial.get("rpe_length", 2 * MAX_SPAN - 1),
                key_expansion=axial.get("key_expansion", 1.0),
                value_expansion=axial.get("value_expansion", 2.0),
                num_heads=axial.get("num_heads", 8),
            )
            self.add_module(f"block{index + 1}", block)
            channels = block.out_channels
            if index == 0 and original_resnet_stride > 1:
                current_stride *= original_resnet_stride
            layer = None
            if current_stride >= use_transformer_beyond_stride > 0:
                layer = DualPathTransformerLayer(
                    channels,
                    memory_channels,
                    filters=int(128 * transformer_expansion),
                    **transformer,
                )
            self.add_module(f"block{index + 1}_{TRANSFORMER}", layer)
        self.out_channels = channels

    def forward(
        self, pixel: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel: B x C_in x H x W (not activated), memory: B x C_m x N.

        Returns:
            pixel: B x C_out x H' x W' (not activated); memory: B x C_m x N (passed through
            unchanged by groups without dual-path layers).
        """
        for index in range(self.num_blocks):
            block: ResidualBlock = getattr(self, f"block{index + 1}")
            layer: DualPathTransformerLayer | None = getattr(
                self, f"block{index + 1}_{TRANSFORMER}"
            )
            keep = self.keep_probs[index]
            drop = self.training and keep < 1.0
            # Masks are drawn outside the (possibly recomputed) block, as deeplab2 does, so that the
            # recomputation sees the same ones.
            mask = drop_path_mask(pixel, keep) if drop else None
            if self.use_checkpointing and self.training and block.attention is not None:
                pixel = checkpointed_call(block, block, pixel, mask)
            else:
                pixel = block(pixel, mask)
            if layer is not None:
                masks = None
                if drop:
                    masks = DualPathDropMasks(
                        pixel=drop_path_mask(memory, keep),
                        memory_attention=drop_path_mask(memory, keep),
                        memory_ffn=drop_path_mask(memory, keep),
                    )
                pixel, memory = layer(pixel, memory, masks)
        return pixel, memory


def _block_filters(
    filters: int, attention: bool, backbone_type: str, end_stride: int, expansion: float
) -> list[int]:
    """The channel list of a block (deeplab2 BlockGroup's filters_list)."""
    if attention:
        return [int(round(filters * expansion)), filters, filters * 4]
    if backbone_type in ("resnet", "resnet_beta"):
        return [filters, filters, filters * 4]
    if backbone_type == "wider_resnet":
        # Wide-ResNet uses basic blocks except in the last stage (stride 16 -> 32).
        return (
            [filters * 4, filters * 4] if end_stride < 32 else [filters, filters * 2, filters * 4]
        )
    raise ValueError(
        f"unknown backbone_type {backbone_type!r}; use 'resnet_beta' or 'wider_resnet'"
    )
