"""Residual blocks of the Axial-ResNet: deeplab2 `model/layers/axial_blocks.py`.

Described in docs/deeplab2.md#residual-blocks.

One class covers the three kinds deeplab2 builds, chosen by `filters` and `attention`:
- conv bottleneck [f, f, 4f]: 1x1 -> 3x3 (stride, dilation) -> 1x1;
- basic block [4f, 4f] (Wide-ResNet): 3x3 (stride, dilation) -> 3x3;
- axial bottleneck [e*f, f, 4f]: 1x1 -> AxialAttention2D(f) -> ReLU -> 1x1.
The block takes the *non-activated* output of the previous block, applies ReLU first, branches the
shortcut from that activated input, multiplies the residual branch by an optional per-sample
drop-path mask and returns `branch + shortcut` without activation. The last BN of the branch starts
with gamma = 0, so a fresh block is the identity on its shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maxdeeplab.models.backbone.axial_attention import AxialAttention2D
from maxdeeplab.models.layers import ConvBN


class ResidualBlock(nn.Module):
    """One residual block.

    Args:
        in_channels: input channels.
        filters: the channel list, 3 entries (bottleneck) or 2 (basic block); the output has
            filters[-1] channels.
        stride: applied by the first spatial operation (3x3 conv or attention).
        dilation: atrous rate of the 3x3 conv(s); `second_dilation` for a basic block's second conv.
        attention: True for an axial bottleneck (filters[1] is the attention's f).
        key_expansion, value_expansion, num_heads, rpe_length: axial-attention settings (used by
            an axial bottleneck only).
    """

    def __init__(
        self,
        in_channels: int,
        filters: list[int],
        *,
        stride: int = 1,
        dilation: int = 1,
        second_dilation: int | None = None,
        attention: bool = False,
        key_expansion: float,
        value_expansion: float,
        num_heads: int,
        rpe_length: int,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = filters[-1]
        self.attention: AxialAttention2D | None = None
        if len(filters) == 3:
            self.conv1_bn_act = ConvBN(in_channels, filters[0], 1, relu=True)
            if attention:
                self.attention = AxialAttention2D(
                    filters[0],
                    filters[1],
                    stride=stride,
                    key_expansion=key_expansion,
                    value_expansion=value_expansion,
                    num_heads=num_heads,
                    rpe_length=rpe_length,
                )
                mid_channels = self.attention.out_channels
            else:
                self.conv2_bn_act = ConvBN(
                    filters[0], filters[1], 3, stride=stride, dilation=dilation, relu=True
                )
                mid_channels = filters[1]
            self.conv3_bn = ConvBN(mid_channels, filters[2], 1, zero_gamma=True)
        elif len(filters) == 2 and not attention:
            self.conv1_bn_act = ConvBN(
                in_channels, filters[0], 3, stride=stride, dilation=dilation, relu=True
            )
            self.conv2_bn = ConvBN(
                filters[0], filters[1], 3, dilation=second_dilation or dilation, zero_gamma=True
            )
        else:
            raise ValueError(f"unsupported block filters {filters} (attention={attention})")
        self.shortcut = (
            ConvBN(in_channels, filters[-1], 1, stride=stride)
            if in_channels != filters[-1]
            else None
        )

    def forward(self, x: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: B x C_in x H x W (not activated) -> B x filters[-1] x H' x W' (not activated).

        drop_mask: B x 1 x 1 x 1 drop-path mask for the residual branch, or None.
        """
        x = F.relu(x)
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        elif self.stride > 1:
            shortcut = x[:, :, :: self.stride, :: self.stride]
        else:
            shortcut = x
        branch = self.conv1_bn_act(x)
        if hasattr(self, "conv3_bn"):
            if self.attention is not None:
                branch = F.relu(self.attention(branch))
            else:
                branch = self.conv2_bn_act(branch)
            branch = self.conv3_bn(branch)
        else:
            branch = self.conv2_bn(branch)
        if drop_mask is not None:
            branch = branch * drop_mask
        return branch + shortcut
