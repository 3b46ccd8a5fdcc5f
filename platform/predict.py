"""Panoptic predictions for image files from a training checkpoint (`maxdeeplab predict`).

For each image: deeplab2's evaluation preprocessing (longer side = crop, pad bottom/right), one
forward pass, pixelwise post-processing and the undo of the padding (docs/deeplab2.md#pixelwise),
then three files in the output folder: `<stem>.png` (COCO-panoptic RGB-encoded segment ids),
`<stem>_overlay.png` (the image beside its colourised prediction) and, for all images together,
`predictions.json` in the COCO panoptic format with the dataset's category ids, so
`maxdeeplab evaluate` reads it.

The checkpoint is a Ray Train checkpoint directory of a run (`<work_dir>/ray/<run>/checkpoint_*`)
or that run's `model.pt`; the experiment config is the run's `config.yaml` next to it, and the
categories come from the run's dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from maxdeeplab.models.network import build_model
from maxdeeplab.models.postprocess import panoptic_inference
from maxdeeplab.platform.config import ExperimentConfig, cache_dir, load_experiment
from maxdeeplab.platform.data.coco import CocoPanoptic, DatasetInfo
from maxdeeplab.platform.data.loader import resolve_data_root
from maxdeeplab.platform.data.panoptic_format import read_image, write_panoptic_png
from maxdeeplab.platform.data.transforms import EvalTransform
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.training.checkpoint import load_model_weights
from maxdeeplab.platform.visualize import colorize_panoptic, side_by_side

RUN_CONFIG_FILE = "config.yaml"  # written by `platform/training/launch.py` into every run directory


@dataclass
class Predictor:
    cfg: ExperimentConfig
    info: DatasetInfo
    model: torch.nn.Module
    device: torch.device

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """H x W x 3 uint8 -> (H x W segment ids, COCO `segments_info` with dataset category ids).

        Segment ids are the panoptic ids `semantic * label_divisor + instance` of post-processing.
        """
        pixels, _, resized = EvalTransform(self.cfg.data.crop_size)(image)
        output = self.model(pixels[None].to(self.device))
        crop = self.cfg.data.crop_size
        prediction = panoptic_inference(
            output.class_logits[0],
            output.mask_logits[0],
            cfg=self.cfg.postprocess,
            num_thing_classes=self.info.num_thing_classes,
            crop_size=(crop, crop),
            resized_size=resized,
            raw_size=(image.shape[0], image.shape[1]),
        )
        to_dataset = self.info.contiguous_to_dataset
        segments = [
            {
                "id": int(s["id"]),
                "category_id": int(to_dataset[s["category_id"]]),
                "iscrowd": 0,
                "area": int(s["area"]),
            }
            for s in prediction.segments_info
        ]
        return prediction.panoptic.cpu().numpy(), segments


def run_config_path(checkpoint: Path) -> Path:
    """The run's config.yaml: beside `model.pt`, or one level above a checkpoint directory."""
    start = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for folder in (start, *start.parents[:2]):
        if (folder / RUN_CONFIG_FILE).is_file():
            return folder / RUN_CONFIG_FILE
    raise ConfigError(
        f"{checkpoint}: no {RUN_CONFIG_FILE} found beside it or in its run directory; pass --config"
    )


def load_predictor(
    checkpoint: str | Path, *, config: str | Path | None = None, device: str = "cpu"
) -> Predictor:
    """Build the run's model with the checkpoint's weights, in eval mode."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ConfigError(f"{checkpoint}: checkpoint not found")
    cfg = load_experiment(config or run_config_path(checkpoint))
    info = CocoPanoptic(resolve_data_root(cfg.data, cache_dir(cfg)), cfg.data.train_split).info
    model = build_model(cfg.model)
    weights = load_model_weights(checkpoint)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"{checkpoint}: weights do not fit {cfg.model.variant} ({first})"
        ) from None
    target = torch.device(device)
    return Predictor(cfg, info, model.to(target).eval(), target)


def predict_files(predictor: Predictor, images: list[Path], out_dir: Path) -> Path:
    """Write `<stem>.png` and `<stem>_overlay.png` per image and `predictions.json` (returned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations = []
    for path in tqdm(images, desc="predict", unit="img", disable=len(images) < 2):
        image = read_image(path)
        panoptic, segments = predictor(image)
        write_panoptic_png(out_dir / f"{path.stem}.png", panoptic)
        colours = colorize_panoptic(
            panoptic,
            label_divisor=predictor.cfg.postprocess.label_divisor,
            num_classes=predictor.info.num_classes,
        )
        Image.fromarray(side_by_side(image, colours)).save(out_dir / f"{path.stem}_overlay.png")
        annotations.append(
            {"image_id": path.stem, "file_name": f"{path.stem}.png", "segments_info": segments}
        )
    categories = [
        {"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in predictor.info.categories
    ]
    result = out_dir / "predictions.json"
    result.write_text(json.dumps({"annotations": annotations, "categories": categories}, indent=1))
    return result
