"""Model, loss and post-processing settings: the one source of truth for their defaults.

The dataclass defaults *are* MaX-DeepLab-S for COCO as configured by deeplab2's model-zoo textprotos
(`configs/coco/max_deeplab/*.textproto`; docs/deeplab2.md). Other named variants are data:
`VARIANTS` maps a name to the fields it overrides, applied before the experiment YAML
(docs/architecture.md#configuration).

This module is pure Python: `models/` never imports `platform/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKBONE_TYPES = ("resnet_beta", "wider_resnet")
DROP_PATH_SCHEDULES = ("constant", "linear")
POSTPROCESS_MODES = ("pixelwise", "maskwise")
NEGATIVE_WEIGHTINGS = ("void_ratio", "constant")
# Hungarian solvers of the slot matching (docs/deeplab2.md#matching): the exact optimum, or a port
# of deeplab2's float32 TensorFlow solver that returns its (at times non-optimal) assignments.
MATCHERS = ("exact", "deeplab2")


@dataclass
class ModelConfig:
    """MaX-DeepLab architecture. Defaults: MaX-DeepLab-S, output stride 16.

    See docs/deeplab2.md#backbone, #dual-path-transformer and #decoder-and-heads.
    """

    variant: str = "max_deeplab_s"
    num_classes: int = 133  # real classes (things + stuff); the heads add void. COCO: 80 + 53.
    # Semantic ids 1..num_thing_classes are things, the rest stuff (deeplab2 thing list
    # range(1, 81); docs/deeplab2.md#coco-panoptic-ids). Used by the loss targets (stuff mask
    # columns) and post-processing.
    num_thing_classes: int = 80
    # Backbone (ResNet-50-beta + axial attention from stride 16).
    num_blocks: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    backbone_type: str = "resnet_beta"  # Inception stem + bottlenecks; L: 'wider_resnet'
    stem_channels: int = 128  # Inception stem output (64 in its first two convs)
    base_filters: int = 64  # stage-2 bottleneck width f; doubles per stage
    use_axial_beyond_stride: int = 16
    axial_num_heads: int = 8
    axial_key_expansion: float = 1.0
    axial_value_expansion: float = 2.0
    attention_bottleneck_expansion: float = 2.0
    rpe_length: int = (
        509  # relative-position table length (covers any crop <= 2049 at stride 16... 8)
    )
    # Dual-path transformer (docs/deeplab2.md#dual-path-transformer).
    num_mask_slots: int = 128
    memory_channels: int = 256
    transformer_expansion: float = 1.0  # DPT filters = 128 * expansion
    transformer_ffn_channels: int = 2048
    global_ffn_channels: int = 256
    extra_blocks: int = 1  # blocks per extra stage (stage5_extra, extra decoder stages); L: 3
    # Where dual-path layers go (a block gets one iff its original ResNet stride >= this) and how
    # many hourglass decoder stacks run in the backbone / after it (deeplab2 AxialResNet).
    backbone_use_transformer_beyond_stride: int = 32
    extra_decoder_use_transformer_beyond_stride: int = 32
    backbone_decoder_num_stacks: int = 0
    extra_decoder_num_stacks: int = 0
    # Pixel decoder and heads (docs/deeplab2.md#decoder-and-heads).
    pixel_embed_dim: int = 128
    pixel_head_channels: int = 256
    mask_logit_bn_gamma_init: float = 0.1
    # class-head void bias log((K)*0.9/0.1) (docs/deeplab2.md#output-heads)
    void_prior_prob: float = 0.9
    use_aux_semantic: bool = True  # the auxiliary semantic decoder (a training signal)
    aspp_channels: int = 256
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    # The side S of the crop the model is trained at. deeplab2 sizes the ASPP image pooling from
    # it, a ((S - 1) / 16 + 1)^2 window (docs/deeplab2.md#auxiliary-semantic-branch): global at
    # S, a sliding window on larger inputs. 0 = global pooling at every size. The platform sets
    # it from data.crop_size; a trained run's config keeps it.
    train_crop_size: int = 0
    low_level_channels: list[int] = field(default_factory=lambda: [64, 32])
    semantic_decoder_channels: int = 256
    semantic_head_channels: int = 256  # auxiliary semantic head's separable 5x5 conv
    # Regularisation (docs/deeplab2.md#drop-path) and normalisation
    # (docs/deeplab2.md#normalisation-and-initialisation).
    drop_path_keep_prob: float = 0.8
    drop_path_schedule: str = (
        "linear"  # deeplab2's default is 'constant'; every COCO config uses 'linear'
    )
    drop_path_beyond_stride: int = 16
    bn_momentum: float = 0.01  # Keras 0.99
    bn_eps: float = 1e-3
    # Engineering switches (no effect on the maths).
    use_checkpointing: bool = (
        False  # recompute axial blocks in backward (deeplab2 does, to fit memory)
    )
    init_checkpoint: str = ""  # a backbone or full checkpoint (.pt) to start from


@dataclass
class LossConfig:
    """MaX-DeepLab losses (docs/deeplab2.md#losses). Total = sum of weight * term."""

    pq_style_weight: float = 3.0
    mask_id_weight: float = 0.3
    instance_discrimination_weight: float = 1.0
    semantic_weight: float = 1.0
    alpha: float = 0.75  # focal_loss_alpha: positives 0.75, negatives 0.25
    temperature: float = 0.3  # instance discrimination tau
    negative_weighting: str = "void_ratio"  # deeplab2's code; 'constant' is the paper's form
    matcher: str = "exact"  # the optimal matching; 'deeplab2' reproduces deeplab2's float32 solver
    max_thing_id: int = 128  # deeplab2's max_thing_id; instances beyond it stay unmatched
    small_instance_weight: float = 1.0  # L variant: 3.0 on thing instances < small_instance_area px
    small_instance_area: int = 4096


@dataclass
class PostprocessConfig:
    """Panoptic inference. Area limits are for the 641 crop (256 / 4096 at 1025).

    See docs/deeplab2.md#post-processing.
    """

    mode: str = "pixelwise"
    class_threshold: float = 0.7
    pixel_threshold: float = 0.4
    thing_area_limit: int = 100
    stuff_area_limit: int = 1600
    label_divisor: int = 256
    # maskwise-only (docs/deeplab2.md#maskwise)
    overlap_threshold: float = 0.5
    reorder_class_weight: float = 1.0  # maskwise rank = conf^this * mean_mask_prob^mask weight
    reorder_mask_weight: float = 0.0


# Named variants: the fields each one overrides on top of the MaX-DeepLab-S defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "max_deeplab_s": {},
    # deeplab2 axial_resnet_instances.MaXDeepLabL: Wide-ResNet-41 with axial attention from stride
    # 16, dual-path layers from stride 16 and one backbone + one extra hourglass decoder stack.
    "max_deeplab_l": {
        "num_blocks": [3, 6, 3, 3],
        "backbone_type": "wider_resnet",
        "stem_channels": 64,
        "backbone_use_transformer_beyond_stride": 16,
        "extra_decoder_use_transformer_beyond_stride": 16,
        "backbone_decoder_num_stacks": 1,
        "extra_decoder_num_stacks": 1,
        "extra_blocks": 3,
        "memory_channels": 512,
        "transformer_expansion": 2.0,
        "global_ffn_channels": 512,
        "attention_bottleneck_expansion": 4.0,
        "axial_key_expansion": 2.0,
        "axial_value_expansion": 4.0,
        "drop_path_beyond_stride": 4,
    },
    # MaX-DeepLab-S's topology (every block kind, 4 dual-path layers, aux branch) at ~1/8 width
    # with fewer blocks and slots, for CPU tests and the quickstart.
    "max_deeplab_tiny": {
        "num_blocks": [1, 1, 2, 2],
        "stem_channels": 16,
        "base_filters": 8,
        "num_mask_slots": 32,
        "memory_channels": 64,
        "transformer_expansion": 0.25,
        "transformer_ffn_channels": 128,
        "global_ffn_channels": 64,
        "pixel_embed_dim": 32,
        "pixel_head_channels": 32,
        "aspp_channels": 32,
        "low_level_channels": [16, 8],
        "semantic_decoder_channels": 32,
        "semantic_head_channels": 32,
    },
}


