"""Axial attention with relative positional encodings (Axial-DeepLab, ECCV 2020).

Described in docs/deeplab2.md#axial-attention.

deeplab2: `model/layers/axial_layers.py` (AxialAttention, AxialAttention2D) and
`model/layers/positional_encodings.py` (RelativePositionalEncoding).

One 1-D layer attends along one axis of a B x C x H x W map, every other position folded into the
batch. Per head it sums three similarity terms (content q.k, query-RPE q.r_q, key-RPE k.r_k), each
with its own BatchNorm statistics and *no* 1/sqrt(d) scaling (the BN replaces it), takes a global
softmax over the axis, and retrieves two terms (content A.v and value-RPE A.r_v), again batch-normed
separately, then summed. The height layer runs on the NCHW map, the width layer on its H/W
transpose; q, k and v are each copied once into a (B W h) x L x d layout of which every batched
product takes a view, so backward keeps one copy of each (and of the attention weights).
"""

from __future__ import annotations

import torch
from torch import nn

from maxdeeplab.models.layers import truncated_normal_

# deeplab2 positional_encodings.MAX_SPAN: tables hold 2 * 255 - 1 = 509 relative offsets, enough for
# global attention on any axis up to 255 long (crops up to 4065 at stride 16).
MAX_SPAN = 255
# deeplab2 query_shape=129: longer axes need local attention, which deeplab2 never implemented.
MAX_GLOBAL_LENGTH = 129


class RelativePositionalEncoding(nn.Module):
    """A learned table of (2 * max_span - 1) x depth, shared by all heads.

    See docs/deeplab2.md#relative-positional-encodings.

    The entry for query i and key j is `table[j - i + max_span - 1]`.
    """

    def __init__(self, depth: int, *, table_length: int, std: float = 1.0) -> None:
        super().__init__()
        self.max_span = (table_length + 1) // 2
        self.embeddings = nn.Parameter(torch.empty(table_length, depth))
        truncated_normal_(self.embeddings, std)

    def forward(self, length: int) -> torch.Tensor:
        """Returns the L x L x depth encodings of a length-L axis (queries and keys alike)."""
        positions = torch.arange(length, device=self.embeddings.device)
        distance = positions[None, :] - positions[:, None] + self.max_span - 1
        distance = distance.clamp(0, self.embeddings.shape[0] - 1)
        return self.embeddings[distance]


