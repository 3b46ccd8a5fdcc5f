"""Import google-research/deeplab2 MaX-DeepLab checkpoints into our `build_model` state dict.

deeplab2 saves object-based TF2 checkpoints: a key is the path of attribute names from the
checkpoint root to the variable, e.g. `encoder/_stage5/_block1/_attention/_height_axis/qkv_kernel/
.ATTRIBUTES/VARIABLE_VALUE`. Two roots occur:
- the trainer's `tf.train.Checkpoint(**model.checkpoint_items)`: `encoder/`, `semantic_decoder/`,
  `semantic_head_without_last_layer/`, `semantic_last_layer/`, `pixel_space_head/`,
  `transformer_mask_head/`, `transformer_class_head/`, `pixel_space_feature_batch_norm/`,
  `pixel_space_mask_batch_norm/` (plus `optimizer/`, `backbone_optimizer/`, `global_step`, ignored);
- a plain `tf.train.Checkpoint(model=model)`: `model/_encoder/`,
  `model/_decoder/_pixel_space_head/`, ...
`canonical_key` rewrites the second into the first; `torch_name` then maps a canonical key to our
parameter or buffer name by the table `NAME_RULES` (our modules keep deeplab2's attribute names, so
most rules only drop the leading underscores), and `convert_tensor` changes the layout:

| deeplab2 variable                          | TF layout             | ours                     |
|--------------------------------------------|-----------------------|--------------------------|
| Conv2D `kernel`                            | kh x kw x in x out    | out x in x kh x kw       |
| `depthwise_kernel`                         | kh x kw x C x 1       | C x 1 x kh x kw          |
| Conv1D `kernel` (memory 1x1s, heads)       | 1 x in x out          | out x in x 1             |
| axial `qkv_kernel` (a Dense kernel)        | in x out              | out x in x 1 x 1         |
| BN gamma/beta/moving_mean/moving_variance  | C, or the stacked     | weight/bias/running_mean/|
|                                            | [3,1,h,1,1],[2,1,h,1,d]| running_var, flattened  |
|                                            | [1,h,1,d] shapes      | term-major, head-major   |
| `_rpe/embeddings` (relative positions)     | (2 * 255 - 1) x d     | same                     |
| `encoder/memory_feature`                   | 1 x N x C_m           | N x C_m                  |
| `bias`                                     | C                     | C                        |

Our BN `num_batches_tracked` counters have no deeplab2 counterpart and are left at 0; the class
head's void prior is a constant of the architecture in both (not stored).

`import_checkpoint` refuses, with the complete list, if any deeplab2 variable is unmapped, any shape
differs, or (for a full checkpoint) any of our tensors is left without a value. A checkpoint that
holds only `encoder/` is a backbone checkpoint: it must cover the encoder, and only it is imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from maxdeeplab.platform.errors import MaXDeepLabError

VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# Checkpoint entries that are not model weights: the object graph, counters and optimiser state.
IGNORED_ROOTS = ("optimizer", "backbone_optimizer", "global_step", "save_counter", "step")
OPTIMIZER_SLOT = "/.OPTIMIZER_SLOT/"
BN_LEAVES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}

# A plain `tf.train.Checkpoint(model=model)` -> the trainer's keys (deeplab2 checkpoint_items).
ROOT_RULES: list[tuple[str, str]] = [
    (r"^model/_encoder/", "encoder/"),
    (r"^model/_decoder/_auxiliary_semantic_decoder/", "semantic_decoder/"),
    (r"^model/_decoder/_auxiliary_semantic_head/conv_block/", "semantic_head_without_last_layer/"),
    (r"^model/_decoder/_auxiliary_semantic_head/final_conv/", "semantic_last_layer/"),
    (r"^model/_decoder/_", ""),
]

# Canonical deeplab2 module path -> our module path (applied in order, first match wins per rule;
# BN leaves and kernels are renamed afterwards by `torch_name`).
NAME_RULES: list[tuple[str, str]] = [
    # The MaX-DeepLab head (deeplab2 model/decoder/max_deeplab.py).
    (r"^pixel_space_feature_batch_norm/", "pixel_space_head/feature_bn/"),
    (r"^pixel_space_mask_batch_norm/", "mask_class_head/mask_logit_bn/"),
    (r"^transformer_mask_head/", "mask_class_head/transformer_mask_head/"),
    (r"^transformer_class_head/_conv/", "mask_class_head/transformer_class_head/"),
    # The auxiliary semantic branch (panoptic_deeplab.py decoder + head, aspp.py).
    (
        r"^semantic_decoder/_aspp/_aspp_conv(\d)/_conv_bn_act/",
        r"aux_semantic/aspp/aspp_convs.<\1>/",
    ),
    (r"^semantic_decoder/_aspp/_aspp_pool/_conv_bn_act/_conv/", "aux_semantic/aspp/pool_conv/"),
    (r"^semantic_decoder/_aspp/_aspp_pool/_conv_bn_act/_batch_norm/", "aux_semantic/aspp/pool_bn/"),
    (r"^semantic_decoder/_aspp/", "aux_semantic/aspp/"),
    (r"^semantic_decoder/_low_level_conv(\d)/", r"aux_semantic/low_level_convs.<\1>/"),
    (r"^semantic_decoder/_fusion_conv(\d)/_conv1_bn_act/", r"aux_semantic/fusion_convs.<\1>/"),
    (r"^semantic_head_without_last_layer/_conv1_bn_act/", "aux_semantic/conv_block/"),
    (r"^semantic_last_layer/", "aux_semantic/final_conv/"),
    (r"^pixel_space_head/conv_block/_conv1_bn_act/", "pixel_space_head/conv_block/"),
    # The Wide-ResNet stem of MaX-DeepLab-L is one Conv2DSame + BN directly on `_stem`.
    (r"^encoder/_stem/(_conv|_batch_norm)/", r"encoder/_stem/conv_bn/\1/"),
    # Separable convs (convolutions.py DepthwiseConv2DSame + Conv2DSame) -> SeparableConvBN.
    (r"/_depthwise/_depthwise_conv/depthwise_kernel$", "/depthwise/depthwise_kernel"),
    (r"/_depthwise/_batch_norm/", "/depthwise_bn/"),
    (r"/_pointwise/", "/pointwise/"),
    # Axial attention (axial_layers.py): its BNs and the Dense qkv kernel.
    (r"/_batch_norm_qkv/", "/qkv_bn/"),
    (r"/_batch_norm_similarity/", "/similarity_bn/"),
    (r"/_batch_norm_retrieved_output/", "/retrieved_bn/"),
    (r"/_batch_norm_retrieved_value/", "/retrieved_bn/"),
    (r"/qkv_kernel$", "/qkv/qkv_kernel"),
    # Conv + BN blocks (Conv2DSame / Conv1D with use_bn): `_conv` and `_batch_norm`.
    (r"/_conv/", "/conv/"),
    (r"/_batch_norm/", "/bn/"),
]


@dataclass
class ImportReport:
    """What `map_variables` found. The import is valid iff `problems()` is empty."""

    state: dict[str, np.ndarray] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)  # deeplab2 keys with no tensor of ours
    mismatched: list[str] = field(default_factory=list)  # "key -> name: shape vs shape"
    duplicates: list[str] = field(default_factory=list)  # two deeplab2 keys for one tensor
    missing: list[str] = field(default_factory=list)  # our tensors left without a value
    ignored: list[str] = field(default_factory=list)  # optimiser state, counters, object graph
    backbone_only: bool = False

    def problems(self) -> list[str]:
        """One line per problem, in a stable order."""
        return (
            [f"unmapped deeplab2 variable: {k}" for k in self.unmapped]
            + [f"shape mismatch: {m}" for m in self.mismatched]
            + [f"mapped twice: {d}" for d in self.duplicates]
            + [f"not in the checkpoint: {k}" for k in self.missing]
        )


class CheckpointMappingError(MaXDeepLabError):
    """A deeplab2 checkpoint does not map onto the model; `problems` holds the complete list."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        kinds = sorted({p.split(":")[0] for p in problems})
        super().__init__(
            f"{source}: {len(problems)} problem(s) mapping the deeplab2 checkpoint onto the model "
            f"({', '.join(kinds)}); each is listed in the problems"
        )


