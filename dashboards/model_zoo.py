"""The published MaX-DeepLab model zoo (COCO val), as data.

`model_zoo.csv` next to this module is a copy of the project's reference table (deeplab2's
`g3doc/projects/max_deeplab.md`, docs/deeplab2.md#model-zoo-configs): one row per
`experiments/model_zoo/<name>.yaml` config, with the settings that define the row and its
published numbers. `pq`, `pq_thing` and `pq_stuff` come from the official panopticapi script,
`pq_pipeline` (PQ**) from deeplab2's own TensorFlow evaluation (crowd counted as void,
docs/deeplab2.md#pipeline-pq). All numbers are percentages.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ZOO_CSV = Path(__file__).with_name("model_zoo.csv")

# The run params (flattened config keys) that define a model-zoo row, and the CSV column of each.
DEFINING_PARAMS: dict[str, str] = {
    "model.variant": "variant",
    "data.crop_size": "crop_size",
    "train.steps": "train_steps",
    "optim.lr": "base_lr",
    "postprocess.thing_area_limit": "thing_area_limit",
    "postprocess.stuff_area_limit": "stuff_area_limit",
}


@dataclass(frozen=True)
class ZooEntry:
    """One published row: its config's defining settings and its COCO val numbers (percent)."""

    name: str
    variant: str
    crop_size: int
    train_steps: int
    base_lr: float
    thing_area_limit: int
    stuff_area_limit: int
    pq: float
    pq_thing: float
    pq_stuff: float
    pq_pipeline: float
    source: str  # `seed`: the project's required rows; `deeplab2`: the rest of the original zoo

    def matches(self, params: Mapping[str, str]) -> bool:
        """Whether a run with these MLflow params (string values) trained this row's config.

        A run matches when every defining setting (variant, crop, steps, LR, area limits) equals
        the row's: the experiment name is free, so renamed or re-run configs still count, while a
        shortened smoke run (`train.steps=1000`) of the same file does not.
        """
        for key, column in DEFINING_PARAMS.items():
            value = params.get(key)
            if value is None:
                return False
            expected = getattr(self, column)
            try:
                if isinstance(expected, str):
                    same = value == expected
                elif isinstance(expected, float):
                    same = abs(float(value) - expected) <= 1e-9 * max(1.0, abs(expected))
                else:
                    same = int(float(value)) == expected and float(value).is_integer()
            except ValueError:
                return False
            if not same:
                return False
        return True


def published_rows(path: str | Path = ZOO_CSV) -> list[ZooEntry]:
    """The published rows, in the table's order.

    Raises:
        ValueError: a row lacks a column or holds a value of the wrong type (names the line).
    """
    path = Path(path)
    entries = []
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                entries.append(
                    ZooEntry(
                        name=row["name"],
                        variant=row["variant"],
                        crop_size=int(row["crop_size"]),
                        train_steps=int(row["train_steps"]),
                        base_lr=float(row["base_lr"]),
                        thing_area_limit=int(row["thing_area_limit"]),
                        stuff_area_limit=int(row["stuff_area_limit"]),
                        pq=float(row["pq"]),
                        pq_thing=float(row["pq_thing"]),
                        pq_stuff=float(row["pq_stuff"]),
                        pq_pipeline=float(row["pq_pipeline"]),
                        source=row["source"],
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad model-zoo row ({exc})") from None
    return entries
