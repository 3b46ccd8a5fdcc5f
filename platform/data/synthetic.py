"""A seeded synthetic dataset written in exactly the COCO panoptic format.

Its place in the data flow: docs/architecture.md#data-flow.

It exercises what COCO exercises: several thing classes with multiple, touching and occluding
instances (instances of the same class can touch; a ring has a hole showing the background),
several stuff classes (one segment per class per image, possibly in disconnected parts), crowd
segments (a cluster of small shapes labelled as one `iscrowd=1` segment), void pixels (unlabelled
clutter and thin unlabelled rims), and object sizes from a few pixels to a quarter of the image.
Category ids are not contiguous and stuff is interleaved with things in the JSON, so the
contiguous remap is exercised.

It is learnable: a thing's class is fixed by its shape and saturated colour, a stuff class by its
muted colour and texture. Every image is drawn from its own generator seeded by (seed, split,
index), so an image does not depend on how many others are generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from maxdeeplab.platform.data.panoptic_format import write_panoptic_png

# Bump when the generator's output changes, so cached copies are regenerated.
GENERATOR_VERSION = 2
SPLITS = ("train2017", "val2017")
JPEG_QUALITY = 95

# Thing classes: shape + saturated colour. Stuff classes: texture + muted colour. Ids are
# deliberately non-contiguous and interleaved (things-first ordering must come from `isthing`).
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "disc", "supercategory": "shape", "isthing": 1, "color": [225, 35, 35]},
    {"id": 3, "name": "box", "supercategory": "shape", "isthing": 1, "color": [35, 205, 60]},
    {"id": 5, "name": "sky", "supercategory": "stuff", "isthing": 0, "color": [165, 195, 225]},
    {"id": 7, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [45, 70, 235]},
    {"id": 8, "name": "ring", "supercategory": "shape", "isthing": 1, "color": [245, 210, 25]},
    {"id": 12, "name": "cross", "supercategory": "shape", "isthing": 1, "color": [205, 45, 215]},
    {
        "id": 21,
        "name": "grass",
        "supercategory": "stuff",
        "isthing": 0,
        "color": [95, 125, 70],
    },
    {
        "id": 25,
        "name": "brick",
        "supercategory": "stuff",
        "isthing": 0,
        "color": [140, 85, 70],
    },
    {
        "id": 30,
        "name": "water",
        "supercategory": "stuff",
        "isthing": 0,
        "color": [55, 95, 130],
    },
]
THING_IDS = [c["id"] for c in CATEGORIES if c["isthing"]]
STUFF_IDS = [c["id"] for c in CATEGORIES if not c["isthing"]]
COLORS = {c["id"]: np.array(c["color"], dtype=np.float32) for c in CATEGORIES}
SHAPES = {1: "disc", 3: "box", 7: "triangle", 8: "ring", 12: "cross"}
MAX_SEGMENT_ID = 256**3 - 1


def stuff_texture(category_id: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """H x W x 3 float texture of a stuff class (colour + pattern decide the class)."""
    base = COLORS[category_id]
    name = next(c["name"] for c in CATEGORIES if c["id"] == category_id)
    shade = np.zeros(yy.shape, dtype=np.float32)
    if name == "sky":
        shade = 25.0 * (1.0 - yy / max(yy.max(), 1.0))  # brighter towards the top
    elif name == "grass":
        shade = 28.0 * np.sin(2 * np.pi * xx / 6.0)  # vertical blades
    elif name == "brick":
        row = (yy // 12).astype(np.int64)
        mortar = (yy % 12 < 2) | ((xx + 12 * (row % 2)) % 24 < 2)
        shade = np.where(mortar, 70.0, 0.0).astype(np.float32)
    elif name == "water":
        shade = 30.0 * np.sin(2 * np.pi * (yy / 9.0 + 0.4 * np.sin(xx / 14.0)))
    return base[None, None, :] + shade[..., None]


def shape_mask(
    shape: str, cy: float, cx: float, r: float, aspect: float, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Boolean mask of a thing shape centred at (cy, cx) with radius r on the grid (yy, xx)."""
    dy, dx = yy - cy, (xx - cx) / aspect
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "box":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= r * 0.8) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    if shape == "cross":
        arm = max(r / 3.0, 0.8)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