def is_model_variable(key: str) -> bool:
    """True for a model weight; False for the object graph, optimiser slots and counters."""
    if not key.endswith(VARIABLE_SUFFIX) or OPTIMIZER_SLOT in key:
        return False
    return key.split("/", 1)[0] not in IGNORED_ROOTS


def canonical_key(key: str) -> str:
    """A checkpoint key in the trainer's layout, without the `/.ATTRIBUTES/...` suffix."""
    key = key[: -len(VARIABLE_SUFFIX)] if key.endswith(VARIABLE_SUFFIX) else key
    for pattern, replacement in ROOT_RULES:
        new = re.sub(pattern, replacement, key)
        if new != key:
            return new
    return key


def torch_name(canonical: str) -> str:
    """Our parameter/buffer name for a canonical deeplab2 key (not checked against a model).

    Example: `encoder/_stage5/_block1/_attention/_height_axis/_batch_norm_qkv/gamma` ->
    `encoder.stage5.block1.attention.height_axis.qkv_bn.weight`.
    """
    path = canonical
    for pattern, replacement in NAME_RULES:
        path = re.sub(pattern, replacement, path)
    # ModuleList indices: deeplab2 counts from 1 (`_aspp_conv1`), PyTorch from 0.
    path = re.sub(r"<(\d+)>", lambda m: str(int(m.group(1)) - 1), path)
    parts = [part.lstrip("_") for part in path.split("/")]
    leaf = parts[-1]
    if leaf in BN_LEAVES:
        parts[-1] = BN_LEAVES[leaf]
    elif leaf in ("kernel", "depthwise_kernel", "qkv_kernel"):
        parts[-1] = "weight"
    return ".".join(parts)


