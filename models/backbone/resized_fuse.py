"""ResizedFuse: sum features of several strides after bringing each to C channels and one size.

deeplab2: `model/layers/resized_fuse.py`; docs/deeplab2.md#pixel-decoder. Per input:
- already C channels: bilinear resize (align corners) only;
- at half the target resolution's stride (i.e. (h + 1) // 2 == target h): ReLU -> 1x1 conv stride 2
  + BN;
- otherwise: ReLU -> 1x1 conv + BN -> bilinear resize (align corners).
deeplab2 decides from the shapes seen when the layer is built; crops are 16k + 1, so the input
strides decide the same way and the layer can be built before seeing data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maxdeeplab.models.layers import ConvBN, resize_align_corners


class ResizedFuse(nn.Module):
    """Fuse a list of features into one B x C x H x W map at `out_stride`.

    Args:
        inputs: (channels, stride) of each input, in call order.
        out_channels: C.
        out_stride: the stride of the output.
    """

    def __init__(self, inputs: list[tuple[int, int]], out_channels: int, out_stride: int) -> None:
        super().__init__()
        self.kinds: list[str] = []
        for index, (channels, stride) in enumerate(inputs):
            if channels == out_channels:
                self.kinds.append("resize")
                continue
            if stride * 2 == out_stride:
                self.kinds.append("strided")
                conv = ConvBN(channels, out_channels, 1, stride=2)
                self.add_module(f"strided_conv_bn{index + 1}", conv)
            else:
                self.kinds.append("project")
                conv = ConvBN(channels, out_channels, 1)
                self.add_module(f"resized_conv_bn{index + 1}", conv)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """features: the inputs declared at construction; size: the output H, W."""
        output = None
        for index, (kind, feature) in enumerate(zip(self.kinds, features, strict=True)):
            if kind == "strided":
                feature = getattr(self, f"strided_conv_bn{index + 1}")(F.relu(feature))
            elif kind == "project":
                feature = getattr(self, f"resized_conv_bn{index + 1}")(F.relu(feature))
            feature = resize_align_corners(feature, size)
            output = feature if output is None else output + feature
        assert output is not None
        return output
