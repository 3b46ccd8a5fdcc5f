"""The COCO panoptic dataset layout: categories, the contiguous label remap and a split reader.

Layout (COCO 2017, also what `maxdeeplab data synthetic` writes)::

    ROOT/annotations/panoptic_<split>.json   images, annotations (segments_info), categories
    ROOT/annotations/panoptic_<split>/*.png  RGB-encoded segment ids (0 = void)
    ROOT/<split>/*.jpg                       the images

Contiguous ids (deeplab2 `coco_constants.get_id_mapping`, docs/deeplab2.md#coco-panoptic-ids): the
things in JSON order get 1..T, then the stuff in JSON order get T+1..K; 0 is void. `DatasetInfo`
holds the map both ways, so training uses contiguous ids and predictions are written back with
the dataset's category ids.
Crowd segments (`iscrowd=1`) are void for training (deeplab2 builds COCO with
`treat_crowd_as_ignore=True`); the evaluator keeps them, as panopticapi does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maxdeeplab.platform.data.image_io import read_image
from maxdeeplab.platform.data.panoptic_format import load_json, read_panoptic_png
from maxdeeplab.platform.errors import DataError


@dataclass(frozen=True)
class Category:
    """One dataset category as the JSON lists it."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)
    supercategory: str = ""


@dataclass(frozen=True)
class DatasetInfo:
    """The categories of a dataset in contiguous order (things first, then stuff).

    Attributes:
        categories: category `i` of this tuple has contiguous id `i + 1`.
    """

    categories: tuple[Category, ...]
    dataset_to_contiguous: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mapping = {c.id: i + 1 for i, c in enumerate(self.categories)}
        object.__setattr__(self, "dataset_to_contiguous", mapping)

    @classmethod
    def from_json_categories(cls, entries: list[dict[str, Any]], source: str = "") -> DatasetInfo:
        """Build from the JSON `categories` list, reordering it as things first, then stuff.

        Raises:
            DataError: an entry lacks `id`/`isthing`, or a category id repeats (names `source`).
        """
        where = f"{source}: " if source else ""
        categories = []
        seen: set[int] = set()
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry or "isthing" not in entry:
                raise DataError(f"{where}category #{position} lacks 'id' or 'isthing'")
            cat_id = int(entry["id"])
            if cat_id in seen:
                raise DataError(f"{where}duplicate category id {cat_id}")
            seen.add(cat_id)
            color = entry.get("color") or (0, 0, 0)
            categories.append(
                Category(
                    id=cat_id,
                    name=str(entry.get("name", cat_id)),
                    isthing=bool(entry["isthing"]),
                    color=(int(color[0]), int(color[1]), int(color[2])),
                    supercategory=str(entry.get("supercategory", "")),
                )
            )
        ordered = [c for c in categories if c.isthing] + [c for c in categories if not c.isthing]
        return cls(tuple(ordered))

    @property
    def num_classes(self) -> int:
        """K, the number of real classes (void excluded); ModelConfig.num_classes."""
        return len(self.categories)

    @property
    def num_thing_classes(self) -> int:
        """T: contiguous ids 1..T are things."""
        return sum(c.isthing for c in self.categories)

    @property
    def contiguous_to_dataset(self) -> dict[int, int]:
        return {i + 1: c.id for i, c in enumerate(self.categories)}

    @property
    def thing_flags(self) -> list[bool]:
        """isthing per contiguous id, index 0 = void (False)."""
        return [False] + [c.isthing for c in self.categories]

    def isthing(self, contiguous_id: int) -> bool:
        return 1 <= contiguous_id <= self.num_thing_classes

    def to_contiguous(self, category_id: int) -> int:
        """Dataset category id -> contiguous id. Raises DataError for an unknown id."""
        try:
            return self.dataset_to_contiguous[int(category_id)]
        except KeyError:
            raise DataError(f"unknown category id {category_id}") from None

    def to_dataset(self, contiguous_id: int) -> int:
        """Contiguous id (1..K) -> dataset category id, for writing predictions."""
        if not 1 <= contiguous_id <= self.num_classes:
            raise ValueError(f"contiguous id {contiguous_id} outside 1..{self.num_classes}")
        return self.categories[contiguous_id - 1].id

    def contiguous_to_dataset_lut(self) -> np.ndarray:
        """(K+1,) int64 array: contiguous id -> dataset id (index 0 -> 0, void)."""
        return np.array([0] + [c.id for c in self.categories], dtype=np.int64)


