"""Experiment configuration: the dataclass schema, YAML loading and the merge order.

Overview: docs/architecture.md#configuration.

    dataclass schema (defaults) <- model variant <- experiment YAML (and its `base:` files)
        <- CLI `key=value` dotlist <- Tune trial overrides

Every layer is merged with OmegaConf in struct mode, so a misspelt key or a value of the wrong type
fails before any work starts, with the file, the key and the value named. The defaults are
deeplab2's MaX-DeepLab-S COCO settings (docs/deeplab2.md#training); model, loss and
post-processing settings live in `maxdeeplab.models.config` because `models/` may not import
`platform/`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from maxdeeplab.models.config import (
    POSTPROCESS_MODES,
    LossConfig,
    ModelConfig,
    PostprocessConfig,
    loss_config_problem,
    model_config_problem,
    variant_overrides,
)
from maxdeeplab.models.strides import OUTPUT_STRIDE, is_valid_crop_size
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.storage import Location, StorageError

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# train.amp: 'auto' = bf16 autocast on GPU, float32 on CPU; 'bf16' = bf16 autocast on every device
# (on CPU too: slower there without bf16 instructions, but it lets CI run the mixed-precision
# path); 'fp32' = never. Not 'on'/'off': YAML reads those as booleans.
AMP_MODES = ("auto", "bf16", "fp32")
# YAML booleans, as run configs written before the modes existed hold them, keep their meaning.
AMP_BOOLEANS = {"True": "auto", "False": "fp32"}


@dataclass
class DataConfig:
    """Dataset and augmentation (docs/deeplab2.md#data-pipeline)."""

    root: str = ""  # a COCO-panoptic root; empty = the built-in synthetic set
    train_split: str = "train2017"
    val_split: str = "val2017"
    crop_size: int = 641  # train and eval crop; must be 16k+1 (deeplab2's alignment rule)
    min_scale: float = 0.5  # random scale drawn from {min, min+step, ..., max}
    max_scale: float = 1.5
    scale_step: float = 0.1
    num_workers: int = 2  # loader processes per training worker
    skip_corrupt: bool = False  # skip (and count) unreadable files instead of failing
    # The built-in synthetic set, generated on first use under <cache_dir>/data.
    synthetic_train: int = 200
    synthetic_val: int = 50
    synthetic_size: list[int] = field(default_factory=lambda: [321, 321])  # H, W
    synthetic_seed: int = 0


@dataclass
class TrainConfig:
    """The training loop (docs/deeplab2.md#solver)."""

    steps: int = 100_000
    batch_size: int = 64  # global batch, split across workers (gradient accumulation when needed)
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    log_interval: int = 100
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    # Images per worker per forward pass; 0 = batch_size / num_workers (no accumulation). Smaller
    # values accumulate gradients over batch_size / (num_workers * micro_batch_size) passes.
    micro_batch_size: int = 0
    channels_last: bool = True
    amp: str = "auto"  # AMP_MODES: bf16 autocast on GPU only (auto), everywhere, or never


@dataclass
class OptimConfig:
    """Adam with linear warmup and poly decay (docs/deeplab2.md#solver)."""

    lr: float = 1e-3
    backbone_lr_multiplier: float = 0.1
    warmup_steps: int = 5000
    poly_power: float = 0.9
    end_lr: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7  # tf.keras default (PyTorch's is 1e-8)
    weight_decay: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    interval: int = 5000  # steps between evaluations (and one at the end)
    max_images: int = 0  # 0 = the whole val split
    num_visualizations: int = 4  # colourised predictions logged per evaluation
    batch_size: int = 1  # images per worker per forward pass (deeplab2 evaluates with batch 1)


@dataclass
class TrackingConfig:
    """MLflow. An empty uri means MLFLOW_TRACKING_URI, else sqlite under the work dir."""

    uri: str = ""
    experiment: str = "maxdeeplab"
    run_name: str = ""


@dataclass
class ResourcesConfig:
    """Ray Train scaling: one worker per GPU when use_gpu is on."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    address: str = ""  # an existing Ray cluster (or RAY_ADDRESS); empty = a local embedded Ray


@dataclass
class ExperimentConfig:
    name: str = "maxdeeplab"
    seed: int = 0
    # Where every run's state lives (checkpoints, resolved config, MLflow run id, sweep state,
    # plots): a local path, file://, s3://bucket/prefix or gs://bucket/prefix. A local work dir
    # also holds the default MLflow store; object storage needs tracking.uri (a server).
    work_dir: str = "runs"
    # Local caches (the generated synthetic set); empty: the work dir when it is local, else
    # ~/.cache/maxdeeplab. Each node fills its own.
    cache_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def read_yaml(path: Path) -> DictConfig:
    """Read one YAML mapping; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and OmegaConf's own parse errors
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: invalid YAML ({first_line})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return loaded


def yaml_chain(path: str | Path) -> list[tuple[Path, DictConfig]]:
    """The YAML files an experiment is made of, base first, each without its `base:` key.

    `base:` is resolved relative to the file that names it.

    Raises:
        ConfigError: a file is missing or invalid, or the `base:` chain is circular.
    """
    chain: list[tuple[Path, DictConfig]] = []
    seen: list[Path] = []
    current: Path | None = Path(path).resolve()
    referrer: Path | None = None
    while current is not None:
        if current in seen:
            cycle = " -> ".join(str(p) for p in [*seen, current])
            raise ConfigError(f"{seen[-1]}: circular base: chain ({cycle})")
        if not current.is_file() and referrer is not None:
            raise ConfigError(f"{referrer}: base file {current} not found")
        layer = read_yaml(current)
        seen.append(current)
        base = layer.pop("base", None)
        chain.append((current, layer))
        referrer = current
        current = (current.parent / str(base)).resolve() if base else None
    return chain[::-1]


def schema() -> DictConfig:
    """The full schema with defaults, in struct mode (unknown keys are errors)."""
    cfg = OmegaConf.structured(ExperimentConfig)
    OmegaConf.set_struct(cfg, True)
    return cfg


def schema_keys() -> list[str]:
    """Every dotted leaf key of the schema (`data.crop_size`, ...)."""
    return list(flatten(OmegaConf.to_container(schema())).keys())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}; lists are leaves."""
    if isinstance(tree, dict | DictConfig):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key!s}."))
        return flat
    return {prefix[:-1]: tree}


def parse_dotlist(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """`["train.steps=10", ...]` -> a config; errors name the bad item."""
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command line: cannot parse overrides ({exc})") from None


def merge_layer(cfg: DictConfig, layer: DictConfig | dict[str, Any], source: str) -> DictConfig:
    """Merge one layer into the struct-mode config, turning OmegaConf errors into one line."""
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(describe_merge_error(exc, cfg, layer, source)) from None


def describe_merge_error(
    exc: OmegaConfBaseException, cfg: DictConfig, layer: Any, source: str
) -> str:
    key = re.sub(r"\[(\d+)\]", r".\1", getattr(exc, "full_key", None) or "")
    if isinstance(exc, ConfigKeyError):
        valid = list(flatten(OmegaConf.to_container(cfg)))
        bad = key or _first_unknown_key(layer, valid)
        close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{source}: unknown key {bad!r}{hint}"
    message = str(exc).splitlines()[0]
    value = _lookup(layer, key) if key else None
    if "could not be converted to" in message:
        message = "expected " + message.split("could not be converted to")[-1].strip()
    return f"{source}: bad value {value!r} for {key!r}: {message}"


def _first_unknown_key(layer: Any, valid: list[str]) -> str:
    known = set(valid)
    for key in flatten(OmegaConf.to_container(layer) if isinstance(layer, DictConfig) else layer):
        if key not in known and not any(k.startswith(key + ".") for k in known):
            return key
    return "?"


def _lookup(layer: Any, dotted: str) -> Any:
    node = layer
    for part in dotted.split("."):
        if isinstance(node, dict | DictConfig) and part in node:
            node = node[part]
        elif isinstance(node, list | ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return OmegaConf.to_container(node) if isinstance(node, DictConfig | ListConfig) else node


def _selected_variant(layers: list[tuple[str, DictConfig]]) -> str:
    variant = ModelConfig.variant
    for _, layer in layers:
        value = OmegaConf.select(layer, "model.variant", default=None)
        if value is not None:
            variant = str(value)
    return variant


def resolve(layers: list[tuple[str, DictConfig]]) -> ExperimentConfig:
    """Merge named layers over the schema and its model variant; return the typed config.

    Args:
        layers: (source name for errors, config) pairs, lowest precedence first.
    """
    variant = _selected_variant(layers)
    try:
        overrides = variant_overrides(variant)
    except KeyError as exc:
        source = next((s for s, c in reversed(layers) if OmegaConf.select(c, "model.variant")), "?")
        raise ConfigError(f"{source}: {exc.args[0]}") from None
    cfg = merge_layer(schema(), {"model": overrides}, f"variant {variant}")
    for source, layer in layers:
        cfg = merge_layer(cfg, layer, source)
    try:
        typed: ExperimentConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{layers[-1][0] if layers else 'config'}: {exc}") from None
    typed.train.amp = AMP_BOOLEANS.get(typed.train.amp, typed.train.amp)
    if typed.model.train_crop_size == 0:
        # The model's ASPP pooling follows its training crop (docs/deeplab2.md#auxiliary-semantic-
        # branch). A run's saved config records it, so evaluating that run with another
        # data.crop_size keeps the pooling it was trained with, as deeplab2 does.
        typed.model.train_crop_size = typed.data.crop_size
    problem = first_invalid_value(typed)
    if problem is not None:
        key, value, why = problem
        source = next(
            (s for s, layer in reversed(layers) if OmegaConf.select(layer, key) is not None),
            f"variant {variant}",
        )
        raise ConfigError(f"{source}: bad value {value!r} for {key!r}: {why}")
    return typed


def load_experiment(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Resolve an experiment YAML (and its `base:` chain) plus `key=value` overrides.

    Raises:
        ConfigError: one line naming the file, key and value at fault.
    """
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers += [(str(p), layer) for p, layer in yaml_chain(path)]
    if overrides:
        layers.append(("command line", parse_dotlist(overrides)))
    return resolve(layers)


