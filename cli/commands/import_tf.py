"""`maxdeeplab import-tf CKPT_PREFIX --variant max_deeplab_s --out model.pt`.

Converts a google-research/deeplab2 MaX-DeepLab checkpoint (the trainer's layout or a plain
`tf.train.Checkpoint(model=...)`) into our weights file, without TensorFlow. The mapping table is
in `maxdeeplab.platform.tf_checkpoint.convert`; any unmapped variable, shape mismatch or missing
tensor stops the import and prints the complete list. A backbone-only checkpoint (only `encoder/`
keys) writes the encoder's tensors alone, for `model.init_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="deeplab2 checkpoint prefix (ckpt-N, without .index)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--variant", default=None, help="model variant (default max_deeplab_s)")
    source.add_argument("--config", default=None, help="an experiment YAML: use its model section")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="K real classes (default: the variant's, 133 for COCO)",
    )
    parser.add_argument("--out", required=True, help="output weights file (model.pt)")


def run(args: argparse.Namespace) -> int:
    import torch

    from maxdeeplab.models.network import build_model
    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.errors import ConfigError
    from maxdeeplab.platform.tf_checkpoint.convert import CheckpointMappingError, import_checkpoint

    overrides = []
    if args.variant:
        overrides.append(f"model.variant={args.variant}")
    if args.num_classes is not None:
        overrides.append(f"model.num_classes={args.num_classes}")
    try:
        cfg = load_experiment(args.config, overrides)
    except KeyError as exc:  # an unknown variant
        raise ConfigError(str(exc).strip("'\"")) from exc
    model = build_model(cfg.model)
    try:
        report = import_checkpoint(args.checkpoint, model)
    except CheckpointMappingError as exc:
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        raise
    state = {name: torch.from_numpy(value) for name, value in report.state.items()}
    if report.backbone_only:
        weights = state
    else:
        model.load_state_dict(state, strict=False)
        weights = model.state_dict()
    torch.save(weights, args.out)
    kind = "backbone" if report.backbone_only else "full model"
    print(
        f"imported {len(state)} tensors ({kind}, variant {cfg.model.variant}, "
        f"{cfg.model.num_classes} classes) from {args.checkpoint} -> {args.out}; "
        f"ignored {len(report.ignored)} non-model entries"
    )
    return 0
