"""Panoptic predictions for image files from a training checkpoint (`maxdeeplab predict`).

For each image: deeplab2's evaluation preprocessing (longer side = crop, pad bottom/right), one
forward pass, pixelwise post-processing and the undo of the padding (docs/deeplab2.md#pixelwise),
then three files in the output folder: `<stem>.png` (COCO-panoptic RGB-encoded segment ids),
`<stem>_overlay.png` (the image, the prediction blended over it and a legend of class names) and,
for all images together, `predictions.json` in the COCO panoptic format with the dataset's category
ids, so `maxdeeplab evaluate` reads it. Given the ground truth (`GroundTruth`), the JSON carries its
image ids and its categories block, so `evaluate` pairs every prediction with its image. An image
that cannot be read is reported and skipped; the others are still written.

The checkpoint is a Ray Train checkpoint directory of a run (`<work_dir>/ray/<run>/checkpoint_*`)
or that run's `model.pt`; the experiment config is the run's `config.yaml` next to it, and the
categories come from the run's dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from maxdeeplab.models.network import build_model
from maxdeeplab.models.postprocess import panoptic_inference
from maxdeeplab.platform.config import ExperimentConfig, cache_dir, load_experiment
from maxdeeplab.platform.data.coco import CocoPanoptic, DatasetInfo, require_root, split_paths
from maxdeeplab.platform.data.image_io import read_image
from maxdeeplab.platform.data.loader import resolve_data_root
from maxdeeplab.platform.data.panoptic_format import load_json, write_panoptic_png
from maxdeeplab.platform.data.transforms import EvalTransform
from maxdeeplab.platform.errors import ConfigError, DataError
from maxdeeplab.platform.training.checkpoint import load_model_weights
from maxdeeplab.platform.visualize import OVERLAY_ALPHA, panoptic_figure

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


@dataclass(frozen=True)
class GroundTruth:
    """What predictions take from a ground-truth panoptic JSON to be evaluated against it."""

    source: str
    categories: list[dict[str, Any]]
    image_files: list[str]  # the images' file names, in JSON order
    ids_by_name: dict[str, Any]  # image file name, and its stem, -> image id

    def image_id(self, path: Path) -> Any | None:
        """The image id of an image file (matched by file name, then by stem), else None."""
        return self.ids_by_name.get(path.name, self.ids_by_name.get(path.stem))


def read_ground_truth(gt_json: str | Path) -> GroundTruth:
    """The image ids, file names and categories of a COCO panoptic JSON.

    Raises:
        DataError: the file is missing, not JSON, or lacks an `images` or `categories` list.
    """
    data = load_json(gt_json)
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{gt_json}: missing or malformed '{key}' list")
    files: list[str] = []
    ids: dict[str, Any] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DataError(f"{gt_json}: image entry without 'id' or 'file_name': {entry!r}")
        name = Path(str(entry["file_name"])).name
        files.append(str(entry["file_name"]))
        ids.setdefault(Path(name).stem, entry["id"])
        ids[name] = entry["id"]
    return GroundTruth(str(gt_json), data["categories"], files, ids)


def dataset_ground_truth(root: str | Path, split: str) -> tuple[GroundTruth, list[Path]]:
    """The ground truth of a COCO panoptic split and the paths of its images.

    Raises:
        DataError: the root or the split's JSON is missing or malformed.
    """
    gt_json, _, image_dir = split_paths(require_root(root), split)
    truth = read_ground_truth(gt_json)
    return truth, [image_dir / name for name in truth.image_files]


@dataclass
class PredictionFiles:
    """What `predict_files` wrote and what it could not."""

    json_path: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per unreadable image
    not_in_ground_truth: list[Path] = field(default_factory=list)  # written under their stem


def predict_files(
    predictor: Predictor,
    images: list[Path],
    out_dir: Path,
    *,
    ground_truth: GroundTruth | None = None,
    alpha: float = OVERLAY_ALPHA,
) -> PredictionFiles:
    """Write `<stem>.png` and `<stem>_overlay.png` per image and `predictions.json`.

    Args:
        predictor: from `load_predictor`.
        images: image files; unreadable ones are skipped and listed in the result.
        out_dir: created if missing.
        ground_truth: image ids and categories to write (default: the file stems and the run's
            dataset categories).
        alpha: opacity of the prediction in the overlay, in [0, 1].

    Raises:
        ConfigError: the run's categories are not the ground truth's, or alpha is outside [0, 1].
        DataError: no image could be read (names the first).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"overlay alpha {alpha}: must be between 0 and 1")
    categories = _output_categories(predictor.info, ground_truth)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PredictionFiles(out_dir / "predictions.json")
    annotations = []
    for path in tqdm(images, desc="predict", unit="img", disable=len(images) < 2):
        try:
            image = read_image(path)
        except DataError as exc:
            result.skipped.append(str(exc))
            continue
        segments = _write_prediction(predictor, image, out_dir / path.stem, alpha)
        image_id = ground_truth.image_id(path) if ground_truth else path.stem
        if image_id is None:
            result.not_in_ground_truth.append(path)
            image_id = path.stem
        annotations.append(
            {"image_id": image_id, "file_name": f"{path.stem}.png", "segments_info": segments}
        )
        result.written.append(path)
    if not annotations and result.skipped:
        more = f" (and {len(result.skipped) - 1} more)" if len(result.skipped) > 1 else ""
        raise DataError(f"no image could be read: {result.skipped[0]}{more}")
    document = {"annotations": annotations, "categories": categories}
    result.json_path.write_text(json.dumps(document, indent=1))
    return result


def _write_prediction(
    predictor: Predictor, image: np.ndarray, stem: Path, alpha: float
) -> list[dict[str, Any]]:
    """`<stem>.png` and `<stem>_overlay.png` of one H x W x 3 image; returns its segments_info."""
    panoptic, segments = predictor(image)
    write_panoptic_png(stem.with_name(f"{stem.name}.png"), panoptic)
    figure = panoptic_figure(
        image,
        panoptic,
        label_divisor=predictor.cfg.postprocess.label_divisor,
        class_names=[c.name for c in predictor.info.categories],
        alpha=alpha,
    )
    Image.fromarray(figure).save(stem.with_name(f"{stem.name}_overlay.png"))
    return segments


def _output_categories(info: DatasetInfo, ground_truth: GroundTruth | None) -> list[dict[str, Any]]:
    """The categories block: the ground truth's, checked against the run's, else the run's."""
    if ground_truth is None:
        return [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in info.categories]
    known = {entry.get("id") for entry in ground_truth.categories if isinstance(entry, dict)}
    missing = [c.id for c in info.categories if c.id not in known]
    if missing:
        raise ConfigError(
            f"{ground_truth.source}: category id {missing[0]} of the run's dataset is not among "
            "its categories; predict against the ground truth of the dataset the run trained on"
        )
    return ground_truth.categories
