"""Sweep YAML: schema, validation and expansion into trials (docs/architecture.md#configuration).

```yaml
name: s641_schedule_study
base: ../model_zoo/max_deeplab_s_os16_res641_100k.yaml   # relative to this file
overrides: {train.batch_size: 64}                         # dotted keys, applied to every trial
search:                                                   # dotted keys -> one distribution each
  data.crop_size: {grid: [641, 1025]}
  optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
tune: {num_samples: 1, max_concurrent_trials: 2, scheduler: {type: asha, grace_period: 20000}}
resources: {num_workers: 8, use_gpu: true}                # per trial; overrides the experiment's
```

Distributions: `grid` (every value, crossed with the other grids), `choice` (sampled), `uniform`,
`loguniform` ([low, high]) and `randint` ([low, high), integers). Keys that must change together
(the crop and its area limits) form a *bundle*: a search key that is not a config key, whose `grid`
or `choice` values are mappings of dotted keys, e.g.
`resolution: {grid: [{data.crop_size: 641, postprocess.thing_area_limit: 100}, {...}]}`.
A sweep runs `num_samples x product(grid sizes)` trials. `load_sweep` validates everything
(every key exists, every value type-checks against its key, every grid point resolves to a valid
experiment) without starting Ray. A trial is named by what it tries (`trial_name`:
`drop_path_schedule=linear`), on the console, in the summary table, in MLflow and in plots.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from maxdeeplab.platform.config import (
    ExperimentConfig,
    merge_layer,
    read_yaml,
    resolve,
    schema,
    schema_keys,
    yaml_chain,
)
from maxdeeplab.platform.errors import ConfigError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("fifo", "asha")
SWEEP_KEYS = ("name", "base", "overrides", "search", "tune", "resources")
NAME_DIGITS = 4  # significant digits of a float in a trial's name


@dataclass
class SchedulerConfig:
    type: str = "fifo"  # fifo | asha (on tune.metric, time measured in training steps)
    grace_period: int = 1000  # training steps before ASHA may stop a trial
    reduction_factor: float = 2.0


@dataclass
class TuneConfig:
    num_samples: int = 1
    max_concurrent_trials: int = 1
    metric: str = "val/pq"
    mode: str = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class Sweep:
    """A validated sweep. `base_layers` are the experiment YAML layers; `overrides` and every
    search point are dotted-key mappings merged on top, then `resources`."""

    path: Path
    name: str
    base: Path
    base_layers: list[tuple[str, DictConfig]]
    overrides: dict[str, Any]
    search: dict[str, dict[str, Any]]
    tune: TuneConfig
    resources: dict[str, Any]

    @property
    def grid(self) -> dict[str, list[Any]]:
        return {k: list(spec["grid"]) for k, spec in self.search.items() if "grid" in spec}

    @property
    def num_trials(self) -> int:
        return self.tune.num_samples * math.prod(len(v) for v in self.grid.values())

    def trial_config(self, point: dict[str, Any]) -> ExperimentConfig:
        """The resolved experiment for one search point ({dotted key: value})."""
        layers = [
            *self.base_layers,
            (f"{self.path} overrides", dotted_to_tree(self.overrides)),
            (f"{self.path} search point", dotted_to_tree(expand_bundles(point))),
        ]
        if self.resources:
            layers.append(
                (f"{self.path} resources", OmegaConf.create({"resources": self.resources}))
            )
        return resolve(layers)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid values (non-grid keys are left to the sampler)."""
        keys = list(self.grid)
        return [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.grid.values())
        ]


def expand_bundles(point: dict[str, Any]) -> dict[str, Any]:
    """Replace each bundle's value (a mapping of dotted keys) by its keys."""
    flat: dict[str, Any] = {}
    for key, value in point.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def trial_name(sweep: Sweep, point: Mapping[str, Any], trial_id: str) -> str:
    """What a trial is called on the console, in the summary table, in MLflow and plot legends.

    The searched keys' short names with their values (`drop_path_schedule=linear, lr=0.002`),
    unique within the sweep: when two trials can get the same point (`tune.num_samples` > 1, or
    grid values that look alike once shortened) the trial's index from its Tune id follows
    (`lr=0.002 #3` for trial `a1b2c_00003`).
    """
    short = _short_keys(list(sweep.search))
    name = ", ".join(f"{short[key]}={_shown(sweep, key, point.get(key))}" for key in sweep.search)
    if name and not _points_may_coincide(sweep):
        return name
    index = trial_id.rsplit("_", 1)[-1]
    return f"{name} #{int(index) if index.isdigit() else trial_id}".strip()


def _short_keys(keys: list[str]) -> dict[str, str]:
    """`model.drop_path_schedule` -> `drop_path_schedule`, unless two keys end alike."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: end if last.count(end) == 1 else key for key, end in zip(keys, last, strict=True)}


def _shown(sweep: Sweep, key: str, value: Any) -> str:
    """A value as a trial's name shows it; a bundle by its first value when that tells the
    bundle's choices apart (`resolution=641`), else by all of its values (`641/100/1600`)."""
    if isinstance(value, Mapping):
        choices = next(iter(sweep.search[key].values()))
        firsts = [next(iter(choice.values()), None) for choice in choices]
        if len(set(map(str, firsts))) == len(firsts) and value:
            return _shown(sweep, key, next(iter(value.values())))
        return "/".join(_shown(sweep, key, v) for v in value.values())
    if isinstance(value, float):
        return f"{value:.{NAME_DIGITS}g}"
    return str(value)