def first_invalid_value(cfg: ExperimentConfig) -> tuple[str, Any, str] | None:
    """Rules a type check cannot express: the first (key, value, reason) broken, or None."""
    crop = cfg.data.crop_size
    if not is_valid_crop_size(crop):
        return (
            "data.crop_size",
            crop,
            f"must be of the form {OUTPUT_STRIDE}k+1 (e.g. 65, 129, 321, 641, 1025)",
        )
    try:
        Location.parse(cfg.work_dir)
    except StorageError as exc:
        return "work_dir", cfg.work_dir, str(exc).split(": ", 1)[-1]
    for section, problem in (
        ("model", model_config_problem(cfg.model)),
        ("loss", loss_config_problem(cfg.loss)),
    ):
        if problem is not None:
            key, value, why = problem
            return f"{section}.{key}", value, why
    choices = {
        "postprocess.mode": (cfg.postprocess.mode, POSTPROCESS_MODES),
        "resources.placement_strategy": (cfg.resources.placement_strategy, PLACEMENT_STRATEGIES),
        "train.amp": (cfg.train.amp, AMP_MODES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            return key, value, f"expected one of {', '.join(allowed)}"
    positive: dict[str, float] = {
        "train.steps": cfg.train.steps,
        "train.batch_size": cfg.train.batch_size,
        "train.checkpoint_interval": cfg.train.checkpoint_interval,
        "train.log_interval": cfg.train.log_interval,
        "eval.interval": cfg.eval.interval,
        "resources.num_workers": cfg.resources.num_workers,
        "optim.lr": cfg.optim.lr,
        "data.min_scale": cfg.data.min_scale,
    }
    for key, number in positive.items():
        if number <= 0:
            return key, number, "must be positive"
    if cfg.data.min_scale > cfg.data.max_scale:
        return "data.max_scale", cfg.data.max_scale, "must be >= data.min_scale"
    if len(cfg.data.synthetic_size) != 2:
        return "data.synthetic_size", cfg.data.synthetic_size, "expected [height, width]"
    return None


# ---------------------------------------------------------------------------------------------
# Output


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_params(cfg: ExperimentConfig) -> dict[str, str]:
    """Every leaf as {dotted key: string}, for MLflow params."""
    return {
        k: str(v) for k, v in flatten(OmegaConf.to_container(OmegaConf.structured(cfg))).items()
    }


def work_dir(cfg: ExperimentConfig) -> Location:
    """The work dir as a storage location (relative paths are taken from the current directory).

    Raises:
        StorageError: a scheme we cannot store to.
    """
    return Location.parse(cfg.work_dir)


def cache_dir(cfg: ExperimentConfig) -> Path:
    """The local cache folder: `cache_dir`, else a local work dir, else ~/.cache/maxdeeplab."""
    if cfg.cache_dir:
        return Path(os.path.expanduser(cfg.cache_dir)).resolve()
    root = work_dir(cfg)
    return root.local_path() if root.is_local else Path.home() / ".cache" / "maxdeeplab"


def load_saved_experiment(
    location: Location, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """A run's resolved `config.yaml` read from storage, with `key=value` overrides on top.

    Raises:
        ConfigError: the file cannot be parsed or a key/value is invalid (named with its URI).
        StorageError: the storage cannot be read.
    """
    try:
        saved = OmegaConf.create(location.read_text())
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{location}: {exc}") from None
    if not isinstance(saved, DictConfig):
        raise ConfigError(f"{location}: expected a mapping of config sections")
    layers: list[tuple[str, DictConfig]] = [(str(location), saved)]
    if overrides:
        layers.append(("command line", parse_dotlist(overrides)))
    return resolve(layers)
