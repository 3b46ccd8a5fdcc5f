"""The network's fixed strides, one named constant each (docs/deeplab2.md, "Conventions").

MaX-DeepLab has a single output stride (deeplab2 `output_stride: 16`): the backbone stops
subsampling there and dilates instead. Its pixel decoder ends at stride 4
(`high_resolution_output_stride: 4`), the resolution of the mask logits, the pixel embeddings, the
semantic logits and the loss targets. Crops of the form 16k + 1 make every strided map align with
the pixels (`labels[::4, ::4]` samples exactly the stride-4 positions).

This module is pure Python, so the config checks and the command line can use it without torch.
"""

from __future__ import annotations

OUTPUT_STRIDE = 16
HIGH_RESOLUTION_OUTPUT_STRIDE = 4


def is_valid_crop_size(size: int) -> bool:
    """True for a crop side of the form 16k + 1 with k >= 1 (65, 129, 321, 641, 1025, ...)."""
    return size > OUTPUT_STRIDE and (size - 1) % OUTPUT_STRIDE == 0
