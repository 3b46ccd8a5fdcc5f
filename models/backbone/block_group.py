"""A stage of residual blocks, each optionally followed by a dual-path transformer layer.

deeplab2: `model/layers/axial_block_groups.py` BlockGroup; docs/deeplab2.md#stage-table and
#drop-path. The per-block rules all hang on the block's *original ResNet stride* (its input
stride in an un-dilated ResNet):
- axial attention iff that stride >= `use_axial_beyond_stride`; otherwise a conv bottleneck
  (ResNet-beta) or a basic block (Wide-ResNet, except its last stage which uses a [f, 2f, 4f]
  bottleneck);
- drop-path keep probability `drop_path_stage_keep_probs[stage]`, stage = log2(stride) - 1
  (`build_model` computes them, 1.0 below `drop_path_beyond_stride`);
- after block 1 applies the group's stride, the original stride doubles, and a dual-path layer
  follows each block iff the updated stride >= `use_transformer_beyond_stride`;
- the stride is applied only while below the output stride; beyond it, conv blocks get atrous
  rates instead (axial blocks are global and need none).
The transformer layer of a block uses the block's keep probability but draws its own masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from maxdeeplab.models.backbone.residual_block import ResidualBlock
from maxdeeplab.models.layers import checkpointed_call, drop_path_mask
from maxdeeplab.models.strides import OUTPUT_STRIDE
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
        backbone_type: 'resnet_beta' or 'wider_resnet'.
        use_axial_beyond_stride, use_transformer_beyond_stride: see the module docstring.
        attention_bottleneck_expansion: an axial bottleneck's first width is f x this.
        axial_key_expansion, axial_value_expansion, axial_num_heads, rpe_length: the
            AxialAttention2D settings.
        memory_channels: C_m of the memory, used if a transformer layer is built.
        transformer_expansion: DPT filters = 128 x this.
        transformer_ffn_channels: hidden width of the DPT memory FFN.
        drop_path_stage_keep_probs: the drop-path keep probability of each stage 0, 1, ...
            (stage = log2(original ResNet stride) - 1).
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        num_blocks: int,
        *,
        original_resnet_stride: int,
        original_resnet_input_stride: int,
        backbone_type: str,
        use_axial_beyond_stride: int,
        use_transformer_beyond_stride: int,
        attention_bottleneck_expansion: float,
        axial_key_expansion: float,
        axial_value_expansion: float,
        axial_num_heads: int,
        rpe_length: int,
        memory_channels: int,
        transformer_expansion: float,
        transformer_ffn_channels: int,
        drop_path_stage_keep_probs: Sequence[float],
    ) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.keep_probs: list[float] = []
        self.use_checkpointing = False
        current_stride = original_resnet_input_stride
        channels = in_channels
        for index in range(num_blocks):
            strides = (
                original_resnet_stride
                if index == 0 and original_resnet_input_stride < OUTPUT_STRIDE
                else 1
            )
            dilation = current_stride // OUTPUT_STRIDE if current_stride > OUTPUT_STRIDE else 1
            end_stride = original_resnet_input_stride * original_resnet_stride
            second_dilation = (
                end_stride // OUTPUT_STRIDE
                if index == 0 and end_stride > OUTPUT_STRIDE
                else dilation
            )
            stage = int(round(math.log2(current_stride) - 1))
            self.keep_probs.append(drop_path_stage_keep_probs[stage])
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
                key_expansion=axial_key_expansion,
                value_expansion=axial_value_expansion,
                num_heads=axial_num_heads,
                rpe_length=rpe_length,
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
                    ffn_channels=transformer_ffn_channels,
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
    if backbone_type == "wider_resnet":
        # Wide-ResNet uses basic blocks except in the last stage (stride 16 -> 32).
        return (
            [filters * 4, filters * 4] if end_stride < 32 else [filters, filters * 2, filters * 4]
        )
    return [filters, filters, filters * 4]  # 'resnet_beta' (config.BACKBONE_TYPES)
