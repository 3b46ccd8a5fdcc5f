"""`maxdeeplab evaluate-model CKPT [--config EXP.yaml] [--data ROOT] [--split val2017]`.

Inference over a whole dataset split with deeplab2's evaluation preprocessing and pixelwise
post-processing, then PQ with the official panopticapi semantics (and deeplab2's pipeline PQ,
crowd as void), printed as the familiar table and optionally written as panopticapi-style JSON.
With a converted published checkpoint (`maxdeeplab import-tf`) and its model-zoo config this
yields that model-zoo row. Nothing is downloaded: the dataset and the checkpoint are local files.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run's checkpoint directory or a model .pt file")
    parser.add_argument(
        "--config",
        default=None,
        help="experiment YAML (default: the run's config.yaml beside CKPT), e.g. a model-zoo one",
    )
    parser.add_argument("--data", default=None, help="COCO-panoptic root (default: data.root)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: data.val_split)")
    parser.add_argument("--max-images", type=int, default=0, help="only the first N images")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--per-class", action="store_true", help="also print per-class PQ")
    parser.add_argument("--out", default=None, help="write results (panopticapi structure) here")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from torch.utils.data import Dataset, Subset
    from tqdm import tqdm

    from maxdeeplab.models.network import build_model
    from maxdeeplab.platform.config import cache_dir, load_experiment
    from maxdeeplab.platform.data.loader import build_eval_dataset, build_loader
    from maxdeeplab.platform.errors import ConfigError
    from maxdeeplab.platform.eval.report import format_per_class, format_table, write_results
    from maxdeeplab.platform.predict import run_config_path
    from maxdeeplab.platform.training.checkpoint import load_model_weights
    from maxdeeplab.platform.training.launch import prepare_experiment
    from maxdeeplab.platform.training.validation import evaluate

    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise ConfigError(f"{checkpoint}: checkpoint not found")
    overrides = [f"data.root={args.data}"] if args.data else []
    overrides += [f"data.val_split={args.split}"] if args.split else []
    cfg = prepare_experiment(load_experiment(args.config or run_config_path(checkpoint), overrides))
    model = build_model(cfg.model)
    try:
        model.load_state_dict(load_model_weights(checkpoint))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"{checkpoint}: weights do not fit {cfg.model.variant} ({first})"
        ) from None
    dataset = build_eval_dataset(cfg.data, cache_dir=cache_dir(cfg))
    info = dataset.split.info
    images: Dataset = dataset
    if args.max_images:
        images = Subset(dataset, range(min(args.max_images, len(dataset))))
    loader = build_loader(images, batch_size=cfg.eval.batch_size, num_workers=0, train=False)
    device = torch.device(args.device)
    batches = tqdm(loader, desc="evaluate", unit="batch")
    result = evaluate(model.to(device), batches, cfg=cfg, info=info, device=device)
    print(format_table(result.official))
    print(f"pipeline PQ (crowd as void, deeplab2's own evaluator): {100 * result.pipeline.pq:.2f}")
    if args.per_class:
        print(format_per_class(result.official, {c.id: c.name for c in info.categories}))
    if args.out:
        write_results(args.out, result.official, meta={"checkpoint": str(checkpoint)})
        print(f"results written to {args.out}")
    return 0
