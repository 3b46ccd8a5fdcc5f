"""`evaluate`'s visualizations: the input panel is the dataset's image, not a blank one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from maxdeeplab.models.network import build_model
from maxdeeplab.platform.config import load_experiment
from maxdeeplab.platform.data.loader import build_eval_dataset, build_loader
from maxdeeplab.platform.training.validation import evaluate
from maxdeeplab.platform.visualize import MIN_PANEL_SIDE, upscale_factor


def test_visualization_input_panel_is_the_dataset_image(tmp_path) -> None:
    cfg = load_experiment(
        None,
        [
            "model.variant=max_deeplab_tiny",
            "data.crop_size=65",
            "data.synthetic_train=1",
            "data.synthetic_val=1",
            "data.synthetic_size=[97,129]",
            f"work_dir={tmp_path}",
        ],
    )
    eval_set = build_eval_dataset(cfg.data, cache_dir=cfg.work_dir)
    info = eval_set.split.info
    cfg = replace(cfg, model=replace(cfg.model, num_classes=info.num_classes))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    loader = build_loader(eval_set, batch_size=1, train=False)
    cpu = torch.device("cpu")
    (figure,) = evaluate(
        model, loader, cfg=cfg, info=info, device=cpu, num_visualizations=1
    ).visualizations
    item = eval_set[0]
    h, w = item.resized_size
    # the dataset yields [0, 255]; the old code read it as [-1, 1] and logged a white panel
    image = item.image[:, :h, :w].permute(1, 2, 0).numpy().round().astype(np.uint8)
    k = upscale_factor(h, w)
    assert figure.shape[0] == k * h >= MIN_PANEL_SIDE  # 49 x 65 enlarged 6x
    assert np.array_equal(figure[::k, : k * w : k], image)
    assert image.std() > 10  # a real picture, not a flat fill