@dataclass(frozen=True)
class Segment:
    """One entry of an annotation's `segments_info`."""

    id: int
    category_id: int
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    iscrowd: bool


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split and its panoptic annotation."""

    image_id: int | str
    file_name: str  # image file, relative to ROOT/<split>
    label_file: str  # PNG, relative to ROOT/annotations/panoptic_<split>
    height: int
    width: int
    segments: tuple[Segment, ...]


def split_paths(root: str | Path, split: str) -> tuple[Path, Path, Path]:
    """(JSON, PNG folder, image folder) of a split under a COCO panoptic root."""
    root = Path(root)
    return (
        root / "annotations" / f"panoptic_{split}.json",
        root / "annotations" / f"panoptic_{split}",
        root / split,
    )


def require_root(root: str | Path) -> Path:
    """Raise a DataError unless `root` is an existing folder."""
    path = Path(root).expanduser()
    if not str(root):
        raise DataError("no dataset root given (data.root is empty)")
    if not path.is_dir():
        raise DataError(f"{path}: dataset root not found (expected a COCO panoptic folder)")
    return path


def parse_segment(entry: dict[str, Any], where: str) -> Segment:
    """One `segments_info` entry -> Segment. Raises DataError naming `where` if malformed."""
    try:
        bbox = entry.get("bbox") or (0, 0, 0, 0)
        return Segment(
            id=int(entry["id"]),
            category_id=int(entry["category_id"]),
            area=int(entry.get("area", -1)),
            bbox=(int(bbox[0]), int(bbox[1]), int(bbox[2]), int(bbox[3])),
            iscrowd=bool(entry.get("iscrowd", 0)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{where}: malformed segment {entry!r} ({exc})") from None


class CocoPanoptic:
    """A split of a COCO panoptic dataset: its categories and image records.

    Args:
        root: the dataset root (holding `annotations/` and `<split>/`).
        split: e.g. `train2017`.

    Raises:
        DataError: the root or the JSON is missing, or the JSON is malformed (unknown category
            ids, annotations without an image); `maxdeeplab data check` lists every problem.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = require_root(root)
        self.split = split
        self.json_path, self.label_dir, self.image_dir = split_paths(self.root, split)
        data = load_json(self.json_path)
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{self.json_path}: missing or malformed '{key}' list")
        self.info = DatasetInfo.from_json_categories(data["categories"], str(self.json_path))
        self.records = self._parse_records(data)

    def _parse_records(self, data: dict[str, Any]) -> list[ImageRecord]:
        images = {}
        for entry in data["images"]:
            try:
                images[entry["id"]] = entry
            except (KeyError, TypeError):
                raise DataError(f"{self.json_path}: image entry without 'id': {entry!r}") from None
        records = []
        for ann in data["annotations"]:
            image_id = ann.get("image_id")
            if image_id not in images:
                raise DataError(f"{self.json_path}: annotation for unknown image id {image_id!r}")
            where = f"{self.json_path}: image {image_id}"
            segments = tuple(parse_segment(s, where) for s in ann.get("segments_info", []))
            for seg in segments:
                if seg.category_id not in self.info.dataset_to_contiguous:
                    raise DataError(
                        f"{where}: segment {seg.id} has unknown category id {seg.category_id}"
                    )
            image = images[image_id]
            records.append(
                ImageRecord(
                    image_id=image_id,
                    file_name=str(image.get("file_name", "")),
                    label_file=str(ann.get("file_name", "")),
                    height=int(image.get("height", 0)),
                    width=int(image.get("width", 0)),
                    segments=segments,
                )
            )
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    def image_path(self, record: ImageRecord) -> Path:
        return self.image_dir / record.file_name

    def label_path(self, record: ImageRecord) -> Path:
        return self.label_dir / record.label_file

    def load_image(self, index: int) -> np.ndarray:
        """H x W x 3 uint8. Raises DataError naming the file if missing or corrupt."""
        return read_image(self.image_path(self.records[index]))

    def load_panoptic(self, index: int) -> np.ndarray:
        """H x W int64 segment ids (0 = void). Raises DataError naming the file."""
        return read_panoptic_png(self.label_path(self.records[index]))


def segment_index_map(
    ids: np.ndarray, segments: tuple[Segment, ...] | list[Segment], crowd_as_void: bool = True
) -> np.ndarray:
    """Segment-id map -> compact labels: k + 1 for a pixel of `segments[k]`, 0 for void.

    Void covers id 0, ids absent from `segments` and, with `crowd_as_void` (deeplab2's training
    labels), crowd segments. The compact map is what the augmentation resizes (int32, and at the
    raw resolution it is cheaper to build than at the crop's).

    Args:
        ids: H x W int segment ids.

    Returns:
        H x W int32.
    """
    labels = np.zeros(ids.shape, dtype=np.int32)
    seg_ids = np.array([s.id for s in segments], dtype=np.int64)
    if not len(seg_ids):
        return labels
    value = np.arange(1, len(segments) + 1, dtype=np.int32)
    if crowd_as_void:
        value[[s.iscrowd for s in segments]] = 0
    order = np.argsort(seg_ids)
    sorted_ids = seg_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == ids
    labels[found] = value[order[pos[found]]]
    return labels


def semantic_from_ids(
    ids: np.ndarray, segments: tuple[Segment, ...] | list[Segment], info: DatasetInfo
) -> tuple[np.ndarray, np.ndarray]:
    """Segment-id map -> (semantic, segment index) with crowd as void (deeplab2's training labels).

    Args:
        ids: H x W int segment ids (0 = void).

    Returns:
        semantic: H x W int64 contiguous ids, 0 for void, crowd and ids not in `segments`.
        index: H x W int64 index into `segments` of each pixel's segment, -1 where none (void,
            crowd or unknown ids).
    """
    index = segment_index_map(ids, segments).astype(np.int64) - 1
    semantic_lut = np.array(
        [info.to_contiguous(s.category_id) for s in segments] + [0], dtype=np.int64
    )
    return semantic_lut[index], index  # index -1 reads the trailing 0 (void)
