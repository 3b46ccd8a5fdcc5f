"""The model-zoo configs reproduce deeplab2's settings and the published rows.

See docs/deeplab2.md#model-zoo-configs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maxdeeplab.dashboards.model_zoo import ZOO_CSV, published_rows
from maxdeeplab.platform.config import load_experiment, to_params

ROOT = Path(__file__).resolve().parents[2]
ZOO_DIR = ROOT / "experiments" / "model_zoo"
ROWS = published_rows()


def test_one_config_per_published_row():
    configs = sorted(p.stem for p in ZOO_DIR.glob("*.yaml") if not p.name.startswith("_"))
    assert configs == sorted(row.name for row in ROWS)
    assert len(ROWS) == 9
    assert sum(row.source == "seed" for row in ROWS) == 5


def test_published_numbers_are_the_reference_table():
    # deeplab2's g3doc numbers (docs/deeplab2.md#model-zoo-configs), spot-checked against the CSV
    # the table reads.
    by_name = {row.name: row for row in ROWS}
    s641 = by_name["max_deeplab_s_os16_res641_100k"]
    assert (s641.pq, s641.pq_thing, s641.pq_stuff, s641.pq_pipeline) == (45.9, 49.2, 40.9, 46.36)
    l400 = by_name["max_deeplab_l_os16_res1025_400k"]
    assert (l400.pq, l400.pq_thing, l400.pq_stuff, l400.pq_pipeline) == (51.3, 57.5, 42.0, 51.87)
    assert ZOO_CSV.is_file()


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_config_resolves_to_its_row(row, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    cfg = load_experiment(ZOO_DIR / f"{row.name}.yaml")
    assert cfg.name == row.name
    assert cfg.model.variant == row.variant
    assert cfg.data.crop_size == row.crop_size
    assert cfg.train.steps == row.train_steps
    assert cfg.optim.lr == pytest.approx(row.base_lr, rel=1e-12)
    assert (cfg.postprocess.thing_area_limit, cfg.postprocess.stuff_area_limit) == (
        row.thing_area_limit,
        row.stuff_area_limit,
    )
    # The table matches runs to rows by these params: a run of this file must match its row only.
    params = to_params(cfg)
    assert [other.name for other in ROWS if other.matches(params)] == [row.name]
    # The L rows' small-instance weighting (deeplab2 increase_small_instance_weights).
    large = row.variant == "max_deeplab_l"
    assert cfg.loss.small_instance_weight == (3.0 if large else 1.0)
    if large:
        assert cfg.loss.small_instance_area == 4096
        text = (ZOO_DIR / f"{row.name}.yaml").read_text()
        assert "NOT IMPLEMENTED" in text and "AutoAugment" in text


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_config_has_deeplab2_common_settings(row, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    cfg = load_experiment(ZOO_DIR / f"{row.name}.yaml")
    assert (cfg.train.batch_size, cfg.train.checkpoint_interval) == (64, 1000)
    assert (cfg.model.drop_path_keep_prob, cfg.model.drop_path_schedule) == (0.8, "linear")
    loss = cfg.loss
    weights = (
        loss.pq_style_weight,
        loss.mask_id_weight,
        loss.instance_discrimination_weight,
        loss.semantic_weight,
    )
    assert weights == (3.0, 0.3, 1.0, 1.0)
    optim = cfg.optim
    assert (optim.warmup_steps, optim.poly_power, optim.end_lr) == (5000, 0.9, 0.0)
    assert (optim.backbone_lr_multiplier, optim.eps, optim.weight_decay) == (0.1, 1e-7, 0.0)
    assert (cfg.data.min_scale, cfg.data.max_scale, cfg.data.scale_step) == (0.5, 1.5, 0.1)
    assert (cfg.data.train_split, cfg.data.val_split) == ("train2017", "val2017")
    post = cfg.postprocess
    assert (post.mode, post.class_threshold, post.pixel_threshold) == ("pixelwise", 0.7, 0.4)
    # The dataset is a path the user gives (never the synthetic set, which an empty root means).
    assert cfg.data.root == "coco"
    assert cfg.tracking.experiment == "model_zoo"


def test_data_root_comes_from_the_environment_or_the_command_line(monkeypatch):
    path = ZOO_DIR / f"{ROWS[0].name}.yaml"
    monkeypatch.setenv("COCO_ROOT", "/datasets/coco")
    assert load_experiment(path).data.root == "/datasets/coco"
    assert load_experiment(path, ["data.root=/elsewhere"]).data.root == "/elsewhere"


def test_rows_match_only_their_own_settings():
    row = ROWS[0]
    params = {
        "model.variant": row.variant,
        "data.crop_size": str(row.crop_size),
        "train.steps": str(row.train_steps),
        "optim.lr": str(row.base_lr),
        "postprocess.thing_area_limit": str(row.thing_area_limit),
        "postprocess.stuff_area_limit": str(row.stuff_area_limit),
    }
    assert row.matches(params)
    assert not row.matches({**params, "train.steps": "1000"})
    assert not row.matches({**params, "optim.lr": "0.0003"})
    assert not row.matches({k: v for k, v in params.items() if k != "model.variant"})
    assert not row.matches({**params, "data.crop_size": "not-a-number"})
