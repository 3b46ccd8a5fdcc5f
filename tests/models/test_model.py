"""The assembled MaX-DeepLab: deeplab2's exact parameter counts, shapes, gradients, LR groups."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from maxdeeplab.models.complexity import count_macs, count_parameters
from maxdeeplab.models.config import ModelConfig, model_config_problem, variant_overrides
from maxdeeplab.models.layers import ConvBN
from maxdeeplab.models.network import (
    MaXDeepLab,
    build_model,
    drop_path_keep_probs,
    parameter_groups,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _config(variant: str, **overrides: object) -> ModelConfig:
    return ModelConfig(variant=variant, **{**variant_overrides(variant), **overrides})


def _meta_model(variant: str, **overrides: object) -> MaXDeepLab:
    with torch.device("meta"):
        return build_model(_config(variant, **overrides))


# ---- exact sizes (deeplab2's own unit-test numbers) ---------------------------------------------


def test_max_deeplab_s_parameter_counts_match_deeplab2() -> None:
    counts = count_parameters(_meta_model("max_deeplab_s"))
    assert counts.without_aux == 61_900_200  # deeplab_test.py; 61.9M in the paper
    assert counts.encoder == 61_726_624  # axial_resnet_instances_test.py
    assert counts.backbone == 41_343_424  # max_deeplab_s_backbone; runner_utils_test.py
    # 77.76M with the auxiliary branch (docs/deeplab2.md#parameter-and-mac-counts)
    assert counts.total == 77_756_942


def test_max_deeplab_s_without_aux_branch_has_no_aux_parameters() -> None:
    counts = count_parameters(_meta_model("max_deeplab_s", use_aux_semantic=False))
    assert counts.total == counts.without_aux == 61_900_200
    assert counts.aux_semantic == 0


def test_max_deeplab_l_encoder_counts_match_deeplab2() -> None:
    counts = count_parameters(_meta_model("max_deeplab_l"))
    assert counts.encoder == 450_523_232  # axial_resnet_instances_test.py
    assert counts.backbone == 175_115_392  # max_deeplab_l_backbone


def test_macs_at_641_match_the_analytic_estimate() -> None:
    macs = count_macs(_meta_model("max_deeplab_s"), 641)
    # docs/deeplab2.md#parameter-and-mac-counts
    assert macs["without_aux"] / 1e9 == pytest.approx(128, rel=0.02)
    assert macs["total"] / 1e9 == pytest.approx(160, rel=0.02)


# ---- drop path ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "stride16", "stride32"), [("linear", 0.85, 0.8), ("constant", 0.8, 0.8)]
)
def test_drop_path_keep_probs_follow_the_spec_table(
    schedule: str, stride16: float, stride32: float
) -> None:
    probs = drop_path_keep_probs(_meta_model("max_deeplab_s", drop_path_schedule=schedule))
    expected = {
        "stage2": [1.0] * 3,
        "stage3": [1.0] * 4,
        "stage4": [1.0] + [stride16] * 5,  # block 1 has input stride 8
        "stage5": [stride16, stride32, stride32],  # block 1 still has input stride 16
        "stage5_extra": [stride32],
        "decoder_stage1_extra": [1.0],
        "decoder_stage2_extra": [1.0],
    }
    assert probs.keys() == expected.keys()
    for name, values in expected.items():
        assert probs[name] == pytest.approx(values), name


def test_unknown_drop_path_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="drop_path_schedule"):
        build_model(_config("max_deeplab_tiny", drop_path_schedule="cosine"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("drop_path_schedule", "cosine"),
        ("drop_path_keep_prob", 0.0),
        ("drop_path_keep_prob", 1.5),
        ("backbone_type", "resnet"),
    ],
)
def test_model_config_rules_live_in_one_place(field: str, value: object) -> None:
    problem = model_config_problem(ModelConfig(**{field: value}))  # type: ignore[arg-type]
    assert problem is not None and problem[:2] == (field, value)
    assert model_config_problem(ModelConfig()) is None


# ---- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [65, 129, 321])
def test_tiny_output_shapes(crop: int) -> None:
    cfg = _config("max_deeplab_tiny")
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, crop, crop) * 255)
    size = (crop - 1) // 4 + 1
    N, K, D = cfg.num_mask_slots, cfg.num_classes, cfg.pixel_embed_dim
    assert out.class_logits.shape == (2, N, K + 1)
    assert out.mask_logits.shape == (2, N, size, size)
    assert out.pixel_embed.shape == (2, D, size, size)
    assert out.semantic_logits is not None and out.semantic_logits.shape == (2, K + 1, size, size)
    assert torch.allclose(out.pixel_embed.norm(dim=1), torch.ones(2, size, size), atol=1e-4)


@pytest.mark.parametrize("variant", ["max_deeplab_s", "max_deeplab_l"])
def test_full_size_output_shapes_on_meta(variant: str) -> None:
    model = _meta_model(variant).eval()
    out = model(torch.empty(1, 3, 641, 641, device="meta"))
    assert out.class_logits.shape == (1, 128, 134)
    assert out.mask_logits.shape == (1, 128, 161, 161)
    assert out.pixel_embed.shape == (1, 128, 161, 161)
    assert out.semantic_logits is not None and out.semantic_logits.shape == (1, 134, 161, 161)


def test_a_single_image_batch_trains() -> None:
    # The ASPP image-pooling BN sees one value per channel at batch 1 (deeplab2 returns beta there).
    model = build_model(_config("max_deeplab_tiny")).train()
    out = model(torch.rand(1, 3, 65, 65) * 255)
    assert out.semantic_logits is not None and torch.isfinite(out.semantic_logits).all()


def test_crops_not_of_the_form_16k_plus_1_are_rejected() -> None:
    model = _meta_model("max_deeplab_tiny")
    with pytest.raises(ValueError, match="16k"):
        model(torch.empty(1, 3, 64, 64, device="meta"))


# ---- gradients, initial state -------------------------------------------------------------------


def test_every_parameter_of_the_tiny_model_gets_a_gradient() -> None:
    model = build_model(_config("max_deeplab_tiny", drop_path_keep_prob=1.0)).train()
    # The gamma-0 residual BNs would zero the gradients behind them at init: open them first.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
    out = model(torch.rand(2, 3, 65, 65) * 255)
    assert out.semantic_logits is not None
    loss = (
        out.class_logits.logsumexp(-1).mean()
        + out.mask_logits.square().mean()
        + out.semantic_logits.logsumexp(1).mean()
        + (out.pixel_embed * torch.randn_like(out.pixel_embed)).sum()
    )
    loss.backward()
    missing = [
        name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()
    ]
    assert missing == []


def test_initial_class_prior_and_mask_logit_temperature() -> None:
    cfg = _config("max_deeplab_tiny")
    model = build_model(cfg).train()
    out = model(torch.rand(2, 3, 65, 65) * 255)
    void_prob = out.class_logits.softmax(-1)[..., -1]
    assert void_prob.mean().item() == pytest.approx(0.9, abs=0.03)  # focal-style void prior
    assert model.mask_class_head.void_bias[-1].item() == pytest.approx(math.log(133 * 9))
    # One shared BN with gamma 0.1 over all slots: mask logits start with std 0.1.
    assert out.mask_logits.std().item() == pytest.approx(0.1, rel=0.05)


def test_batch_norm_settings_zero_gammas_and_init() -> None:
    model = build_model(_config("max_deeplab_tiny"))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
    named = dict(model.named_modules())
    for name in [
        "encoder.stage2.block1.conv3_bn.bn",
        "encoder.stage5.block2.conv3_bn.bn",
        "encoder.stage5.block1_transformer.memory_conv3_bn.bn",
        "encoder.stage5.block1_transformer.memory_ffn_conv2_bn.bn",
        "encoder.stage5.block1_transformer.pixel_conv3_bn.bn",
    ]:
        assert torch.count_nonzero(named[name].weight) == 0, name
    assert named["encoder.stage5.block1.conv1_bn_act.bn"].weight.eq(1).all()
    assert model.mask_class_head.mask_logit_bn.weight.item() == pytest.approx(0.1)
    # Convs followed by BN have no bias (docs/deeplab2.md#normalisation-and-initialisation).
    assert all(m.conv.bias is None for m in model.modules() if isinstance(m, ConvBN))
    # Truncated normals with std 1.0 (Keras: no correction, so the sample std is 0.88).
    assert model.encoder.memory_feature.std().item() == pytest.approx(0.88, abs=0.05)
    rpe = model.encoder.stage5.block1.attention.height_axis.query_rpe.embeddings
    assert rpe.shape[0] == 509 and rpe.abs().max().item() <= 2.0


# ---- learning-rate groups, checkpointing, configs ------------------------------------------------


def test_parameter_groups_split_backbone_from_transformer_extra_and_memory() -> None:
    model = _meta_model("max_deeplab_s")
    backbone, others = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    backbone_names = [names[id(p)] for p in backbone]
    other_names = [names[id(p)] for p in others]
    assert len(backbone) + len(others) == len(list(model.parameters()))
    assert sum(p.numel() for p in backbone) == 41_343_424
    assert all(n.startswith(("encoder.stem", "encoder.stage")) for n in backbone_names)
    assert not any(w in n for n in backbone_names for w in ("transformer", "extra", "memory"))
    assert "encoder.memory_feature" in other_names
    assert "encoder.stage5.block1_transformer.pixel_qkv_conv_bn.conv.weight" in other_names
    assert "encoder.stage5_extra.block1.attention.height_axis.query_rpe.embeddings" in other_names
    assert "encoder.stage4.block2.attention.width_axis.value_rpe.embeddings" in backbone_names
    assert any(n.startswith("aux_semantic.") for n in other_names)


def test_checkpointing_gives_the_same_gradients() -> None:
    cfg = _config("max_deeplab_tiny", drop_path_keep_prob=1.0)
    plain = build_model(cfg).train()
    for module in plain.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    ckpt = build_model(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.use_checkpointing = True
    assert ckpt.use_checkpointing and not plain.use_checkpointing
    images = torch.rand(2, 3, 65, 65) * 255
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same ASPP dropout masks
        out = model(images)
        loss = out.mask_logits.square().mean() + out.class_logits.logsumexp(-1).mean()
        assert out.semantic_logits is not None
        (loss + out.semantic_logits.logsumexp(1).mean()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float()), name


def test_drop_path_changes_training_outputs_only() -> None:
    model = build_model(_config("max_deeplab_tiny", drop_path_keep_prob=0.5))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
    images = torch.rand(4, 3, 65, 65) * 255
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images).mask_logits, model(images).mask_logits)
        model.train()
        first, second = model(images).mask_logits, model(images).mask_logits
    assert not torch.allclose(first, second)


@pytest.mark.parametrize(
    ("experiment", "expected_encoder"),
    [
        ("max_deeplab_s_os16_res641_100k.yaml", 61_726_624),
        ("max_deeplab_l_os16_res1025_100k.yaml", 450_523_232),
    ],
)
def test_build_model_from_the_model_zoo_experiment_configs(
    experiment: str, expected_encoder: int
) -> None:
    from maxdeeplab.platform.config import load_experiment

    cfg = load_experiment(REPO / "experiments" / "model_zoo" / experiment)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert count_parameters(model).encoder == expected_encoder
    assert cfg.model.drop_path_schedule == "linear"
