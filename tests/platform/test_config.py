"""The config system: merge order, typed result, and a one-line error for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from maxdeeplab.cli.main import main
from maxdeeplab.models.config import ModelConfig
from maxdeeplab.platform.config import ExperimentConfig, load_experiment, to_params, to_yaml
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.sweep_config import load_sweep

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_max_deeplab_s_deeplab2_settings():
    cfg = load_experiment(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.variant == "max_deeplab_s"
    assert (cfg.model.num_mask_slots, cfg.model.memory_channels) == (128, 256)
    assert (cfg.model.drop_path_keep_prob, cfg.model.drop_path_schedule) == (0.8, "linear")
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.warmup_steps) == (1e-3, 1e-7, 5000)
    assert (cfg.train.batch_size, cfg.train.steps, cfg.data.crop_size) == (64, 100_000, 641)
    assert (cfg.loss.pq_style_weight, cfg.loss.mask_id_weight) == (3.0, 0.3)
    assert (cfg.postprocess.class_threshold, cfg.postprocess.pixel_threshold) == (0.7, 0.4)


def test_merge_order_schema_variant_yaml_base_cli(tmp_path):
    write(tmp_path / "bases/base.yaml", "data: {crop_size: 1025}\ntrain: {steps: 7}\n")
    exp = write(
        tmp_path / "exp.yaml",
        "base: bases/base.yaml\nname: mine\ntrain: {steps: 9}\n"
        "model: {drop_path_schedule: constant}\n",
    )
    cfg = load_experiment(exp, ["optim.lr=0.5", "model.drop_path_keep_prob=0.9"])
    assert cfg.name == "mine"
    assert cfg.data.crop_size == 1025  # from the base, relative to the YAML
    assert cfg.train.steps == 9  # the YAML wins over its base
    assert cfg.optim.lr == 0.5  # the command line wins over the YAML
    assert (cfg.model.drop_path_schedule, cfg.model.drop_path_keep_prob) == ("constant", 0.9)
    assert isinstance(cfg.model, ModelConfig)


def test_params_and_yaml_cover_every_public_key():
    params = to_params(load_experiment(None))
    public = [
        "model.variant", "model.drop_path_schedule", "model.drop_path_keep_prob", "data.root",
        "data.train_split", "data.val_split", "data.crop_size", "train.steps", "train.batch_size",
        "optim.lr", "eval.interval", "tracking.uri", "tracking.experiment",
        "resources.num_workers", "resources.use_gpu",
    ]  # fmt: skip
    assert set(public) <= set(params)
    assert "crop_size: 641" in to_yaml(load_experiment(None))


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("data: {crop: 3}\n", [], "unknown key 'data.crop' (did you mean 'data.crop_size'?)"),
        ("data: {crop_size: big}\n", [], "bad value 'big' for 'data.crop_size'"),
        ("data: {crop_size: 640}\n", [], "must be of the form 16k+1"),
        ("model: {drop_path_schedule: cosine}\n", [], "expected one of constant, linear"),
        ("loss: {matcher: scipy}\n", [], "'loss.matcher': expected one of exact, deeplab2"),
        ("model: {variant: max_deeplab_xxl}\n", [], "unknown model variant 'max_deeplab_xxl'"),
        ("{}\n", ["train.stepz=3"], "command line: unknown key 'train.stepz'"),
        ("{}\n", ["train.steps"], "not of the form key=value"),
        ("base: missing.yaml\n", [], "base file"),
        ("data: [1, 2\n", [], "invalid YAML"),
    ],
)
def test_bad_experiment_input_is_one_clear_line(tmp_path, yaml_text, overrides, expected):
    exp = write(tmp_path / "exp.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_experiment(exp, overrides)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if not overrides:
        assert str(tmp_path) in message  # names the file


def test_circular_base_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular base"):
        load_experiment(tmp_path / "a.yaml")


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")


SWEEP = """\
name: study
base: exp.yaml
overrides: {train.batch_size: 4}
search:
  data.crop_size: {grid: [65, 129]}
  model.drop_path_schedule: {grid: [linear, constant]}
  optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