def variant_overrides(name: str) -> dict[str, Any]:
    """Return the ModelConfig fields that the named variant overrides.

    Raises:
        KeyError: the variant is unknown (the message lists the known ones).
    """
    if name not in VARIANTS:
        raise KeyError(f"unknown model variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    return dict(VARIANTS[name])


def model_config_problem(cfg: ModelConfig) -> tuple[str, Any, str] | None:
    """The first ModelConfig rule that a type check cannot express and `cfg` breaks, or None.

    The only home of these rules: the experiment loader and `build_model` both ask here, so the
    modules below `build_model` take their settings as given.

    Returns:
        (field name, value, reason), e.g. ("drop_path_schedule", "cosine", "expected one of ...").
    """
    choices = {
        "backbone_type": (cfg.backbone_type, BACKBONE_TYPES),
        "drop_path_schedule": (cfg.drop_path_schedule, DROP_PATH_SCHEDULES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            return key, value, f"expected one of {', '.join(allowed)}"
    if not 0.0 < cfg.drop_path_keep_prob <= 1.0:
        return "drop_path_keep_prob", cfg.drop_path_keep_prob, "must be in (0, 1]"
    if cfg.train_crop_size < 0:
        return "train_crop_size", cfg.train_crop_size, "must be >= 0 (0: global ASPP pooling)"
    return None


def loss_config_problem(cfg: LossConfig) -> tuple[str, Any, str] | None:
    """The first LossConfig rule that a type check cannot express and `cfg` breaks, or None.

    Returns:
        (field name, value, reason), e.g. ("matcher", "scipy", "expected one of ...").
    """
    choices = {
        "negative_weighting": (cfg.negative_weighting, NEGATIVE_WEIGHTINGS),
        "matcher": (cfg.matcher, MATCHERS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            return key, value, f"expected one of {', '.join(allowed)}"
    return None
