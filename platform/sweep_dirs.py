"""Where a sweep lives: `<work_dir>/sweeps/<name>`, and which directory a run of a sweep YAML takes.

A sweep directory records the sweep's resolved definition (`sweep_definition.json`: search space,
Tune settings, every base-experiment key). Running a YAML again continues the directory holding
the same definition; a changed definition under the same name is refused, or with `--fresh`
started in `<name>-2`, `<name>-3`, ... beside the old one (docs/architecture.md#faults).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from ray import tune

from maxdeeplab.platform.config import to_params, work_dir
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.storage import Location
from maxdeeplab.platform.sweep_config import Sweep

DEFINITION_FILE = "sweep_definition.json"  # what the sweep in this directory searches


def sweep_dir(sweep: Sweep) -> Location:
    """Where a sweep of this name starts (`<work_dir>/sweeps/<name>`)."""
    return work_dir(sweep.trial_config({})) / "sweeps" / sweep.name


def sweep_definition(sweep: Sweep) -> dict[str, str]:
    """The resolved sweep, flat: `search.<key>`, `tune.<field>` and every base-experiment key."""
    flat = {f"search.{k}": json.dumps(v, sort_keys=True) for k, v in sweep.search.items()}
    flat.update({f"tune.{k}": json.dumps(v, sort_keys=True) for k, v in asdict(sweep.tune).items()})
    flat.update({f"experiment.{k}": v for k, v in to_params(sweep.trial_config({})).items()})
    return flat


def choose_sweep_dir(sweep: Sweep, *, resume: bool = False, fresh: bool = False) -> Location:
    """The directory of this sweep: the one holding the same definition, else a new one.

    Raises:
        ConfigError: only directories with another definition exist and `fresh` is not set, or
            `resume` is set and no directory holds this definition.
    """
    first = sweep_dir(sweep)
    existing = []
    for index in range(1, 1000):
        candidate = first if index == 1 else first.parent / f"{sweep.name}-{index}"
        if not _has_state(candidate):
            break
        existing.append(candidate)
    definition = sweep_definition(sweep)
    if not fresh:
        for candidate in existing:
            if _recorded_definition(candidate) == definition:
                return candidate
    new = first if not existing else first.parent / f"{sweep.name}-{len(existing) + 1}"
    if resume:
        raise ConfigError(f"{sweep.path}: nothing to resume: no sweep state for it in {first}")
    if existing and not fresh:
        raise ConfigError(
            f"{sweep.path}: sweep {sweep.name!r} in {existing[-1]} was run with another "
            f"definition ({_first_difference(_recorded_definition(existing[-1]), definition)}); "
            f"start it as a new sweep with --fresh (into {new}; the old one is kept) "
            "or give it another name"
        )
    return new


def _has_state(directory: Location) -> bool:
    return (directory / DEFINITION_FILE).is_file() or tune.Tuner.can_restore(str(directory))


def _recorded_definition(directory: Location) -> dict[str, str] | None:
    path = directory / DEFINITION_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else None


def _first_difference(old: dict[str, str] | None, new: dict[str, str]) -> str:
    if old is None:
        return f"no {DEFINITION_FILE}: made by an older version"
    keys = sorted(set(old) | set(new), key=lambda k: (not k.startswith("search."), k))
    key = next(k for k in keys if old.get(k) != new.get(k))
    return f"{key}: {old.get(key, '(none)')} -> {new.get(key, '(none)')}"