class Canvas:
    """An image and its segment-id map being painted; later paint occludes earlier paint."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.ids = np.zeros((height, width), dtype=np.int64)
        self.segments: dict[int, dict[str, Any]] = {}  # id -> category_id, iscrowd

    def new_segment(self, category_id: int, iscrowd: bool = False) -> int:
        while True:
            seg_id = int(self.rng.integers(1, MAX_SEGMENT_ID))
            if seg_id not in self.segments:
                self.segments[seg_id] = {"category_id": category_id, "iscrowd": int(iscrowd)}
                return seg_id

    def paint_stuff(self) -> None:
        """Partition the image into 2-4 wobbly Voronoi cells of 2-3 stuff classes."""
        h, w = self.ids.shape
        classes = self.rng.choice(STUFF_IDS, size=int(self.rng.integers(2, 4)), replace=False)
        num_cells = int(self.rng.integers(len(classes), 5))
        cell_class = np.concatenate([classes, self.rng.choice(classes, num_cells - len(classes))])
        seeds = self.rng.uniform((0, 0), (h, w), size=(num_cells, 2))
        phase = self.rng.uniform(0, 2 * np.pi, size=num_cells)
        dist = np.stack(
            [
                np.hypot(self.yy - sy, self.xx - sx)
                + 0.06 * min(h, w) * np.sin(self.xx / 17.0 + p) * np.cos(self.yy / 23.0 - p)
                for (sy, sx), p in zip(seeds, phase, strict=True)
            ]
        )
        cell = dist.argmin(axis=0)
        for category_id in classes:
            region = np.isin(cell, np.flatnonzero(cell_class == category_id))
            seg_id = self.new_segment(int(category_id))
            self.ids[region] = seg_id
            texture = stuff_texture(int(category_id), self.yy, self.xx)
            self.image[region] = texture[region]

    def paint_thing(
        self, category_id: int, cy: float, cx: float, r: float, aspect: float, seg_id: int
    ) -> np.ndarray:
        """Paint one shape with a dark outline (so touching instances stay separable)."""
        h, w = self.ids.shape
        pad = int(np.ceil(r * max(aspect, 1.0))) + 2
        y0, y1 = max(int(cy) - pad, 0), min(int(cy) + pad + 1, h)
        x0, x1 = max(int(cx) - pad, 0), min(int(cx) + pad + 1, w)
        full = np.zeros((h, w), dtype=bool)
        if y0 >= y1 or x0 >= x1:
            return full
        window = (slice(y0, y1), slice(x0, x1))
        mask = shape_mask(SHAPES[category_id], cy, cx, r, aspect, self.yy[window], self.xx[window])
        if not mask.any():
            return full
        colour = COLORS[category_id] + self.rng.uniform(-18, 18, size=3).astype(np.float32)
        pixels = np.broadcast_to(colour, mask.shape + (3,)).copy()
        if r >= 4:
            rim = mask & ~ndimage.binary_erosion(mask, iterations=1 + int(r >= 14))
            pixels[rim] *= 0.45
        self.image[window][mask] = pixels[mask]
        self.ids[window][mask] = seg_id
        full[window] = mask
        return full


def draw_radius(rng: np.random.Generator, side: int) -> float:
    """Thing radius: mostly medium/large, 15% tiny (2-5 px), like COCO's long tail.

    The medium/large range (7-25% of the side) keeps most things several stride-4 pixels wide
    even after the resize to a small crop (129) and a 0.5 random scale.
    """
    if rng.random() < 0.15:
        return float(rng.uniform(2.0, 5.0))
    return float(np.exp(rng.uniform(np.log(0.07 * side), np.log(0.25 * side))))


def render_image(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, Canvas]:
    """Draw one image. Returns (H x W x 3 uint8 image, the canvas holding ids and segments)."""
    canvas = Canvas(height, width, rng)
    side = min(height, width)
    canvas.paint_stuff()

    if rng.random() < 0.3:  # a crowd: a cluster of small shapes, one iscrowd=1 segment
        category_id = int(rng.choice(THING_IDS))
        seg_id = canvas.new_segment(category_id, iscrowd=True)
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        for _ in range(int(rng.integers(5, 11))):
            oy, ox = rng.normal(0, 0.06 * side, size=2)
            r = rng.uniform(0.02, 0.04) * side
            canvas.paint_thing(category_id, cy + oy, cx + ox, r, 1.0, seg_id)

    void_rims = []
    for _ in range(int(rng.integers(2, 8))):
        category_id = int(rng.choice(THING_IDS))
        r = draw_radius(rng, side)
        aspect = float(rng.uniform(0.75, 1.35)) if SHAPES[category_id] == "box" else 1.0
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        mask = canvas.paint_thing(category_id, cy, cx, r, aspect, canvas.new_segment(category_id))
        if rng.random() < 0.4 and r > 6:  # a touching / occluding neighbour of the same class
            angle = rng.uniform(0, 2 * np.pi)
            step = (2.0 if SHAPES[category_id] in ("box", "cross") else 1.7) * r * 0.85
            ny, nx = cy + step * np.sin(angle), cx + step * np.cos(angle) * aspect
            seg_id = canvas.new_segment(category_id)
            canvas.paint_thing(category_id, ny, nx, r, aspect, seg_id)
        if rng.random() < 0.2 and mask.any():
            void_rims.append(mask)

    if rng.random() < 0.5:  # unlabelled clutter: a grey noisy blob, void in the label
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.12) * side
        angle = np.arctan2(canvas.yy - cy, canvas.xx - cx)
        wobble = 1.0 + 0.3 * np.sin(5 * angle + rng.uniform(0, 2 * np.pi))
        blob = np.hypot(canvas.yy - cy, canvas.xx - cx) <= r * wobble
        grey = 128.0 + 35.0 * rng.standard_normal(int(blob.sum()), dtype=np.float32)
        canvas.image[blob] = grey[:, None]
        canvas.ids[blob] = 0
    for mask in void_rims:  # a thin unlabelled rim, like COCO's boundary void
        canvas.ids[ndimage.binary_dilation(mask, iterations=2) & ~mask] = 0

    noisy = canvas.image + 5.0 * rng.standard_normal(canvas.image.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), canvas


def segments_info(ids: np.ndarray, segments: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO `segments_info` for the segments visible in `ids` (area, bbox [x, y, w, h])."""
    present, areas = np.unique(ids, return_counts=True)
    info = []
    for seg_id, area in zip(present.tolist(), areas.tolist(), strict=True):
        if seg_id == 0:
            continue
        ys, xs = np.nonzero(ids == seg_id)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        entry = segments[seg_id]
        info.append(
            {
                "id": int(seg_id),
                "category_id": entry["category_id"],
                "area": int(area),
                "bbox": bbox,
                "iscrowd": entry["iscrowd"],
            }
        )
    return info


