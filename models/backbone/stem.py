"""Stems: deeplab2 `model/layers/stems.py` and the Wide-ResNet stem (axial_resnet.py).

Both end with a BN and no activation: the next block applies ReLU to its input
(docs/deeplab2.md#stem, #residual-blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from maxdeeplab.models.layers import ConvBN


class InceptionStem(nn.Module):
    """conv3x3 (C/2, stride 2) BN ReLU -> conv3x3 (C/2) BN ReLU -> conv3x3 (C) BN; no max-pool.

    ResNet-50-beta's stem (MaX-DeepLab-S): 3 -> 64 -> 64 -> 128 channels at stride 2.
    """

    def __init__(self, out_channels: int, in_channels: int = 3) -> None:
        super().__init__()
        width = out_channels // 2
        self.conv1_bn_act = ConvBN(in_channels, width, 3, stride=2, relu=True)
        self.conv2_bn_act = ConvBN(width, width, 3, relu=True)
        self.conv3_bn = ConvBN(width, out_channels, 3)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x 3 x S x S (normalised) -> B x C x (S+1)/2 x (S+1)/2, not activated."""
        return self.conv3_bn(self.conv2_bn_act(self.conv1_bn_act(x)))


class ConvStem(nn.Module):
    """One conv3x3 stride 2 + BN (the Wide-ResNet-41 stem of MaX-DeepLab-L)."""

    def __init__(self, out_channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv_bn = ConvBN(in_channels, out_channels, 3, stride=2)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_bn(x)
