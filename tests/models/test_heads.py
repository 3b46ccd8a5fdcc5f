"""The ASPP image pooling sized from the training crop, as deeplab2 sizes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maxdeeplab.models.config import ModelConfig, variant_overrides
from maxdeeplab.models.heads import ASPP, aspp_pool_size
from maxdeeplab.models.network import build_model

C_IN, C_OUT, RATES = 6, 4, [1, 2, 3]
WINDOW = 5  # a model trained on 65 x 65 crops: stride-16 maps of 5 x 5


def _pair(seed: int = 0) -> tuple[ASPP, ASPP]:
    """A tiled-pooling ASPP and a global-pooling one with the same random weights, in eval mode."""
    torch.manual_seed(seed)
    tiled = ASPP(C_IN, C_OUT, RATES, pool_size=WINDOW)
    with torch.no_grad():
        for bn in (m for m in tiled.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.normal_()
    glob = ASPP(C_IN, C_OUT, RATES, pool_size=None)
    glob.load_state_dict(tiled.state_dict())
    return tiled.eval(), glob.eval()


def test_pool_size_is_deeplab2s_scaled_train_crop() -> None:
    assert aspp_pool_size(641) == 41 and aspp_pool_size(1025) == 65 and aspp_pool_size(65) == 5
    assert aspp_pool_size(0) is None


def test_at_the_training_crop_the_window_is_global_pooling() -> None:
    tiled, glob = _pair()
    x = torch.randn(2, C_IN, WINDOW, WINDOW)
    torch.testing.assert_close(tiled(x), glob(x))
    tiled.train(), glob.train()  # batch statistics of the 1 x 1 map, as before
    torch.testing.assert_close(tiled._pool(x), glob._pool(x))


def test_larger_inputs_pool_over_the_training_crops_window() -> None:
    tiled, glob = _pair()
    x = torch.randn(1, C_IN, 9, 13)
    pooled = F.avg_pool2d(x, WINDOW, stride=1)  # 'valid', stride 1: 5 x 9 window means
    expected = F.relu(tiled.pool_bn(tiled.pool_conv(pooled)))
    expected = F.interpolate(expected, size=(9, 13), mode="bilinear", align_corners=True)
    torch.testing.assert_close(tiled._pool(x), expected)
    assert not torch.allclose(tiled(x), glob(x), atol=1e-3)


def test_maps_smaller_than_the_window_pool_over_the_whole_axis() -> None:
    """Where deeplab2's 'valid' pooling would fail (an input below the training crop)."""
    tiled, glob = _pair()
    x = torch.randn(1, C_IN, 3, 4)
    torch.testing.assert_close(tiled(x), glob(x))
    x = torch.randn(1, C_IN, 3, 7)  # all 3 rows, a 5-column window
    pooled = F.avg_pool2d(x, (3, WINDOW), stride=1)
    expected = F.relu(tiled.pool_bn(tiled.pool_conv(pooled)))
    expected = F.interpolate(expected, size=(3, 7), mode="bilinear", align_corners=True)
    torch.testing.assert_close(tiled._pool(x), expected)


@pytest.mark.parametrize(("train_crop_size", "window"), [(0, None), (65, 5), (641, 41)])
def test_build_model_sizes_the_pooling_from_the_training_crop(
    train_crop_size: int, window: int | None
) -> None:
    cfg = ModelConfig(**variant_overrides("max_deeplab_tiny"), train_crop_size=train_crop_size)
    model = build_model(cfg)
    assert model.aux_semantic is not None
    assert model.aux_semantic.aspp.pool_size == window
