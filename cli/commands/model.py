"""`maxdeeplab model info`: parameter counts, a per-part breakdown and GMACs of a model variant.

Counted on the meta device (no memory is allocated), so even MaX-DeepLab-L prints in seconds:
users check a config before they spend GPU hours on it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    info = sub.add_parser(
        "info",
        help="parameter counts, per-part breakdown and GMACs",
        description="Parameter counts (total, without the auxiliary semantic branch, encoder, "
        "ImageNet backbone part), a per-part breakdown, drop-path keep probabilities and GMACs "
        "at a crop size.",
    )
    source = info.add_mutually_exclusive_group()
    source.add_argument("--variant", default=None, help="model variant (default max_deeplab_s)")
    source.add_argument("--config", default=None, help="an experiment YAML: use its model section")
    info.add_argument("--crop", type=int, default=641, help="crop side S = 16k+1 (default 641)")
    info.add_argument("--num-classes", type=int, default=None, help="K real classes (default 133)")
    info.add_argument("--no-macs", action="store_true", help="skip the MAC count")
    info.set_defaults(model_run=run_info)


def run(args: argparse.Namespace) -> int:
    return int(args.model_run(args) or 0)


def run_info(args: argparse.Namespace) -> int:
    import torch

    from maxdeeplab.models.complexity import count_macs, count_parameters, parameter_breakdown
    from maxdeeplab.models.network import build_model, drop_path_keep_probs
    from maxdeeplab.models.strides import is_valid_crop_size
    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.errors import ConfigError

    if not is_valid_crop_size(args.crop):
        raise ConfigError(f"--crop {args.crop}: must be of the form 16k+1 (e.g. 65, 641, 1025)")
    overrides = [f"model.variant={args.variant}"] if args.variant else []
    if args.num_classes is not None:
        overrides.append(f"model.num_classes={args.num_classes}")
    cfg = load_experiment(args.config, overrides).model
    with torch.device("meta"):
        model = build_model(cfg)
    counts = count_parameters(model)
    print(f"{cfg.variant}: {cfg.num_classes} classes + void, {cfg.num_mask_slots} mask slots")
    rows = [
        ("total", counts.total),
        ("without auxiliary semantic branch", counts.without_aux),
        ("encoder (backbone + dual-path transformer + decoder)", counts.encoder),
        ("ImageNet backbone part (0.1x LR)", counts.backbone),
        ("auxiliary semantic branch", counts.aux_semantic),
    ]
    print("\nparameters")
    for name, value in rows:
        print(f"  {name:<54} {value:>13,}")
    print("\nper part")
    for name, value in parameter_breakdown(model).items():
        print(f"  {name:<54} {value:>13,}")
    print(
        f"\ndrop-path keep probabilities ({cfg.drop_path_schedule}, p = {cfg.drop_path_keep_prob})"
    )
    for name, probs in drop_path_keep_probs(model).items():
        print(f"  {name:<22} {' '.join(f'{p:.3g}' for p in probs)}")
    if not args.no_macs:
        macs = count_macs(model, args.crop)
        print(f"\nGMACs at {args.crop}x{args.crop} (batch 1, inference)")
        for name in (
            "total",
            "without_aux",
            "encoder",
            "pixel_space_head",
            "mask_class_head",
            "aux_semantic",
        ):
            print(f"  {name:<54} {macs[name] / 1e9:>13.1f}")
    return 0