def write_split(
    out: Path,
    split: str,
    count: int,
    height: int,
    width: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write `count` images of one split under `out` (images, PNGs and the JSON)."""
    image_dir = out / split
    label_dir = out / "annotations" / f"panoptic_{split}"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    split_code = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
        image, canvas = render_image(height, width, rng)
        image_id = (split_code + 1) * 1_000_000 + index
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        write_panoptic_png(label_dir / f"{stem}.png", canvas.ids)
        images.append(
            {"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width}
        )
        annotations.append(
            {
                "image_id": image_id,
                "file_name": f"{stem}.png",
                "segments_info": segments_info(canvas.ids, canvas.segments),
            }
        )
        if progress is not None:
            progress(1)
    document = {
        "info": {"description": "maxdeeplab synthetic panoptic dataset", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    with open(out / "annotations" / f"panoptic_{split}.json", "w") as f:
        json.dump(document, f)


def generate_synthetic(
    out: str | Path,
    *,
    num_train: int,
    num_val: int,
    height: int,
    width: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the synthetic dataset (splits `train2017` and `val2017`) under `out`.

    Returns:
        `out` as a Path.
    """
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images must be at least 16 x 16, got {height} x {width}")
    out = Path(out)
    for split, count in zip(SPLITS, (num_train, num_val), strict=True):
        write_split(out, split, count, height, width, seed, progress)
    return out


def synthetic_cache_name(num_train: int, num_val: int, height: int, width: int, seed: int) -> str:
    """Folder name for a cached synthetic set: `synthetic-<hash of its settings>`."""
    key = json.dumps([GENERATOR_VERSION, num_train, num_val, height, width, seed])
    return "synthetic-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def ensure_synthetic(
    cache_dir: str | Path, *, num_train: int, num_val: int, height: int, width: int, seed: int
) -> Path:
    """Generate the synthetic set once into `cache_dir/synthetic-<hash>` and return that root.

    Safe when several processes (Ray workers) call it at once: each writes a private temporary
    folder and renames it into place; the first rename wins and the others discard theirs.
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / synthetic_cache_name(num_train, num_val, height, width, seed)
    if (root / "annotations").is_dir():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=cache_dir))
    try:
        generate_synthetic(
            tmp, num_train=num_train, num_val=num_val, height=height, width=width, seed=seed
        )
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "annotations").is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