class AxialAttention1D(nn.Module):
    """Global multi-head attention along the height axis of a B x C x H x W map.

    Args:
        in_channels: C.
        key_depth: total query/key depth K over all heads.
        value_depth: total value depth V over all heads (the output channels).
        num_heads: heads; K and V must be divisible by it.
        rpe_length: relative-position table length (509 in deeplab2).
    """

    def __init__(
        self,
        in_channels: int,
        key_depth: int,
        value_depth: int,
        *,
        num_heads: int,
        rpe_length: int,
    ) -> None:
        super().__init__()
        if key_depth % num_heads or value_depth % num_heads:
            raise ValueError(
                f"key depth {key_depth} and value depth {value_depth} must be divisible by "
                f"num_heads {num_heads}"
            )
        self.key_depth, self.value_depth, self.num_heads = key_depth, value_depth, num_heads
        self.qkv = nn.Conv2d(in_channels, 2 * key_depth + value_depth, 1, bias=False)
        truncated_normal_(self.qkv.weight, in_channels**-0.5)
        self.qkv_bn = nn.BatchNorm2d(2 * key_depth + value_depth)
        # Statistics per (term, head) over the 3 similarity terms, per (term, channel) over the 2
        # retrieved terms: deeplab2 BN axes [0, 2] and [0, 2, 4] of the stacked tensors.
        self.similarity_bn = nn.BatchNorm2d(3 * num_heads)
        self.retrieved_bn = nn.BatchNorm2d(2 * value_depth)
        self.query_rpe = RelativePositionalEncoding(key_depth // num_heads, table_length=rpe_length)
        self.key_rpe = RelativePositionalEncoding(key_depth // num_heads, table_length=rpe_length)
        self.value_rpe = RelativePositionalEncoding(
            value_depth // num_heads, table_length=rpe_length
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C x H x W -> B x V x H x W, attending along H for every column."""
        B, _, H, W = x.shape
        if H > MAX_GLOBAL_LENGTH:
            raise ValueError(
                f"axial attention over {H} positions: deeplab2 only has global attention up to "
                f"{MAX_GLOBAL_LENGTH} (crops up to 2049 at stride 16)"
            )
        h, K, V = self.num_heads, self.key_depth, self.value_depth
        dk, dv = K // h, V // h
        qkv = self.qkv_bn(self.qkv(x))  # B x (2K + V) x L x W

        # One copy of q, k and v each, laid out (B W h) x L x d so that every product below takes
        # a view of it (einsum would copy q and k twice and the weights three times, and backward
        # keeps every copy: docs/benchmarks.md#where-the-memory-goes).
        def per_head(channels: torch.Tensor, depth: int) -> torch.Tensor:
            heads = channels.reshape(B, h, depth, H, W).permute(0, 4, 1, 3, 2)
            return heads.reshape(B * W * h, H, depth)  # (B W h) x L x d

        q, k, v = (
            per_head(qkv[:, :K], dk),
            per_head(qkv[:, K : 2 * K], dk),
            per_head(qkv[:, 2 * K :], dv),
        )
        rpe_q, rpe_k, rpe_v = self.query_rpe(H), self.key_rpe(H), self.value_rpe(H)  # L x L x d
        content = torch.bmm(q, k.transpose(1, 2))  # (B W h) x L x L
        # q.r_q for query l and key m is a product batched over l; k.r_k one batched over m.
        query_term = torch.bmm(q.transpose(0, 1), rpe_q.transpose(1, 2)).transpose(0, 1)
        key_term = torch.bmm(k.transpose(0, 1), rpe_k.permute(1, 2, 0)).permute(1, 2, 0)
        similarity = torch.stack(
            [t.reshape(B * W, h, H, H) for t in (content, query_term, key_term)], dim=1
        )  # (B W) x 3 x h x L x L
        similarity = self.similarity_bn(similarity.reshape(B * W, 3 * h, H, H))
        weights = similarity.reshape(B * W, 3, h, H, H).sum(dim=1).softmax(dim=-1)
        weights = weights.reshape(B * W * h, H, H)
        retrieved = torch.stack(
            [
                torch.bmm(weights, v),  # (B W h) x L x dv
                torch.bmm(weights.transpose(0, 1), rpe_v).transpose(0, 1),
            ]
        )  # 2 x (B W h) x L x dv
        retrieved = retrieved.reshape(2, B, W, h, H, dv).permute(1, 0, 3, 5, 4, 2)
        retrieved = self.retrieved_bn(retrieved.reshape(B, 2 * V, H, W))  # B x 2 x h x dv x L x W
        return retrieved.reshape(B, 2, V, H, W).sum(dim=1)


class AxialAttention2D(nn.Module):
    """Height-axis then width-axis attention (deeplab2 AxialAttention2D), optional striding.

    Args:
        in_channels: C of the input.
        filters: f; key depth = f * key_expansion, value depth = f * value_expansion.
        stride: subsampling applied after each axis ([::s]); 1 everywhere in MaX-DeepLab.
        num_heads, rpe_length: as for AxialAttention1D.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        *,
        stride: int = 1,
        key_expansion: float,
        value_expansion: float,
        num_heads: int,
        rpe_length: int,
    ) -> None:
        super().__init__()
        key_depth = int(round(filters * key_expansion))
        value_depth = int(round(filters * value_expansion))
        self.out_channels = value_depth
        self.stride = stride
        self.height_axis = AxialAttention1D(
            in_channels, key_depth, value_depth, num_heads=num_heads, rpe_length=rpe_length
        )
        self.width_axis = AxialAttention1D(
            value_depth, key_depth, value_depth, num_heads=num_heads, rpe_length=rpe_length
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C x H x W -> B x V x H' x W' (H' = ceil(H / stride))."""
        s = self.stride
        x = self.height_axis(x)
        if s > 1:
            x = x[:, :, ::s, :]
        x = self.width_axis(x.transpose(2, 3)).transpose(2, 3)
        if s > 1:
            x = x[:, :, :, ::s]
        return x
