"""`maxdeeplab data check`: validate a COCO panoptic split and list every problem found.

Checks the JSON structure, categories (duplicate ids, missing `isthing`), images (duplicate ids,
missing or corrupt files, size mismatches with the JSON) and every annotation against its PNG:
segment ids listed in the JSON but absent from the PNG and vice versa, duplicate segment ids,
unknown category ids, `area` differing from the PNG's pixel count and a PNG size differing from
its image. Unlike the loaders, which stop at the first bad file, it keeps going and reports all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from maxdeeplab.platform.data.coco import require_root, split_paths
from maxdeeplab.platform.data.image_io import read_image
from maxdeeplab.platform.data.panoptic_format import load_json, read_panoptic_png
from maxdeeplab.platform.errors import DataError


def image_size(path: Path) -> tuple[int, int] | str:
    """(height, width) of a fully decoded image, or a problem string (missing/corrupt).

    Decoded as the loaders decode it, so every file reported readable here loads in training.
    """
    if not path.is_file():
        return f"{path}: image file missing"
    try:
        height, width, _ = read_image(path).shape
    except DataError as exc:
        return str(exc)
    return height, width


def check_annotation(task: dict[str, Any]) -> list[str]:
    """Problems of one image + annotation pair (runs in worker processes)."""
    problems: list[str] = []
    image_path, label_path = Path(task["image_path"]), Path(task["label_path"])
    where = f"image {task['image_id']}"
    size = image_size(image_path)
    if isinstance(size, str):
        problems.append(size)
    elif task["height"] and task["width"] and size != (task["height"], task["width"]):
        problems.append(
            f"{image_path}: size {size[0]}x{size[1]} differs from the JSON's "
            f"{task['height']}x{task['width']}"
        )
    try:
        ids = read_panoptic_png(label_path)
    except DataError as exc:
        problems.append(str(exc))
        return problems
    if not isinstance(size, str) and ids.shape != size:
        problems.append(
            f"{label_path}: PNG size {ids.shape[0]}x{ids.shape[1]} differs from its image "
            f"{size[0]}x{size[1]}"
        )
    present, counts = np.unique(ids, return_counts=True)
    png_area = dict(zip(present.tolist(), counts.tolist(), strict=True))
    segments = task["segments"]
    for seg_id, n in Counter(s.get("id") for s in segments).items():
        if n > 1:
            problems.append(f"{label_path}: {where}: segment id {seg_id} listed {n} times")
    known = set(task["category_ids"])
    for seg in segments:
        seg_id = seg.get("id")
        if seg.get("category_id") not in known:
            problems.append(
                f"{label_path}: {where}: segment {seg_id} has unknown category id "
                f"{seg.get('category_id')}"
            )
        if seg.get("iscrowd", 0) not in (0, 1):
            problems.append(
                f"{label_path}: {where}: segment {seg_id} has iscrowd "
                f"{seg.get('iscrowd')!r} (expected 0 or 1)"
            )
        if seg_id not in png_area:
            problems.append(f"{label_path}: {where}: JSON segment {seg_id} is absent from the PNG")
        elif "area" in seg and int(seg["area"]) != png_area[seg_id]:
            problems.append(
                f"{label_path}: {where}: segment {seg_id} area {seg['area']} in the JSON but "
                f"{png_area[seg_id]} pixels in the PNG"
            )
    listed = {s.get("id") for s in segments}
    for seg_id in sorted(set(png_area) - listed - {0}):
        problems.append(
            f"{label_path}: {where}: PNG segment {seg_id} ({png_area[seg_id]} px) "
            "is not in the JSON"
        )
    return problems


def check_structure(data: dict[str, Any], json_path: Path) -> tuple[list[str], list[dict]]:
    """Problems of the JSON document itself, and the annotation tasks to check against files."""
    problems = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(f"{json_path}: missing or malformed '{key}' list")
    if problems:
        return problems, []
    category_ids = []
    for position, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "isthing" not in cat:
            problems.append(f"{json_path}: category #{position} lacks 'id' or 'isthing'")
            continue
        category_ids.append(cat["id"])
    for cat_id, n in Counter(category_ids).items():
        if n > 1:
            problems.append(f"{json_path}: category id {cat_id} listed {n} times")
    images: dict[Any, dict] = {}
    for entry in data["images"]:
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if image_id is None:
            problems.append(f"{json_path}: image entry without 'id': {entry!r}")
        elif image_id in images:
            problems.append(f"{json_path}: duplicate image id {image_id}")
        else:
            images[image_id] = entry
    annotated: set[Any] = set()
    tasks = []
    for ann in data["annotations"]:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in images:
            problems.append(f"{json_path}: annotation for unknown image id {image_id!r}")
            continue
        if image_id in annotated:
            problems.append(f"{json_path}: image {image_id} has more than one annotation")
            continue
        annotated.add(image_id)
        segments = ann.get("segments_info")
        if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
            problems.append(f"{json_path}: image {image_id}: malformed 'segments_info'")
            continue
        tasks.append(
            {
                "image_id": image_id,
                "entry": images[image_id],
                "ann": ann,
                "category_ids": category_ids,
                "segments": segments,
            }
        )
    for image_id in images.keys() - annotated:
        problems.append(f"{json_path}: image {image_id} has no annotation")
    return problems, tasks


def check_split(
    root: str | Path,
    split: str,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Validate one split of a COCO panoptic dataset.

    Args:
        root: the dataset root.
        split: e.g. `val2017`.
        workers: processes decoding files in parallel (1 = in this process).
        progress: called with the number of images done, for a progress bar.

    Returns:
        Every problem found, one line each (empty when the split is valid).

    Raises:
        DataError: the root folder does not exist.
    """
    root = require_root(root)
    json_path, label_dir, image_dir = split_paths(root, split)
    try:
        data = load_json(json_path)
    except DataError as exc:
        return [str(exc)]
    problems, tasks = check_structure(data, json_path)
    for task in tasks:
        task["image_path"] = str(image_dir / str(task["entry"].get("file_name", "")))
        task["label_path"] = str(label_dir / str(task["ann"].get("file_name", "")))
        task["height"] = int(task["entry"].get("height", 0) or 0)
        task["width"] = int(task["entry"].get("width", 0) or 0)
        del task["entry"], task["ann"]
    for found in map_tasks(tasks, workers):
        problems.extend(found)
        if progress is not None:
            progress(1)
    return problems


def map_tasks(tasks: list[dict], workers: int) -> Iterator[list[str]]:
    if workers <= 1 or len(tasks) < 2 * workers:
        yield from map(check_annotation, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(check_annotation, tasks, chunksize=16)
