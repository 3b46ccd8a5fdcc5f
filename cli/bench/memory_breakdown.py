"""Where a training step's memory goes: the bytes autograd saves for backward, per part of the
network (`maxdeeplab bench memory --breakdown`).

A training step's peak is the parameters, their gradients and Adam's two moments (4 x the parameter
bytes in float32) plus whatever the forward pass keeps alive for backward, which at 641 and above is
most of it. `SavedTensorCensus` counts the latter with `torch.autograd.graph.saved_tensors_hooks`:
every tensor saved for backward is charged to the module group running when it was saved (forward
pre/post hooks keep a stack of groups), once per storage (an activation that one layer saves as
its output and the next as its input is counted once, by the first), parameters excluded. What runs
outside the network's forward in a training step is the criterion (targets, matching, losses).
Transient buffers freed within the forward (never saved) are not counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from maxdeeplab.models.backbone.block_group import TRANSFORMER

LOSS_GROUP = "loss and matching"
OTHER_GROUP = "network, other"  # input normalisation, output reshapes
LARGEST = 8  # the largest saved tensors listed


def module_groups(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, group) pairs of a `MaXDeepLab`, outermost first; inner ones win while they run.

    Groups: the stem, each backbone stage, the dual-path transformer layers (wherever they sit),
    `stage5_extra`, the pixel decoder (ResizedFuse and decoder stages), the heads (pixel space,
    mask / class, and the memory FFNs that feed them), the auxiliary semantic branch.
    """
    pairs: list[tuple[nn.Module, str]] = [(model, OTHER_GROUP)]
    network: Any = model
    encoder: nn.Module = network.encoder
    for name, child in encoder.named_children():
        if name == "stem":
            pairs.append((child, "stem"))
        elif name.startswith("decoder_stage"):
            pairs.append((child, "decoder"))
        elif name.startswith("stage"):
            pairs.append((child, f"backbone {name}" if name[-1].isdigit() else name))
        elif name.endswith("_feature_extra"):
            pairs.append((child, "heads"))
    pairs += [(network.pixel_space_head, "heads"), (network.mask_class_head, "heads")]
    if network.aux_semantic is not None:
        pairs.append((network.aux_semantic, "aux semantic branch"))
    pairs += [(m, "transformer") for n, m in encoder.named_modules() if n.endswith(TRANSFORMER)]
    return pairs


class SavedTensorCensus:
    """Bytes saved for backward per module group, during `with census.recording():`.

    Args:
        model: a `MaXDeepLab` (its groups come from `module_groups`).
    """

    def __init__(self, model: nn.Module) -> None:
        self._stack: list[str] = []
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes: Counter[str] = Counter()
        self.largest: list[tuple[int, str, tuple[int, ...], str]] = []
        self._handles = []
        for module, group in module_groups(model):
            self._handles.append(module.register_forward_pre_hook(self._enter(group)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, group: str) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:
            self._stack.append(group)

        return hook

    def _leave(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. opaque (MKL-DNN) tensors
            return tensor
        pointer = storage.data_ptr()
        if pointer in self._params or pointer in self._seen or not storage.nbytes():
            return tensor
        self._seen.add(pointer)
        group = self._stack[-1] if self._stack else LOSS_GROUP
        self.bytes[group] += storage.nbytes()
        self.largest.append((storage.nbytes(), group, tuple(tensor.shape), str(tensor.dtype)))
        self.largest = sorted(self.largest, reverse=True)[:LARGEST]
        return tensor

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Count what is saved inside the block (a fresh count each time)."""
        self._seen.clear()
        self.bytes.clear()
        self.largest = []
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def report(self, model: nn.Module) -> dict[str, Any]:
        """MiB per group (largest first), the total, the training state and the largest tensors."""
        mib = 2.0**20
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return {
            "saved_mib_by_group": {g: b / mib for g, b in self.bytes.most_common()},
            "saved_mib_total": sum(self.bytes.values()) / mib,
            # parameters + gradients + Adam's two moments
            "training_state_mib": 4 * param_bytes / mib,
            "largest_saved": [
                {"mib": n / mib, "group": g, "shape": list(shape), "dtype": dtype}
                for n, g, shape, dtype in self.largest
            ],
        }
