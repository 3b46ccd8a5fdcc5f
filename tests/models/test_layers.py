"""Contracts of the building blocks: init, drop path, axial attention, dual-path layer, blocks."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from maxdeeplab.models.backbone.axial_attention import (
    MAX_SPAN,
    AxialAttention1D,
    AxialAttention2D,
    RelativePositionalEncoding,
)
from maxdeeplab.models.backbone.residual_block import ResidualBlock
from maxdeeplab.models.backbone.resized_fuse import ResizedFuse
from maxdeeplab.models.layers import (
    ConvBN,
    checkpointed_call,
    configure_batch_norm,
    drop_path_keep_prob,
    drop_path_mask,
    he_normal_,
    truncated_normal_,
)
from maxdeeplab.models.transformer import DualPathDropMasks, DualPathTransformerLayer

RPE_LENGTH = 2 * MAX_SPAN - 1  # deeplab2's table, 509 relative offsets
# MaX-DeepLab's axial-attention settings, for the blocks built here without a ModelConfig.
AXIAL = {"key_expansion": 1.0, "value_expansion": 2.0, "num_heads": 8, "rpe_length": RPE_LENGTH}


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    # One thread: these tiny ops are dominated by OpenMP overhead when other tests share the CPUs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _identity_batch_norm(module: nn.Module) -> nn.Module:
    """Eval mode with running stats (0, 1) and eps 0: every BN is exactly the identity."""
    configure_batch_norm(module, momentum=0.1, eps=0.0)
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
    return module.eval()


# ---- initialisation ---------------------------------------------------------------------------


def test_he_normal_matches_keras_std_and_truncation() -> None:
    weight = torch.empty(512, 256, 3, 3)
    he_normal_(weight)
    std = math.sqrt(2.0 / (256 * 9))
    assert weight.std().item() == pytest.approx(std, rel=0.02)
    assert weight.abs().max().item() <= 2 * std / 0.87962566 + 1e-6


def test_truncated_normal_keeps_two_std() -> None:
    tensor = truncated_normal_(torch.empty(100_000), 1.0)
    assert tensor.abs().max().item() <= 2.0
    assert tensor.std().item() == pytest.approx(0.8796, abs=0.01)  # Keras: no std correction


def test_zero_gamma_conv_bn_starts_at_zero_output() -> None:
    layer = ConvBN(8, 16, 3, zero_gamma=True)
    assert torch.count_nonzero(layer(torch.randn(2, 8, 9, 9))) == 0


# ---- drop path --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "stage", "expected"),
    [("linear", 3, 0.85), ("linear", 4, 0.8), ("linear", 0, 1.0), ("constant", 3, 0.8)],
)
def test_drop_path_keep_prob_schedules(schedule: str, stage: int, expected: float) -> None:
    assert drop_path_keep_prob(0.8, schedule, stage) == pytest.approx(expected)


def test_drop_path_mask_is_per_sample_and_unbiased() -> None:
    mask = drop_path_mask(torch.zeros(40_000, 3, 5, 5), 0.8)
    assert mask.shape == (40_000, 1, 1, 1)
    assert mask.unique().tolist() == pytest.approx([0.0, 1.25])
    assert mask.mean().item() == pytest.approx(1.0, abs=0.02)


# ---- axial attention --------------------------------------------------------------------------


def test_relative_positional_encoding_indexes_key_minus_query() -> None:
    rpe = RelativePositionalEncoding(4, table_length=RPE_LENGTH)
    table = rpe(7)
    assert table.shape == (7, 7, 4)
    for i, j in [(0, 0), (0, 6), (6, 0), (3, 5)]:
        assert torch.equal(table[i, j], rpe.embeddings[j - i + 254])


def _reference_axial_height(layer: AxialAttention1D, x: torch.Tensor) -> torch.Tensor:
    """Loops over columns and heads; BNs must be identities (see `_identity_batch_norm`)."""
    B, _, H, W = x.shape
    K, V, h = layer.key_depth, layer.value_depth, layer.num_heads
    dk, dv = K // h, V // h
    qkv = torch.einsum("oc,bchw->bohw", layer.qkv.weight[:, :, 0, 0], x)
    out = torch.zeros(B, V, H, W)
    rq, rk, rv = layer.query_rpe(H), layer.key_rpe(H), layer.value_rpe(H)
    for b in range(B):
        for w in range(W):
            for head in range(h):
                q = qkv[b, head * dk : (head + 1) * dk, :, w].T  # L x dk
                k = qkv[b, K + head * dk : K + (head + 1) * dk, :, w].T
                v = qkv[b, 2 * K + head * dv : 2 * K + (head + 1) * dv, :, w].T
                logits = torch.zeros(H, H)
                for i in range(H):
                    for j in range(H):
                        logits[i, j] = q[i] @ k[j] + q[i] @ rq[i, j] + k[j] @ rk[i, j]
                weights = logits.softmax(dim=-1)
                retrieved = weights @ v + torch.einsum("lm,lmd->ld", weights, rv)
                out[b, head * dv : (head + 1) * dv, :, w] = retrieved.T
    return out


def test_axial_attention_matches_a_loop_reference() -> None:
    layer = _identity_batch_norm(
        AxialAttention1D(6, key_depth=8, value_depth=12, num_heads=2, rpe_length=RPE_LENGTH)
    )
    x = torch.randn(2, 6, 5, 3)
    with torch.no_grad():
        assert torch.allclose(layer(x), _reference_axial_height(layer, x), atol=1e-4)


def test_axial_height_layer_only_mixes_along_height() -> None:
    layer = AxialAttention1D(8, key_depth=8, value_depth=16, num_heads=8, rpe_length=RPE_LENGTH)
    layer.eval()
    x = torch.randn(1, 8, 9, 9)
    changed = x.clone()
    changed[:, :, 4, 2] += 1.0
    with torch.no_grad():
        delta = (layer(changed) - layer(x)).abs().sum(dim=(0, 1))  # H x W
    assert delta[:, 2].min() > 0  # the whole column sees the change
    assert torch.count_nonzero(delta[:, [0, 1, 3, 4, 5, 6, 7, 8]]) == 0


@pytest.mark.parametrize(("stride", "size", "out_size"), [(1, 9, 9), (2, 9, 5)])
def test_axial_attention_2d_shape_contract(stride: int, size: int, out_size: int) -> None:
    layer = AxialAttention2D(16, 8, stride=stride, **AXIAL)
    out = layer(torch.randn(2, 16, size, size + 2 * stride))
    assert out.shape == (2, 16, out_size, (size + 2 * stride - 1) // stride + 1)


def test_axial_attention_rejects_axes_beyond_global_range() -> None:
    layer = AxialAttention1D(8, key_depth=8, value_depth=8, num_heads=8, rpe_length=RPE_LENGTH)
    with pytest.raises(ValueError, match="129"):
        layer(torch.randn(1, 8, 130, 1))


# ---- dual-path transformer ----------------------------------------------------------------------


def _dual_path_layer() -> DualPathTransformerLayer:
    return DualPathTransformerLayer(32, 16, filters=16, num_heads=4, ffn_channels=24)


def test_dual_path_layer_shape_contract_and_identity_at_init() -> None:
    layer = _dual_path_layer()
    pixel, memory = torch.randn(2, 32, 5, 7), torch.randn(2, 16, 6)
    pixel_out, memory_out = layer(pixel, memory)
    assert pixel_out.shape == pixel.shape and memory_out.shape == memory.shape
    # gamma-0 output BNs: the pixel path passes through, the memory path is ReLU'd.
    assert torch.equal(pixel_out, pixel)
    assert torch.equal(memory_out, torch.relu(memory))


def test_pixel_update_reads_the_input_memory_not_the_updated_one() -> None:
    layer = _identity_batch_norm(_dual_path_layer())
    pixel, memory = torch.randn(2, 32, 5, 7), torch.randn(2, 16, 6)
    with torch.no_grad():
        pixel_a, memory_a = layer(pixel, memory)
        for module in (layer.memory_conv3_bn, layer.memory_ffn_conv1_bn_act):
            module.conv.weight.mul_(3.0)
        pixel_b, memory_b = layer(pixel, memory)
    assert torch.equal(pixel_a, pixel_b)  # P2M runs in parallel with the memory updates
    assert not torch.allclose(memory_a, memory_b)


def test_dual_path_drop_masks_are_applied_per_update() -> None:
    layer = _identity_batch_norm(_dual_path_layer())
    pixel, memory = torch.randn(2, 32, 5, 7), torch.randn(2, 16, 6)
    ones, zeros = torch.ones(2, 1, 1), torch.zeros(2, 1, 1)
    with torch.no_grad():
        pixel_out, memory_out = layer(pixel, memory, DualPathDropMasks(zeros, zeros, zeros))
        assert torch.equal(pixel_out, pixel) and torch.equal(memory_out, torch.relu(memory))
        pixel_kept, _ = layer(pixel, memory, DualPathDropMasks(ones, zeros, zeros))
    assert not torch.allclose(pixel_kept, pixel)


# ---- blocks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "attention", "stride"),
    [([4, 4, 16], False, 2), ([16, 8, 16], True, 1), ([16, 16], False, 2), ([4, 4, 8], False, 1)],
)
def test_residual_block_is_its_shortcut_at_init(
    filters: list[int], attention: bool, stride: int
) -> None:
    block = ResidualBlock(8, filters, stride=stride, attention=attention, **AXIAL).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        out = block(x)
        shortcut = torch.relu(x)[:, :, ::stride, ::stride]
        if block.shortcut is not None:
            shortcut = block.shortcut(torch.relu(x))
    assert out.shape == (2, filters[-1], 9 // stride + 9 % stride, 9 // stride + 9 % stride)
    assert torch.allclose(out, shortcut)


def test_resized_fuse_strides_projects_and_resizes() -> None:
    fuse = ResizedFuse([(32, 4), (16, 16), (8, 8)], out_channels=8, out_stride=8)
    assert fuse.kinds == ["strided", "project", "resize"]
    out = fuse(
        [torch.randn(1, 32, 17, 17), torch.randn(1, 16, 5, 5), torch.randn(1, 8, 9, 9)], (9, 9)
    )
    assert out.shape == (1, 8, 9, 9)


def test_checkpointed_call_matches_plain_call_and_updates_bn_once() -> None:
    plain = ResidualBlock(8, [16, 8, 32], attention=True, **AXIAL)
    for module in plain.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    ckpt = ResidualBlock(8, [16, 8, 32], attention=True, **AXIAL)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 7, 7)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(x1).square().sum().backward()
    checkpointed_call(ckpt, ckpt, x2, None).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.allclose(a, b), name  # running stats moved once, not twice
