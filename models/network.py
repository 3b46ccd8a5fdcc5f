"""MaX-DeepLab: the assembled network (CVPR 2021; deeplab2 `model/deeplab.py` with the MaX-DeepLab
encoder and head; docs/deeplab2.md#backbone to #decoder-and-heads).

images (RGB in [0, 255]) -> x / 127.5 - 1 -> encoder (Axial-ResNet + dual-path transformer + pixel
decoder + memory) -> pixel-space head, mask/class heads, and the switchable auxiliary semantic
branch.

`build_model(cfg)` is the only reader of `ModelConfig`; `parameter_groups` applies deeplab2's
backbone learning-rate rule (sizes and MACs: `models/complexity.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from maxdeeplab.models.backbone.axial_resnet import EXTRA, MEMORY_FEATURE, AxialResNet
from maxdeeplab.models.backbone.block_group import TRANSFORMER
from maxdeeplab.models.config import ModelConfig, model_config_problem
from maxdeeplab.models.heads import (
    AuxiliarySemanticBranch,
    MaskClassHead,
    PixelSpaceHead,
    aspp_pool_size,
)
from maxdeeplab.models.layers import (
    DROP_PATH_NUM_STAGES,
    configure_batch_norm,
    drop_path_keep_prob,
)
from maxdeeplab.models.strides import HIGH_RESOLUTION_OUTPUT_STRIDE, OUTPUT_STRIDE
from maxdeeplab.models.structures import MaXDeepLabOutput

PIXEL_SCALE = 127.5  # deeplab2 normalises RGB as x / 127.5 - 1; the pad value 127.5 maps to 0
# deeplab2 runner_utils.check_if_variable_in_backbone: encoder variables with these words in their
# names are trained from scratch at the full learning rate
# (docs/deeplab2.md#backbone-learning-rate).
NON_BACKBONE_KEYWORDS = (TRANSFORMER, EXTRA, MEMORY_FEATURE)


class MaXDeepLab(nn.Module):
    """The network. Build it with `build_model`.

    Args:
        encoder: backbone + dual-path transformer + pixel decoder + memory.
        pixel_space_head: feature_panoptic -> L2-normalised pixel embeddings.
        mask_class_head: memory features + pixel embeddings -> class and mask logits.
        aux_semantic: the auxiliary semantic branch, or None to switch it off.
    """

    def __init__(
        self,
        *,
        encoder: AxialResNet,
        pixel_space_head: PixelSpaceHead,
        mask_class_head: MaskClassHead,
        aux_semantic: AuxiliarySemanticBranch | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pixel_space_head = pixel_space_head
        self.mask_class_head = mask_class_head
        self.aux_semantic = aux_semantic

    @property
    def use_checkpointing(self) -> bool:
        """Recompute the axial blocks in the backward pass (deeplab2 `axial_use_recompute_grad`)."""
        return any(group.use_checkpointing for group in self.encoder.block_groups().values())

    @use_checkpointing.setter
    def use_checkpointing(self, value: bool) -> None:
        for group in self.encoder.block_groups().values():
            group.use_checkpointing = value

    def forward(self, images: torch.Tensor) -> MaXDeepLabOutput:
        """images: B x 3 x H x W raw RGB in [0, 255], H and W of the form 16k + 1.

        Returns:
            class_logits B x N x (K+1), mask_logits and pixel_embed at H' = (H - 1) / 4 + 1,
            semantic_logits B x (K+1) x H' x W' when the auxiliary branch is on.
        """
        B, C, H, W = images.shape
        if C != 3 or (H - 1) % OUTPUT_STRIDE or (W - 1) % OUTPUT_STRIDE:
            raise ValueError(
                f"images must be B x 3 x H x W with H, W = 16k + 1 (e.g. 641, 1025); got "
                f"{tuple(images.shape)}"
            )
        features = self.encoder(images / PIXEL_SCALE - 1.0)
        pixel_embed = self.pixel_space_head(features.feature_panoptic)
        class_logits, mask_logits = self.mask_class_head(
            features.class_feature, features.mask_feature, pixel_embed
        )
        semantic_logits = None
        if self.aux_semantic is not None:
            semantic_logits = self.aux_semantic(
                features.feature_semantic, [features.res3, features.res2]
            )
        return MaXDeepLabOutput(
            class_logits=class_logits,
            mask_logits=mask_logits,
            pixel_embed=pixel_embed,
            semantic_logits=semantic_logits,
        )


def build_model(cfg: ModelConfig) -> MaXDeepLab:
    """Build the network described by `cfg` (the dataclass defaults are MaX-DeepLab-S).

    Raises:
        ValueError: `cfg` breaks a rule of `model_config_problem` (e.g. an unknown drop-path
            schedule or backbone type), or has inconsistent widths.
    """
    problem = model_config_problem(cfg)
    if problem is not None:
        key, value, why = problem
        raise ValueError(f"model.{key}={value!r}: {why}")
    # The drop-path knobs end here: every block group gets plain keep probabilities per stage,
    # stage s holding the blocks of original ResNet stride 2^(s+1) (2, 4, 8, 16, 32).
    stage_keep_probs = tuple(
        drop_path_keep_prob(cfg.drop_path_keep_prob, cfg.drop_path_schedule, stage)
        if 2 ** (stage + 1) >= cfg.drop_path_beyond_stride
        else 1.0
        for stage in range(DROP_PATH_NUM_STAGES + 1)
    )
    encoder = AxialResNet(
        num_blocks=list(cfg.num_blocks),
        backbone_type=cfg.backbone_type,
        stem_channels=cfg.stem_channels,
        base_filters=cfg.base_filters,
        use_axial_beyond_stride=cfg.use_axial_beyond_stride,
        attention_bottleneck_expansion=cfg.attention_bottleneck_expansion,
        axial_key_expansion=cfg.axial_key_expansion,
        axial_value_expansion=cfg.axial_value_expansion,
        axial_num_heads=cfg.axial_num_heads,
        rpe_length=cfg.rpe_length,
        backbone_use_transformer_beyond_stride=cfg.backbone_use_transformer_beyond_stride,
        extra_decoder_use_transformer_beyond_stride=cfg.extra_decoder_use_transformer_beyond_stride,
        backbone_decoder_num_stacks=cfg.backbone_decoder_num_stacks,
        extra_decoder_num_stacks=cfg.extra_decoder_num_stacks,
        extra_decoder_blocks_per_stage=cfg.extra_blocks,
        num_mask_slots=cfg.num_mask_slots,
        memory_channels=cfg.memory_channels,
        base_transformer_expansion=cfg.transformer_expansion,
        transformer_ffn_channels=cfg.transformer_ffn_channels,
        global_ffn_channels=cfg.global_ffn_channels,
        drop_path_stage_keep_probs=stage_keep_probs,
    )
    aux_semantic = None
    if cfg.use_aux_semantic:
        aux_semantic = AuxiliarySemanticBranch(
            encoder.semantic_channels,
            [encoder.stage_channels[8], encoder.stage_channels[4]],
            cfg.num_classes,
            use_decoder=encoder.semantic_stride != HIGH_RESOLUTION_OUTPUT_STRIDE,
            aspp_channels=cfg.aspp_channels,
            aspp_rates=list(cfg.aspp_rates),
            aspp_pool_size=aspp_pool_size(cfg.train_crop_size),
            low_level_channels=list(cfg.low_level_channels),
            decoder_channels=cfg.semantic_decoder_channels,
            head_channels=cfg.semantic_head_channels,
        )
    model = MaXDeepLab(
        encoder=encoder,
        pixel_space_head=PixelSpaceHead(
            encoder.panoptic_channels, cfg.pixel_head_channels, cfg.pixel_embed_dim
        ),
        mask_class_head=MaskClassHead(
            cfg.global_ffn_channels,
            cfg.pixel_embed_dim,
            cfg.num_classes,
            mask_bn_gamma=cfg.mask_logit_bn_gamma_init,
            void_prior_prob=cfg.void_prior_prob,
        ),
        aux_semantic=aux_semantic,
    )
    configure_batch_norm(model, momentum=cfg.bn_momentum, eps=cfg.bn_eps)
    model.use_checkpointing = cfg.use_checkpointing
    return model


# ----------------------------------------------------------------------------------------------
# Parameter groups and per-block settings.


def is_backbone_parameter(name: str) -> bool:
    """deeplab2's rule: an encoder parameter whose name has none of the non-backbone keywords."""
    return name.startswith("encoder.") and not any(k in name for k in NON_BACKBONE_KEYWORDS)


def parameter_groups(model: MaXDeepLab) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters that get the 0.1x learning rate, all other trainable parameters)."""
    backbone: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if is_backbone_parameter(name) else others).append(param)
    return backbone, others


def drop_path_keep_probs(model: MaXDeepLab) -> dict[str, list[float]]:
    """The drop-path keep probability of every block, per block group.

    See the table in docs/deeplab2.md#stage-table.
    """
    return {name: list(group.keep_probs) for name, group in model.encoder.block_groups().items()}
