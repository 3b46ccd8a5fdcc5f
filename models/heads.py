"""MaX-DeepLab output heads and the auxiliary semantic branch.

Described in docs/deeplab2.md#output-heads and #auxiliary-semantic-branch.

deeplab2: `model/decoder/max_deeplab.py` (MaXDeepLab head), `model/decoder/panoptic_deeplab.py`
(single decoder and head) and `model/decoder/aspp.py`.

- Pixel-space head: separable 5x5 -> 1x1 to D (bias) -> BN -> L2 normalisation: g, B x D x H x W.
- Mask kernels: 1x1 + BN on the memory's mask feature (B x D x N); mask logits = g . kernels,
  then one BN with a single gamma/beta shared by all slots (gamma starts at 0.1, "low temperature").
- Class head: 1x1 with bias to K + 1 classes (void last), plus the constant void prior
  log(K * 0.9 / 0.1) on the void logit so that p(void) = 0.9 at initialisation (focal-loss style).
- Auxiliary semantic branch (a training signal and the mIoU prediction): ASPP on res5 (its image
  pooling over the training crop's stride-16 window, global only at that crop), then two
  low-level fusions (res3 -> 64, res2 -> 32 channels), then a separable 5x5 + 1x1 head to K + 1
  channels at stride 4. When the semantic feature is already at stride 4 (MaX-DeepLab-L), deeplab2
  skips the decoder and only the head runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from maxdeeplab.models.layers import (
    ConvBN,
    SeparableConvBN,
    he_normal_,
    resize_align_corners,
    truncated_normal_,
)
from maxdeeplab.models.strides import OUTPUT_STRIDE

HEAD_INIT_STD = 0.01  # final 1x1 convs of every head (deeplab2 TruncatedNormal(0.01), zero bias)
ASPP_DROPOUT = 0.1  # deeplab2 aspp.py
SEPARABLE_KERNEL = 5  # deeplab2 heads and decoder fusions use 5x5 depthwise-separable convs


def _final_conv(in_channels: int, out_channels: int, ndim: int = 2) -> nn.Module:
    conv: nn.Conv1d | nn.Conv2d = (nn.Conv2d if ndim == 2 else nn.Conv1d)(
        in_channels, out_channels, 1
    )
    truncated_normal_(conv.weight, HEAD_INIT_STD)
    assert conv.bias is not None
    nn.init.zeros_(conv.bias)
    return conv


class PixelSpaceHead(nn.Module):
    """feature_panoptic B x C x H x W -> L2-normalised pixel embeddings g, B x D x H x W."""

    def __init__(self, in_channels: int, head_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.conv_block = SeparableConvBN(in_channels, head_channels, SEPARABLE_KERNEL)
        self.final_conv = _final_conv(head_channels, embed_dim)
        self.feature_bn = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.feature_bn(self.final_conv(self.conv_block(x))), dim=1)


class MaskClassHead(nn.Module):
    """Mask logits and class logits from the memory features and the pixel embeddings.

    Args:
        memory_channels: C_g of the class/mask features.
        embed_dim: D.
        num_classes: K real classes; the class head predicts K + 1 with void last.
        mask_bn_gamma: initial gamma of the shared mask-logit BN (0.1).
        void_prior_prob: p(void) at initialisation (0.9).
    """

    def __init__(
        self,
        memory_channels: int,
        embed_dim: int,
        num_classes: int,
        *,
        mask_bn_gamma: float,
        void_prior_prob: float,
    ) -> None:
        super().__init__()
        self.transformer_mask_head = ConvBN(memory_channels, embed_dim, ndim=1)
        self.transformer_class_head = _final_conv(memory_channels, num_classes + 1, ndim=1)
        self.mask_logit_bn = nn.BatchNorm1d(1)
        nn.init.constant_(self.mask_logit_bn.weight, mask_bn_gamma)
        void_bias = torch.zeros(num_classes + 1)
        # deeplab2 add_bias_towards_void: log((num_logits - 1) p / (1 - p)) = log(133 * 9) on COCO.
        void_bias[-1] = math.log(num_classes * void_prior_prob / (1.0 - void_prior_prob))
        self.register_buffer("void_bias", void_bias, persistent=False)

    def forward(
        self, class_feature: torch.Tensor, mask_feature: torch.Tensor, pixel_embed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """class_feature, mask_feature: B x C_g x N; pixel_embed: B x D x H x W.

        Returns:
            class_logits: B x N x (K+1); mask_logits: B x N x H x W.
        """
        class_logits = self.transformer_class_head(class_feature).transpose(1, 2) + self.void_bias
        kernels = self.transformer_mask_head(mask_feature)  # B x D x N
        mask_logits = torch.einsum("bdhw,bdn->bnhw", pixel_embed, kernels)
        B, N, H, W = mask_logits.shape
        # One BN over an extra unit axis: statistics over B x N x H x W, no per-slot affine.
        mask_logits = self.mask_logit_bn(mask_logits.reshape(B, 1, N * H * W))
        return class_logits, mask_logits.reshape(B, N, H, W)


def aspp_pool_size(train_crop_size: int) -> int | None:
    """deeplab2's ASPP pooling window side for a model trained on S x S crops, None for global.

    deeplab2 scales the train crop to the output stride as `int((S - 1) / 16 + 1)` (41 for 641,
    65 for 1025), the side of the stride-16 map at the training crop (`model/deeplab.py`).
    """
    if train_crop_size <= 0:
        return None
    return (train_crop_size - 1) // OUTPUT_STRIDE + 1


class ASPP(nn.Module):
    """1x1, three atrous 3x3 and image-pooling branches -> concat -> 1x1 -> dropout (deeplab2).

    Args:
        pool_size: the image-pooling window side (`aspp_pool_size`), None for global pooling.
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: list[int], *, pool_size: int | None
    ) -> None:
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"ASPP needs exactly 3 atrous rates, got {rates}")
        self.conv_bn_act = ConvBN(in_channels, out_channels, 1, relu=True)
        self.aspp_convs = nn.ModuleList(
            ConvBN(in_channels, out_channels, 3, dilation=rate, relu=True) for rate in rates
        )
        self.pool_size = pool_size
        self.pool_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool_bn = nn.BatchNorm2d(out_channels)
        he_normal_(self.pool_conv.weight)
        self.proj_conv_bn_act = ConvBN(5 * out_channels, out_channels, 1, relu=True)
        self.dropout = nn.Dropout(ASPP_DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.conv_bn_act(x), *(conv(x) for conv in self.aspp_convs), self._pool(x)]
        return self.dropout(self.proj_conv_bn_act(torch.cat(branches, dim=1)))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """deeplab2's ASPPPool: 'valid' average pooling with stride 1 over the window (the whole
        map at the training crop), 1x1 conv + BN + ReLU, aligned-corner resize back to h x w.

        Along an axis shorter than the window (an input below the training crop, where
        deeplab2's pooling fails) the window shrinks to the axis; smaller on both: global pooling.
        """
        H, W = x.shape[-2:]
        window = (
            (H, W) if self.pool_size is None else (min(self.pool_size, H), min(self.pool_size, W))
        )
        pooled = self.pool_conv(F.avg_pool2d(x, window, stride=1))  # B x C x h' x w'
        if pooled.shape[-2:] == (1, 1):
            # Broadcast *before* the BN: the batch statistics are those of the 1x1 map (deeplab2),
            # and a batch of one image still trains (PyTorch's BN refuses to normalise a single
            # value per channel, TF's returns beta).
            return F.relu(self.pool_bn(pooled.expand(-1, -1, H, W)))
        return resize_align_corners(F.relu(self.pool_bn(pooled)), (H, W))


