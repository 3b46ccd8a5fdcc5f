"""Building blocks shared by the whole network: conv + BN, initialisers, drop path, checkpointing.

Initialisation follows deeplab2 (docs/deeplab2.md#normalisation-and-initialisation), which uses
Keras initialisers:
- `he_normal`: a normal with std sqrt(2 / fan_in) / 0.8796, truncated at +-2 std (the divisor
  restores the std lost by truncation). Every conv and 1x1 "Conv1D" kernel uses it unless stated
  otherwise.
- `TruncatedNormal(std)`: a normal with that std *before* truncation at +-2 std (no correction).
  Used for the attention qkv kernels, the relative positional encodings, the memory and the final
  heads.
- Keras `DepthwiseConv2D` keeps its default `glorot_uniform` (deeplab2 passes no initialiser).
Batch norm: gamma 1, beta 0, except the last BN of every residual branch (gamma 0, so each block
starts as the identity). Momentum and epsilon are set for the whole model by `configure_batch_norm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Keras' truncated normal keeps +-2 std; the std of the truncated standard normal is 0.87962566.
TRUNCATED_NORMAL_STD_CORRECTION = 0.87962566103423978
DROP_PATH_NUM_STAGES = 4  # deeplab2 drop_path.get_drop_path_keep_prob(num_stages=4)


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Keras `TruncatedNormal(stddev=std)`: N(0, std^2) truncated at +-2 std."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def he_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Keras `he_normal` for a PyTorch conv/linear weight (out, in/groups, *kernel)."""
    fan_in = weight[0].numel()
    return truncated_normal_(weight, math.sqrt(2.0 / fan_in) / TRUNCATED_NORMAL_STD_CORRECTION)


def depthwise_glorot_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """Keras `glorot_uniform` on a depthwise kernel (kh, kw, C, 1), given as PyTorch (C, 1, kh, kw).

    Keras computes the fans from its own kernel shape: fan_in = C * kh * kw, fan_out = kh * kw.
    """
    channels, _, kh, kw = weight.shape
    limit = math.sqrt(6.0 / (channels * kh * kw + kh * kw))
    return nn.init.uniform_(weight, -limit, limit)


class ConvBN(nn.Module):
    """Convolution without bias -> BatchNorm -> optional ReLU (deeplab2 Conv2DSame / Conv1D).

    `ndim=2` works on B x C x H x W, `ndim=1` on B x C x L (deeplab2's 1x1 "Conv1D" on sequences).
    Padding is (k_eff - 1) // 2 on each side: for odd input sizes this equals deeplab2's top-left
    aligned padding for strided convs and TF 'same' for stride 1 (docs/deeplab2.md#residual-blocks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        dilation: int = 1,
        relu: bool = False,
        zero_gamma: bool = False,
        ndim: int = 2,
    ) -> None:
        super().__init__()
        conv_cls: Any = nn.Conv2d if ndim == 2 else nn.Conv1d
        bn_cls: Any = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm1d
        padding = dilation * (kernel_size - 1) // 2
        self.conv = conv_cls(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        )
        self.bn = bn_cls(out_channels)
        self.relu = relu
        he_normal_(self.conv.weight)
        if zero_gamma:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class SeparableConvBN(nn.Module):
    """Depthwise k x k -> BN -> ReLU -> 1x1 -> BN -> ReLU (deeplab2 SeparableConv2DSame)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=in_channels,
            bias=False,
        )
        self.depthwise_bn = nn.BatchNorm2d(in_channels)
        self.pointwise = ConvBN(in_channels, out_channels, 1, relu=True)
        depthwise_glorot_uniform_(self.depthwise.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(F.relu(self.depthwise_bn(self.depthwise(x))))


def configure_batch_norm(module: nn.Module, *, momentum: float, eps: float) -> None:
    """Set momentum and epsilon on every BatchNorm (Keras 0.99 -> PyTorch 0.01, 1e-3).

    See docs/deeplab2.md#normalisation-and-initialisation.
    """
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.momentum = momentum
            child.eps = eps


def resize_align_corners(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize with align_corners=True (docs/deeplab2.md#resizes); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------------------------
# Drop path (stochastic depth), docs/deeplab2.md#drop-path.


def drop_path_keep_prob(
    keep_prob_last_stage: float,
    schedule: str,
    current_stage: int,
    num_stages: int = DROP_PATH_NUM_STAGES,
) -> float:
    """Keep probability of a block at `current_stage` = log2(original stride) - 1.

    'constant': every eligible block keeps `keep_prob_last_stage`.
    'linear': 1.0 at stage 0 (the stem) falling linearly to `keep_prob_last_stage` at `num_stages`.
    The schedule is one of `config.DROP_PATH_SCHEDULES`; `model_config_problem` checks it.
    """
    if schedule == "linear":
        return 1.0 - (1.0 - keep_prob_last_stage) * current_stage / num_stages
    return keep_prob_last_stage


def drop_path_mask(
    reference: torch.Tensor, keep_prob: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A per-sample mask floor(keep + U[0, 1)) / keep, shaped B x 1 x ... like `reference`.

    Its expectation is 1, so the residual branch keeps its scale on average.
    """
    shape = (reference.shape[0],) + (1,) * (reference.dim() - 1)
    # Drawn in float32 (also under autocast) so that 1 / keep is not rounded to bf16.
    noise = torch.rand(shape, device=reference.device, generator=generator)
    return (torch.floor(keep_prob + noise) / keep_prob).to(reference.dtype)


# ----------------------------------------------------------------------------------------------
# Activation checkpointing with BN running statistics updated once.


@contextmanager
def frozen_batch_norm_stats(module: nn.Module) -> Iterator[None]:
    """Run BNs in `module` with batch statistics but without touching their running averages.

    Used for the recomputation pass of activation checkpointing: it normalises exactly as the
    first pass did, and momentum 0 leaves the running mean and variance as they are.
    """
    saved = []
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            tracked = child.num_batches_tracked
            saved.append((child, child.momentum, None if tracked is None else tracked.clone()))
            child.momentum = 0.0
    try:
        yield
    finally:
        for child, momentum, tracked in saved:
            child.momentum = momentum
            if tracked is not None and child.num_batches_tracked is not None:
                child.num_batches_tracked.copy_(tracked)


def checkpointed_call(module: nn.Module, fn: Callable[..., torch.Tensor], *args: Any) -> Any:
    """`fn(*args)` under torch.utils.checkpoint; BN statistics are updated by the first pass only.

    Randomness (drop-path masks) must be drawn by the caller and passed in `args`, as in deeplab2,
    so that the recomputation sees the same masks.
    """
    calls = [0]

    def run(*inner: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return fn(*inner)
        with frozen_batch_norm_stats(module):
            return fn(*inner)

    return checkpoint(run, *args, use_reentrant=False)