def convert_tensor(canonical: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Change a deeplab2 tensor to our layout (the table in the module docstring).

    The result's shape is only what the layout rule gives; the caller compares it with
    `target_shape` (used here only to tell a 1x1 conv weight from a 2-D one).
    """
    leaf = canonical.rsplit("/", 1)[-1]
    if leaf in ("kernel", "depthwise_kernel", "qkv_kernel"):
        if value.ndim == 4:  # kh x kw x in x out (depthwise: kh x kw x C x 1)
            return value.transpose(3, 2, 0, 1) if leaf == "kernel" else value.transpose(2, 3, 0, 1)
        if value.ndim == 3:  # Conv1D: k x in x out
            return value.transpose(2, 1, 0)
        if value.ndim == 2:  # Dense: in x out, as a 1x1 conv of ours
            out = value.T
            return out.reshape(out.shape + (1,) * (len(target_shape) - 2))
        return value
    if leaf in BN_LEAVES and value.ndim > 1:
        # deeplab2's stacked-term BNs keep broadcastable shapes; ravel gives term, head, channel.
        return value.reshape(-1)
    if canonical == "encoder/memory_feature" and value.ndim == 3 and value.shape[0] == 1:
        return value[0]
    return value


def map_variables(
    tf_shapes: Mapping[str, tuple[int, ...]],
    our_shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray] | None = None,
) -> ImportReport:
    """Map deeplab2 checkpoint keys onto our state-dict names and collect every problem.

    Args:
        tf_shapes: checkpoint key -> shape (as `TensorBundle.shapes()` gives).
        our_shapes: our state-dict name -> shape (`num_batches_tracked` excluded by the caller).
        read: key -> numpy array; when given, `state` is filled with converted tensors. Without
            it only names and shapes are checked (shapes converted with zero-size stand-ins).

    Returns:
        The report: converted state, unmapped/mismatched/duplicate deeplab2 keys, our tensors
        left without a value (only for a full checkpoint) and the ignored keys.
    """
    report = ImportReport()
    sources: dict[str, str] = {}
    model_keys: list[str] = []
    for key in sorted(tf_shapes):
        (model_keys if is_model_variable(key) else report.ignored).append(key)
    canonical = {key: canonical_key(key) for key in model_keys}
    report.backbone_only = bool(model_keys) and all(
        c.startswith("encoder/") for c in canonical.values()
    )
    for key in model_keys:
        name = torch_name(canonical[key])
        if name not in our_shapes:
            report.unmapped.append(f"{key} (would be {name})")
            continue
        if name in sources:
            report.duplicates.append(f"{key} and {sources[name]} -> {name}")
            continue
        sources[name] = key
        target = tuple(our_shapes[name])
        if read is not None:
            value = convert_tensor(canonical[key], read(key), target)
        else:
            value = convert_tensor(canonical[key], np.empty(tf_shapes[key], np.float32), target)
        if tuple(value.shape) != target:
            report.mismatched.append(
                f"{key} -> {name}: deeplab2 {tuple(tf_shapes[key])} gives {tuple(value.shape)}, "
                f"ours {target}"
            )
            continue
        if read is not None:
            report.state[name] = np.ascontiguousarray(value)
    expected = [n for n in our_shapes if not report.backbone_only or n.startswith("encoder.")]
    report.missing = [n for n in expected if n not in sources]
    return report


def model_shapes(model: object) -> dict[str, tuple[int, ...]]:
    """State-dict name -> shape of a torch model, without BN `num_batches_tracked` counters."""
    return {
        name: tuple(tensor.shape)
        for name, tensor in model.state_dict().items()  # type: ignore[attr-defined]
        if not name.endswith("num_batches_tracked")
    }


def import_checkpoint(prefix: str, model: object) -> ImportReport:
    """Read the deeplab2 checkpoint at `prefix` and map it onto `model` (a `MaXDeepLab`).

    Raises:
        DataError: the checkpoint files are missing or unreadable.
        CheckpointMappingError: any variable is unmapped, mismatched or missing (complete list in
            its `problems`).
    """
    from maxdeeplab.platform.tf_checkpoint.bundle import TensorBundle

    bundle = TensorBundle(prefix)
    shapes = {k: e.shape for k, e in bundle.entries.items()}
    report = map_variables(shapes, model_shapes(model), bundle.read)
    problems = report.problems()
    if problems:
        raise CheckpointMappingError(prefix, problems)
    return report
