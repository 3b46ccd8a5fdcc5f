"""The MaX-DeepLab encoder: Axial-ResNet + dual-path transformer + stacked pixel decoder + memory.

deeplab2: `model/encoder/axial_resnet.py` (AxialResNet) with the instances of
`axial_resnet_instances.py`; docs/deeplab2.md#backbone to #pixel-decoder. This is what deeplab2
counts as the encoder (61,726,624 parameters for MaX-DeepLab-S, 450,523,232 for -L): the stem and
stages 2-5 (ImageNet-pretrained), the dual-path layers, `stage5_extra`, the decoder stages with
their ResizedFuse layers, the memory and the class/mask feature FFNs on the memory.

Submodule names keep deeplab2's words, because the backbone learning-rate rule
(docs/deeplab2.md#backbone-learning-rate) is a rule on names: encoder parameters whose name
contains `transformer`, `extra` or `memory_feature` are not part of the pretrained backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maxdeeplab.models.backbone.block_group import BlockGroup
from maxdeeplab.models.backbone.resized_fuse import ResizedFuse
from maxdeeplab.models.backbone.stem import ConvStem, InceptionStem
from maxdeeplab.models.layers import ConvBN, truncated_normal_
from maxdeeplab.models.strides import HIGH_RESOLUTION_OUTPUT_STRIDE, OUTPUT_STRIDE

EXTRA = "extra"  # deeplab2 axial_resnet.EXTRA: layers trained from scratch (full LR)
MEMORY_FEATURE = "memory_feature"  # deeplab2 axial_resnet.MEMORY_FEATURE
RESNET_INPUT_STRIDES = (1, 2, 4, 8, 16)  # input strides of the 5 stages of an un-dilated ResNet
MEMORY_INIT_STD = 1.0  # docs/deeplab2.md#memory


@dataclass
class EncoderOutput:
    """What the encoder hands to the heads.

    Attributes:
        feature_panoptic: B x C x H/4 x W/4, activated (the mask branch).
        feature_semantic: activated input of the auxiliary semantic branch (res5, stride 16, for S).
        res2, res3: activated stage-2/3 outputs (the auxiliary decoder's low-level features).
        class_feature, mask_feature: B x C_g x N memory features for the class and mask heads.
    """

    feature_panoptic: torch.Tensor
    feature_semantic: torch.Tensor
    res2: torch.Tensor
    res3: torch.Tensor
    class_feature: torch.Tensor
    mask_feature: torch.Tensor


@dataclass(frozen=True)
class DecoderStep:
    """One visit of deeplab2's stacked-decoder loop."""

    stage: int  # 1-based decoder stage index
    stride: int
    original_input_stride: int
    fuse_in_backbone: bool  # the ResizedFuse belongs to the pretrained backbone
    backbone_group: bool  # a backbone decoder block group runs here
    extra_group: bool  # an extra (from scratch) decoder block group runs here
    ends_backbone: bool  # the pretrained backbone ends after this step's backbone group


def decoder_schedule(backbone_stacks: int, extra_stacks: int) -> list[DecoderStep]:
    """deeplab2's stacked-decoder loop: down to stride 4, up to 16, ... until all stacks are done.

    MaX-DeepLab-S (0 + 0 stacks) visits strides 8, 4; -L (1 + 1) visits 8 4 8 16 8 4 8 16 8 4.
    """
    steps, stack, is_backbone = [], 0, backbone_stacks != 0
    stride, going_down, stage = OUTPUT_STRIDE, True, 0
    while stack < backbone_stacks + extra_stacks or stride > HIGH_RESOLUTION_OUTPUT_STRIDE:
        stage += 1
        stride = stride // 2 if going_down else stride * 2
        if stride == OUTPUT_STRIDE:
            stack += 1
            going_down = True
        input_stride = 2 * OUTPUT_STRIDE if stride == OUTPUT_STRIDE else stride
        in_backbone = is_backbone
        if stride == OUTPUT_STRIDE and stack == backbone_stacks:
            is_backbone = False
        steps.append(
            DecoderStep(
                stage,
                stride,
                input_stride,
                fuse_in_backbone=in_backbone,
                backbone_group=in_backbone,
                extra_group=not is_backbone,
                ends_backbone=in_backbone and not is_backbone,
            )
        )
        if stride == HIGH_RESOLUTION_OUTPUT_STRIDE:
            going_down = False
    return steps


class AxialResNet(nn.Module):
    """The encoder. Arguments mirror deeplab2's AxialResNet and its block-group settings.

    Args:
        num_blocks: blocks of the 4 ResNet stages (a Wide-ResNet adds a 3-block stage 1).
        backbone_type: 'resnet_beta' (Inception stem) or 'wider_resnet' (conv stem).
        stem_channels: output channels of the stem.
        base_filters: the stage-2 bottleneck width f (64 for S and L); a stage with original input
            stride s uses f * s / 2, a decoder stage at input stride s has f * s channels.
        use_axial_beyond_stride, attention_bottleneck_expansion, axial_key_expansion,
            axial_value_expansion, axial_num_heads, rpe_length: the axial blocks of every group.
        backbone_use_transformer_beyond_stride, extra_decoder_use_transformer_beyond_stride: the
            original ResNet stride from which the backbone's / the extra groups' blocks get a
            dual-path layer.
        backbone_decoder_num_stacks, extra_decoder_num_stacks: hourglass decoder stacks.
        backbone_decoder_blocks_per_stage, extra_decoder_blocks_per_stage: blocks per decoder
            stage (the extra count also sizes `stage5_extra`).
        num_mask_slots, memory_channels: the memory, N x C_m.
        base_transformer_expansion: dual-path width multiplier at the output stride; a group at
            stride s uses it x s / 16.
        transformer_ffn_channels: hidden width of every dual-path memory FFN.
        global_ffn_channels: width of the class/mask feature FFNs on the memory.
        drop_path_stage_keep_probs: the drop-path keep probability of each stage
            (stage = log2(original ResNet stride) - 1), for every group.
    """

    def __init__(
        self,
        *,
        num_blocks: list[int],
        backbone_type: str,
        stem_channels: int,
        base_filters: int,
        use_axial_beyond_stride: int,
        attention_bottleneck_expansion: float,
        axial_key_expansion: float,
        axial_value_expansion: float,
        axial_num_heads: int,
        rpe_length: int,
        backbone_use_transformer_beyond_stride: int,
        extra_decoder_use_transformer_beyond_stride: int,
        backbone_decoder_num_stacks: int,
        extra_decoder_num_stacks: int,
        extra_decoder_blocks_per_stage: int,
        num_mask_slots: int,
        memory_channels: int,
        base_transformer_expansion: float,
        transformer_ffn_channels: int,
        global_ffn_channels: int,
        drop_path_stage_keep_probs: Sequence[float],
        backbone_decoder_blocks_per_stage: int = 1,  # deeplab2's fixed value; no config field
    ) -> None:
        super().__init__()

        def block_group(
            in_channels: int,
            filters: int,
            num_blocks: int,
            *,
            original_resnet_stride: int,
            original_resnet_input_stride: int,
            use_transformer_beyond_stride: int,
            transformer_expansion: float,
        ) -> BlockGroup:
            """A BlockGroup with the settings that every group of the encoder shares."""
            return BlockGroup(
                in_channels,
                filters,
                num_blocks,
                original_resnet_stride=original_resnet_stride,
                original_resnet_input_stride=original_resnet_input_stride,
                backbone_type=backbone_type,
                use_axial_beyond_stride=use_axial_beyond_stride,
                use_transformer_beyond_stride=use_transformer_beyond_stride,
                attention_bottleneck_expansion=attention_bottleneck_expansion,
                axial_key_expansion=axial_key_expansion,
                axial_value_expansion=axial_value_expansion,
                axial_num_heads=axial_num_heads,
                rpe_length=rpe_length,
                memory_channels=memory_channels,
                transformer_expansion=transformer_expansion,
                transformer_ffn_channels=transformer_ffn_channels,
                drop_path_stage_keep_probs=drop_path_stage_keep_probs,
            )

        self.backbone_decoder_num_stacks = backbone_decoder_num_stacks
        self.extra_decoder_num_stacks = extra_decoder_num_stacks
        total_strides = list(RESNET_INPUT_STRIDES)
        filters = [stride * base_filters // 2 for stride in total_strides]
        strides = [2] * 5
        if backbone_type == "wider_resnet":
            self.stem: nn.Module = ConvStem(stem_channels)
            self.first_stage, num_blocks_list = 1, [3, *num_blocks]
            filters[0] = stem_channels // 2
            strides[0], total_strides[0] = 1, 2
        else:  # 'resnet_beta' (config.BACKBONE_TYPES)
            self.stem = InceptionStem(stem_channels)
            self.first_stage, num_blocks_list = 2, [0, *num_blocks]
        self.memory_feature = nn.Parameter(torch.empty(num_mask_slots, memory_channels))
        truncated_normal_(self.memory_feature, MEMORY_INIT_STD)

        # features[stride] lists (channels) of the endpoints the decoder may fuse (deeplab2's
        # stride_to_features); stage1 is the stem output for ResNet-beta.
        channels = stem_channels
        endpoint_channels = {2: [stem_channels]}
        for index in range(self.first_stage - 1, 5):
            stage = block_group(
                channels,
                filters[index],
                num_blocks_list[index],
                original_resnet_stride=strides[index],
                original_resnet_input_stride=total_strides[index],
                use_transformer_beyond_stride=backbone_use_transformer_beyond_stride,
                # deeplab2 scales by the un-modified input stride, even for the Wide-ResNet.
                transformer_expansion=base_transformer_expansion
                * RESNET_INPUT_STRIDES[index]
                / OUTPUT_STRIDE,
            )
            self.add_module(f"stage{index + 1}", stage)
            channels = stage.out_channels
            endpoint_channels[min(2 ** (index + 1), OUTPUT_STRIDE)] = [channels]
        self.stage_channels = {s: c[0] for s, c in endpoint_channels.items()}
        self.backbone_channels = channels

        if backbone_decoder_num_stacks == 0:
            stage5_extra = block_group(
                channels,
                filters[-1],
                extra_decoder_blocks_per_stage,
                original_resnet_stride=1,
                original_resnet_input_stride=2 * OUTPUT_STRIDE,
                use_transformer_beyond_stride=extra_decoder_use_transformer_beyond_stride,
                transformer_expansion=base_transformer_expansion,
            )
            self.add_module(f"stage5_{EXTRA}", stage5_extra)
            channels = stage5_extra.out_channels
        endpoint_channels[OUTPUT_STRIDE] = [channels]

        self.steps = decoder_schedule(backbone_decoder_num_stacks, extra_decoder_num_stacks)
        for step in self.steps:
            inputs = [(channels, self._previous_stride(step))]
            inputs += [(c, step.stride) for c in endpoint_channels[step.stride][-2:]]
            decoder_channels = step.original_input_stride * base_filters
            suffix = "" if step.fuse_in_backbone else f"_{EXTRA}"
            self.add_module(
                f"decoder_stage{step.stage}{suffix}_resized_fuse",
                ResizedFuse(inputs, decoder_channels, step.stride),
            )
            channels = decoder_channels
            expansion = base_transformer_expansion * step.stride / OUTPUT_STRIDE
            if step.backbone_group:
                self.add_module(
                    f"decoder_stage{step.stage}",
                    block_group(
                        channels,
                        decoder_channels // 4,
                        backbone_decoder_blocks_per_stage,
                        original_resnet_stride=1,
                        original_resnet_input_stride=step.original_input_stride,
                        use_transformer_beyond_stride=backbone_use_transformer_beyond_stride,
                        transformer_expansion=expansion,
                    ),
                )
            if step.extra_group:
                self.add_module(
                    f"decoder_stage{step.stage}_{EXTRA}",
                    block_group(
                        channels,
                        decoder_channels // 4,
                        extra_decoder_blocks_per_stage,
                        original_resnet_stride=1,
                        original_resnet_input_stride=step.original_input_stride,
                        use_transformer_beyond_stride=extra_decoder_use_transformer_beyond_stride,
                        transformer_expansion=expansion,
                    ),
                )
            endpoint_channels[step.stride].append(channels)
        self.panoptic_channels = channels
        self.semantic_channels = channels if extra_decoder_num_stacks else self.backbone_channels
        self.semantic_stride = (
            HIGH_RESOLUTION_OUTPUT_STRIDE if extra_decoder_num_stacks else OUTPUT_STRIDE
        )
        self.class_feature_extra = ConvBN(memory_channels, global_ffn_channels, relu=True, ndim=1)
        self.mask_feature_extra = ConvBN(memory_channels, global_ffn_channels, relu=True, ndim=1)

    def _previous_stride(self, step: DecoderStep) -> int:
        index = self.steps.index(step)
        return OUTPUT_STRIDE if index == 0 else self.steps[index - 1].stride

    def block_groups(self) -> dict[str, BlockGroup]:
        """Every BlockGroup by name, in forward order."""
        return {name: m for name, m in self.named_children() if isinstance(m, BlockGroup)}

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """x: B x 3 x S x S normalised to [-1, 1], S = 16k + 1."""
        B = x.shape[0]
        memory = self.memory_feature.t().unsqueeze(0).expand(B, -1, -1)  # B x C_m x N
        pixel = self.stem(x)
        features = {2: [pixel]}
        for index in range(self.first_stage, 6):
            pixel, memory = getattr(self, f"stage{index}")(pixel, memory)
            features[min(2**index, OUTPUT_STRIDE)] = [pixel]
        res2, res3 = F.relu(features[4][0]), F.relu(features[8][0])
        backbone_output = F.relu(pixel)
        if self.backbone_decoder_num_stacks == 0:
            pixel, memory = getattr(self, f"stage5_{EXTRA}")(pixel, memory)
        features[OUTPUT_STRIDE] = [pixel]
        high_resolution = []
        for step in self.steps:
            targets = features[step.stride][-2:]
            suffix = "" if step.fuse_in_backbone else f"_{EXTRA}"
            fuse: ResizedFuse = getattr(self, f"decoder_stage{step.stage}{suffix}_resized_fuse")
            pixel = fuse([pixel, *targets], tuple(targets[0].shape[-2:]))
            if step.backbone_group:
                pixel, memory = getattr(self, f"decoder_stage{step.stage}")(pixel, memory)
            if step.ends_backbone:
                backbone_output = F.relu(pixel)
            if step.extra_group:
                pixel, memory = getattr(self, f"decoder_stage{step.stage}_{EXTRA}")(pixel, memory)
            features[step.stride].append(pixel)
            if step.stride == HIGH_RESOLUTION_OUTPUT_STRIDE:
                high_resolution.append(F.relu(pixel))
        feature_semantic = (
            high_resolution[self.backbone_decoder_num_stacks]
            if self.extra_decoder_num_stacks
            else backbone_output
        )
        return EncoderOutput(
            feature_panoptic=high_resolution[-1],
            feature_semantic=feature_semantic,
            res2=res2,
            res3=res3,
            class_feature=self.class_feature_extra(memory),
            mask_feature=self.mask_feature_extra(memory),
        )