def _points_may_coincide(sweep: Sweep) -> bool:
    if sweep.tune.num_samples > 1:
        return True
    return any(
        len({_shown(sweep, key, value) for value in values}) < len(values)
        for key, values in sweep.grid.items()
    )


def dotted_to_tree(flat: dict[str, Any]) -> DictConfig:
    tree = OmegaConf.create({})
    for key, value in flat.items():
        OmegaConf.update(tree, key, value, force_add=True)
    return tree


def load_sweep(path: str | Path) -> Sweep:
    """Read and completely validate a sweep YAML.

    Raises:
        ConfigError: one line naming the file, key and value at fault.
    """
    path = Path(path).resolve()
    raw = read_yaml(path)
    src = str(path)
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{src}: unknown top-level key {unknown[0]!r} (expected {SWEEP_KEYS})")
    for key in ("name", "base"):
        if not raw.get(key):
            raise ConfigError(f"{src}: missing required key {key!r}")
    base = (path.parent / str(raw.base)).resolve()
    if not base.is_file():
        raise ConfigError(f"{src}: base experiment {base} not found")
    base_layers = [(str(p), layer) for p, layer in yaml_chain(base)]
    overrides = _mapping(raw, "overrides", src)
    search = _mapping(raw, "search", src)
    resources = _mapping(raw, "resources", src)
    tune = _tune(raw, src)

    known = set(schema_keys())
    for key in overrides:
        if key not in known:
            raise ConfigError(f"{src}: unknown key {key!r} in overrides")
    specs = {key: _distribution(key, spec, src) for key, spec in search.items()}
    for key, spec in specs.items():
        ((kind, values),) = spec.items()
        is_bundle = kind in ("grid", "choice") and all(isinstance(v, dict) for v in values)
        if key in known and not is_bundle:
            continue
        if not is_bundle:
            raise ConfigError(f"{src}: unknown key {key!r} in search")
        for bundle in values:
            for inner in bundle:
                if inner not in known:
                    raise ConfigError(f"{src}: unknown key {inner!r} in search bundle {key!r}")
    merge_layer(schema(), {"resources": resources}, src)

    sweep = Sweep(path, str(raw.name), base, base_layers, overrides, specs, tune, resources)
    for key, spec in specs.items():  # every value type-checks against its key
        for value in _values_to_check(spec):
            sweep.trial_config({key: value})
    for point in sweep.grid_points():  # every grid point is a valid experiment
        sweep.trial_config(point)
    return sweep


def _mapping(raw: DictConfig, key: str, src: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, DictConfig):
        raise ConfigError(f"{src}: {key!r} must be a mapping of dotted config keys")
    return OmegaConf.to_container(value)  # type: ignore[return-value]


def _tune(raw: DictConfig, src: str) -> TuneConfig:
    wrapper = OmegaConf.create({"tune": OmegaConf.structured(TuneConfig)})
    OmegaConf.set_struct(wrapper, True)
    merged = merge_layer(wrapper, {"tune": raw.get("tune") or {}}, src)
    typed: TuneConfig = OmegaConf.to_object(merged.tune)  # type: ignore[assignment]
    if typed.scheduler.type not in SCHEDULERS:
        raise ConfigError(
            f"{src}: unknown scheduler {typed.scheduler.type!r} in 'tune.scheduler.type' "
            f"(expected one of {', '.join(SCHEDULERS)})"
        )
    if typed.mode not in ("max", "min"):
        raise ConfigError(f"{src}: bad value {typed.mode!r} for 'tune.mode': expected max or min")
    for key in ("num_samples", "max_concurrent_trials"):
        if getattr(typed, key) < 1:
            raise ConfigError(
                f"{src}: bad value {getattr(typed, key)!r} for 'tune.{key}': must be >= 1"
            )
    return typed


def _distribution(key: str, spec: Any, src: str) -> dict[str, Any]:
    where = f"{src}: search key {key!r}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where}: expected one distribution, e.g. {{grid: [a, b]}}, got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: unknown distribution {kind!r} (expected one of {DISTRIBUTIONS})"
        )
    if not isinstance(args, list | ListConfig) or not args:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if (
            len(args) != 2
            or not all(isinstance(a, int | float) for a in args)
            or args[0] >= args[1]
        ):
            raise ConfigError(
                f"{where}: {kind} needs [low, high] numbers with low < high, got {args!r}"
            )
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint needs integer bounds, got {args!r}")
    return {kind: OmegaConf.to_container(args) if isinstance(args, ListConfig) else list(args)}


def _values_to_check(spec: dict[str, Any]) -> list[Any]:
    ((kind, args),) = spec.items()
    if kind == "randint":
        return [args[0], args[1] - 1]
    return list(args)
