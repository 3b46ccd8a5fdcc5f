"""The dual-path transformer layer of MaX-DeepLab (CVPR 2021, section 3.2).

Described in docs/deeplab2.md#dual-path-transformer.

deeplab2: `model/layers/dual_path_transformer.py` (DualPathTransformerLayer, AttentionOperation).

A layer couples the 2-D pixel path P (B x C_p x H x W, not activated) with the 1-D memory path
M (B x C_m x N), both as bottleneck residual branches:
1. 1x1 down-projections with BN + ReLU: m = f(M), p = f(ReLU(P)) to C_b channels.
2. q, k, v for both paths by one 1x1 + BN each (init std C_b^-0.5).
3. Memory-to-pixel and memory-to-memory share ONE softmax: memory queries attend over
   [pixel keys ; memory keys] with values [pixel values ; memory values]. No 1/sqrt(d): the logits
   get a BN (per head), the retrieved values a BN (per channel) + ReLU, then 1x1 + BN(gamma 0),
   drop path, M' = ReLU(M + .).
4. Memory FFN: M'' = ReLU(M' + DropPath(BN_0(W2 ReLU(BN(W1 M'))))).
5. Pixel-to-memory: pixel queries attend to the memory keys/values of step 2, i.e. computed from
   the layer's *input* memory (in parallel with step 3), then BN + ReLU, 1x1 + BN(gamma 0), drop
   path, P' = P + . (not activated).
Pixel-to-pixel attention is the axial block before this layer (docs/deeplab2.md#dual-path-layer).
The three residual updates take independent drop-path masks (docs/deeplab2.md#drop-path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maxdeeplab.models.layers import ConvBN, truncated_normal_


@dataclass
class DualPathDropMasks:
    """Independent per-sample drop-path masks (each B x 1 x 1) for the three residual updates."""

    pixel: torch.Tensor
    memory_attention: torch.Tensor
    memory_ffn: torch.Tensor


class AttentionOperation(nn.Module):
    """Softmax attention with BN on the logits (per head) and on the retrieved values (per channel).

    deeplab2 AttentionOperation; the retrieved values are ReLU-activated.
    """

    def __init__(self, num_heads: int, value_depth: int) -> None:
        super().__init__()
        self.similarity_bn = nn.BatchNorm2d(num_heads)
        self.retrieved_bn = nn.BatchNorm1d(value_depth)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query: B x h x Lq x dk, key: B x h x Lk x dk, value: B x h x Lk x dv.

        Returns:
            B x (h dv) x Lq.
        """
        B, h, Lq, _ = query.shape
        logits = self.similarity_bn(torch.einsum("bhld,bhmd->bhlm", query, key))
        weights = logits.softmax(dim=-1)
        retrieved = torch.einsum("bhlm,bhmd->bhdl", weights, value)  # B x h x dv x Lq
        return F.relu(self.retrieved_bn(retrieved.reshape(B, -1, Lq)))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B x (h d) x L -> B x h x L x d."""
    B, C, L = x.shape
    return x.reshape(B, num_heads, C // num_heads, L).transpose(2, 3)


class DualPathTransformerLayer(nn.Module):
    """One dual-path layer: joint M2P + M2M attention, memory FFN and P2M attention.

    Args:
        pixel_channels: C_p of the pixel path (2048 in MaX-DeepLab-S stage 5).
        memory_channels: C_m of the memory (256 for S).
        filters: 128 * transformer expansion; bottleneck C_b = filters * bottleneck_expansion,
            key depth = filters * key_expansion, value depth = filters * value_expansion.
        ffn_channels: hidden width of the memory FFN (2048).
        num_heads, bottleneck_expansion, key_expansion, value_expansion: deeplab2's fixed
            dual-path settings (no config field sets them).
    """

    def __init__(
        self,
        pixel_channels: int,
        memory_channels: int,
        *,
        filters: int,
        ffn_channels: int,
        num_heads: int = 8,
        bottleneck_expansion: float = 2.0,
        key_expansion: float = 1.0,
        value_expansion: float = 2.0,
    ) -> None:
        super().__init__()
        bottleneck = int(round(filters * bottleneck_expansion))
        key_depth = int(round(filters * key_expansion))
        value_depth = int(round(filters * value_expansion))
        if key_depth % num_heads or value_depth % num_heads:
            raise ValueError(
                f"key depth {key_depth} and value depth {value_depth} must be divisible by "
                f"num_heads {num_heads}"
            )
        self.num_heads, self.key_depth, self.value_depth = num_heads, key_depth, value_depth
        qkv_depth = 2 * key_depth + value_depth
        self.memory_conv1_bn_act = ConvBN(memory_channels, bottleneck, relu=True, ndim=1)
        self.pixel_conv1_bn_act = ConvBN(pixel_channels, bottleneck, relu=True, ndim=1)
        self.memory_qkv_conv_bn = ConvBN(bottleneck, qkv_depth, ndim=1)
        self.pixel_qkv_conv_bn = ConvBN(bottleneck, qkv_depth, ndim=1)
        for qkv in (self.memory_qkv_conv_bn, self.pixel_qkv_conv_bn):
            truncated_normal_(qkv.conv.weight, bottleneck**-0.5)
        self.memory_attention = AttentionOperation(num_heads, value_depth)
        self.pixel_attention = AttentionOperation(num_heads, value_depth)
        self.memory_conv3_bn = ConvBN(value_depth, memory_channels, zero_gamma=True, ndim=1)
        self.memory_ffn_conv1_bn_act = ConvBN(memory_channels, ffn_channels, relu=True, ndim=1)
        self.memory_ffn_conv2_bn = ConvBN(ffn_channels, memory_channels, zero_gamma=True, ndim=1)
        self.pixel_conv3_bn = ConvBN(value_depth, pixel_channels, zero_gamma=True, ndim=1)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B x (2K + V) x L -> q, k: B x h x L x dk; v: B x h x L x dv."""
        K, h = self.key_depth, self.num_heads
        return (
            _split_heads(x[:, :K], h),
            _split_heads(x[:, K : 2 * K], h),
            _split_heads(x[:, 2 * K :], h),
        )

    def forward(
        self, pixel: torch.Tensor, memory: torch.Tensor, masks: DualPathDropMasks | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel: B x C_p x H x W (not activated), memory: B x C_m x N.

        Returns:
            pixel: B x C_p x H x W (not activated); memory: B x C_m x N (activated).
        """
        B, C_p, H, W = pixel.shape
        pixel_flat = pixel.reshape(B, C_p, H * W)  # B x C_p x L
        memory_space = self.memory_conv1_bn_act(memory)
        pixel_space = self.pixel_conv1_bn_act(F.relu(pixel_flat))
        memory_q, memory_k, memory_v = self._qkv(self.memory_qkv_conv_bn(memory_space))
        pixel_q, pixel_k, pixel_v = self._qkv(self.pixel_qkv_conv_bn(pixel_space))

        # M2P + M2M: one softmax over [pixels ; memory].
        update = self.memory_attention(
            memory_q, torch.cat([pixel_k, memory_k], dim=2), torch.cat([pixel_v, memory_v], dim=2)
        )
        update = self.memory_conv3_bn(update)
        if masks is not None:
            update = update * masks.memory_attention
        memory_out = F.relu(memory + update)
        update = self.memory_ffn_conv2_bn(self.memory_ffn_conv1_bn_act(memory_out))
        if masks is not None:
            update = update * masks.memory_ffn
        memory_out = F.relu(memory_out + update)

        # P2M: reads the memory keys/values computed from the input memory.
        update = self.pixel_conv3_bn(self.pixel_attention(pixel_q, memory_k, memory_v))
        if masks is not None:
            update = update * masks.pixel
        pixel_out = (pixel_flat + update).reshape(B, C_p, H, W)
        return pixel_out, memory_out