class AuxiliarySemanticBranch(nn.Module):
    """The auxiliary semantic decoder + head: B x (K+1) x H/4 x W/4 semantic logits (void = 0).

    Args:
        in_channels: channels of the semantic feature (res5: 2048 for S).
        low_level_in_channels: channels of res3 and res2 (512, 256 for S).
        num_classes: K; the head predicts K + 1 channels.
        use_decoder: False when the semantic feature is already at stride 4 (MaX-DeepLab-L).
        aspp_channels, aspp_rates: the ASPP width and its 3 atrous rates.
        aspp_pool_size: the ASPP image-pooling window side, None for global pooling.
        low_level_channels: the projection width of each low-level feature (res3, res2).
        decoder_channels: width of the low-level fusions.
        head_channels: width of the head's separable 5x5 conv.
    """

    def __init__(
        self,
        in_channels: int,
        low_level_in_channels: list[int],
        num_classes: int,
        *,
        use_decoder: bool,
        aspp_channels: int,
        aspp_rates: list[int],
        aspp_pool_size: int | None,
        low_level_channels: list[int],
        decoder_channels: int,
        head_channels: int,
    ) -> None:
        super().__init__()
        self.use_decoder = use_decoder
        if use_decoder:
            self.aspp = ASPP(in_channels, aspp_channels, aspp_rates, pool_size=aspp_pool_size)
            self.low_level_convs = nn.ModuleList(
                ConvBN(c_in, c, 1, relu=True)
                for c_in, c in zip(low_level_in_channels, low_level_channels, strict=True)
            )
            fused_in = [aspp_channels] + [decoder_channels] * (len(low_level_channels) - 1)
            self.fusion_convs = nn.ModuleList(
                SeparableConvBN(prev + c, decoder_channels, SEPARABLE_KERNEL)
                for prev, c in zip(fused_in, low_level_channels, strict=True)
            )
            in_channels = decoder_channels
        self.conv_block = SeparableConvBN(in_channels, head_channels, SEPARABLE_KERNEL)
        self.final_conv = _final_conv(head_channels, num_classes + 1)

    def forward(self, feature: torch.Tensor, low_level: list[torch.Tensor]) -> torch.Tensor:
        """feature: B x C x h x w; low_level: [res3, res2] (activated), coarse to fine."""
        if self.use_decoder:
            x = self.aspp(feature)
            branches = zip(self.low_level_convs, self.fusion_convs, low_level, strict=True)
            for conv, fusion, low in branches:
                x = resize_align_corners(x, tuple(low.shape[-2:]))
                x = fusion(torch.cat([x, conv(low)], dim=1))
        else:
            x = feature
        return self.final_conv(self.conv_block(x))