tune: {num_samples: 2, max_concurrent_trials: 2, scheduler: {type: asha, grace_period: 5}}
resources: {num_workers: 2}
"""


def test_sweep_expands_and_resolves_trials(tmp_path):
    write(tmp_path / "exp.yaml", "train: {steps: 10}\n")
    sweep = load_sweep(write(tmp_path / "sweep.yaml", SWEEP))
    assert sweep.num_trials == 2 * 2 * 2
    assert len(sweep.grid_points()) == 4
    trial = sweep.trial_config({"data.crop_size": 129, "optim.lr": 3e-4})
    assert (trial.data.crop_size, trial.optim.lr, trial.train.batch_size) == (129, 3e-4, 4)
    assert (trial.train.steps, trial.resources.num_workers) == (10, 2)
    assert sweep.tune.scheduler.type == "asha"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("data.crop_size: {grid", "data.crop_sz: {grid", "unknown key 'data.crop_sz' in search"),
        ("[65, 129]", "[]", "grid needs a non-empty list"),
        ("[65, 129]", "[65, big]", "bad value 'big' for 'data.crop_size'"),
        ("[65, 129]", "[65, 130]", "must be of the form 16k+1"),
        ("loguniform: [1.0e-4, 1.0e-3]", "normal: [0, 1]", "unknown distribution 'normal'"),
        ("loguniform: [1.0e-4, 1.0e-3]", "loguniform: [0, 1]", "loguniform needs low > 0"),
        ("type: asha", "type: hyperband", "unknown scheduler 'hyperband'"),
        ("num_workers: 2", "num_wrkers: 2", "unknown key 'resources.num_wrkers'"),
        ("base: exp.yaml", "base: gone.yaml", "base experiment"),
        ("overrides: {train.batch_size: 4}", "overrides: {train.batchsize: 4}", "in overrides"),
    ],
)
def test_bad_sweep_input_is_one_clear_line(tmp_path, old, new, expected):
    write(tmp_path / "exp.yaml", "train: {steps: 10}\n")
    path = write(tmp_path / "sweep.yaml", SWEEP.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_cli_config_show_and_check(tmp_path, capsys):
    write(tmp_path / "exp.yaml", "train: {steps: 10}\n")
    sweep = write(tmp_path / "sweep.yaml", SWEEP)
    assert main(["config", "show", str(tmp_path / "exp.yaml"), "data.crop_size=129"]) == 0
    assert "crop_size: 129" in capsys.readouterr().out
    assert main(["config", "check", str(sweep)]) == 0
    assert "8 trials" in capsys.readouterr().out


def test_cli_config_uses_the_data_class_count(tmp_path, capsys):
    """`config show` printed the default 133 classes though the synthetic set has 9."""
    exp = write(tmp_path / "exp.yaml", f"work_dir: {tmp_path / 'runs'}\n")
    assert main(["config", "show", str(exp)]) == 0
    shown = capsys.readouterr().out
    assert "num_classes: 9\n" in shown and "num_thing_classes: 5\n" in shown
    assert main(["config", "check", str(exp)]) == 0
    assert "9 classes" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # the synthetic set is not generated to count


def test_cli_config_missing_data_root(tmp_path, capsys):
    missing = tmp_path / "coco"
    exp = write(tmp_path / "exp.yaml", f"data: {{root: {missing}}}\n")
    assert main(["config", "check", str(exp)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: dataset root not found (expected a COCO panoptic folder)\n"
    assert main(["config", "show", str(exp)]) == 0  # still shown, with a warning
    captured = capsys.readouterr()
    assert "num_classes: 133" in captured.out
    assert captured.err.startswith(f"warning: {missing}: dataset root not found")


def test_cli_prints_one_line_error_without_traceback(tmp_path, capsys):
    exp = write(tmp_path / "exp.yaml", "data: {crop_size: big}\n")
    assert main(["config", "show", str(exp)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_shipped_experiments_and_sweeps_are_valid():
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        if "search:" in path.read_text():
            load_sweep(path)
        else:
            load_experiment(path)


def test_sweep_bundles_move_keys_together(tmp_path):
    write(tmp_path / "exp.yaml", "train: {steps: 10}\n")
    text = SWEEP.replace(
        "  data.crop_size: {grid: [65, 129]}\n",
        "  resolution:\n    grid:\n"
        "      - {data.crop_size: 65, postprocess.thing_area_limit: 1}\n"
        "      - {data.crop_size: 129, postprocess.thing_area_limit: 4}\n",
    )
    sweep = load_sweep(write(tmp_path / "sweep.yaml", text))
    assert sweep.num_trials == 8
    point = sweep.grid_points()[-1]
    trial = sweep.trial_config(point)
    assert (trial.data.crop_size, trial.postprocess.thing_area_limit) == (129, 4)
    bad = text.replace("postprocess.thing_area_limit: 4", "postprocess.thing_area: 4")
    with pytest.raises(ConfigError, match="unknown key 'postprocess.thing_area' in search bundle"):
        load_sweep(write(tmp_path / "bad.yaml", bad))


def test_model_train_crop_size_follows_the_data_crop_unless_recorded(tmp_path):
    assert load_experiment(None).model.train_crop_size == 641
    assert load_experiment(None, ["data.crop_size=1025"]).model.train_crop_size == 1025
    # A trained run's config.yaml records its training crop: evaluated at another crop, it keeps
    # the ASPP pooling it was trained with.
    saved = write(tmp_path / "config.yaml", to_yaml(load_experiment(None)))
    cfg = load_experiment(saved, ["data.crop_size=1025"])
    assert (cfg.data.crop_size, cfg.model.train_crop_size) == (1025, 641)
