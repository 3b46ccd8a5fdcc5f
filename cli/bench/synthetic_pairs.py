"""Seeded generator of panoptic ground truth + noisy predictions, in COCO panoptic format.

Used by the PQ tests (parity with panopticapi) and `maxdeeplab bench pq`. Each image is a scene of
stuff regions (touching half-planes) overlaid by thing ellipses and rectangles (touching and
occluding), some of them crowd, with VOID blobs. The prediction re-renders the scene with jittered
geometry (IoUs spread around 0.5), wrong classes, missing segments, extra segments (some on VOID,
some on crowd of the same category), one segment predicted as exactly half of a GT segment (IoU
exactly 0.5: not a match), and sometimes no prediction at all. Some categories never occur (they
must be excluded from the means). Segment ids are random 24-bit COCO-style ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maxdeeplab.platform.data.panoptic_format import write_panoptic_png

# COCO-like, non-contiguous ids; the last thing and the last stuff category are never generated.
THING_IDS = (1, 2, 3, 5, 7, 9, 18, 44)
STUFF_IDS = (92, 100, 118, 125, 149, 184, 199)
NEVER_USED = (THING_IDS[-1], STUFF_IDS[-1])


def synthetic_categories() -> list[dict[str, Any]]:
    """COCO `categories` for the generated sets."""
    cats = [
        {"id": c, "name": f"thing{c}", "isthing": 1, "supercategory": "thing"} for c in THING_IDS
    ]
    cats += [
        {"id": c, "name": f"stuff{c}", "isthing": 0, "supercategory": "stuff"} for c in STUFF_IDS
    ]
    return cats


@dataclass(frozen=True)
class Shape:
    """A painted region: 'plane' (stuff: a·y + b·x > c), 'ellipse' or 'rect' (things), or 'void'."""

    kind: str
    params: tuple[float, ...]
    category: int
    iscrowd: bool = False


@dataclass(frozen=True)
class PanopticPair:
    """One image: H x W int64 id maps and COCO `segments_info` lists (GT with area and iscrowd)."""

    gt_ids: np.ndarray
    gt_segments: list[dict[str, Any]]
    pred_ids: np.ndarray
    pred_segments: list[dict[str, Any]]


def _paint(canvas: np.ndarray, shape: Shape, seg_id: int) -> None:
    H, W = canvas.shape
    if shape.kind == "plane":
        a, b, c = shape.params
        ys, xs = np.ogrid[:H, :W]
        canvas[a * ys + b * xs > c] = seg_id
        return
    cy, cx, ry, rx = shape.params
    y0, y1 = max(int(cy - ry), 0), min(int(np.ceil(cy + ry)) + 1, H)
    x0, x1 = max(int(cx - rx), 0), min(int(np.ceil(cx + rx)) + 1, W)
    if y0 >= y1 or x0 >= x1:
        return
    if shape.kind == "rect":
        canvas[y0:y1, x0:x1] = seg_id
        return
    ys, xs = np.ogrid[y0:y1, x0:x1]
    inside = ((ys - cy) / max(ry, 0.5)) ** 2 + ((xs - cx) / max(rx, 0.5)) ** 2 <= 1.0
    canvas[y0:y1, x0:x1][inside] = seg_id


def _render(
    shapes: list[Shape], H: int, W: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Paint shapes in order (later ones occlude) with fresh random ids; drop hidden ones."""
    canvas = np.zeros((H, W), np.int32)  # shape index + 1, 0 = void
    for k, shape in enumerate(shapes):
        _paint(canvas, shape, 0 if shape.kind == "void" else k + 1)
    area = np.bincount(canvas.ravel(), minlength=len(shapes) + 1)
    ids = rng.choice(256**3 - 1, size=len(shapes), replace=False) + 1
    segments = [
        {
            "id": int(ids[k]),
            "category_id": s.category,
            "iscrowd": int(s.iscrowd),
            "area": int(area[k + 1]),
        }
        for k, s in enumerate(shapes)
        if s.kind != "void" and area[k + 1] > 0
    ]
    return np.concatenate([[0], ids])[canvas], segments


def _scene(rng: np.random.Generator, H: int, W: int, num_segments: int) -> list[Shape]:
    stuff = rng.choice(STUFF_IDS[:-1], size=3, replace=False)
    shapes = [Shape("rect", (H / 2, W / 2, H, W), int(stuff[0]))]
    for cat in stuff[1:]:
        angle = rng.uniform(0, 2 * np.pi)
        a, b = np.sin(angle), np.cos(angle)
        c = a * rng.uniform(0, H) + b * rng.uniform(0, W)
        shapes.append(Shape("plane", (a, b, c), int(cat)))
    crowd_cats: set[int] = set()
    for _ in range(max(num_segments - len(shapes), 1)):
        cat = int(rng.choice(THING_IDS[:-1]))
        # COCO has at most one crowd region per category and image.
        crowd = bool(rng.random() < 0.1) and cat not in crowd_cats
        if crowd:
            crowd_cats.add(cat)
        ry, rx = rng.uniform(0.03, 0.2) * H, rng.uniform(0.03, 0.2) * W
        kind = "rect" if rng.random() < 0.3 else "ellipse"
        shapes.append(Shape(kind, (rng.uniform(0, H), rng.uniform(0, W), ry, rx), cat, crowd))
    for _ in range(2):  # unlabelled regions
        shapes.append(Shape("void", (rng.uniform(0, H), rng.uniform(0, W), 0.06 * H, 0.08 * W), 0))
    return shapes


def _jitter(shape: Shape, rng: np.random.Generator, H: int, W: int) -> Shape:
    if shape.kind == "plane":
        a, b, c = shape.params
        return Shape("plane", (a, b, c + rng.normal(0, 0.03) * (H + W)), shape.category)
    cy, cx, ry, rx = shape.params
    return Shape(
        shape.kind,
        (
            cy + rng.normal(0, 0.2) * ry,
            cx + rng.normal(0, 0.2) * rx,
            ry * float(np.exp(rng.normal(0, 0.25))),
            rx * float(np.exp(rng.normal(0, 0.25))),
        ),
        shape.category,
    )


def _prediction_shapes(scene: list[Shape], rng: np.random.Generator, H: int, W: int) -> list[Shape]:
    shapes = []
    for shape in scene:
        if shape.kind == "void":
            continue
        roll = rng.random()
        if shape.kind != "plane" and roll < 0.1:
            continue  # missed
        cat = shape.category
        if roll > 0.9:  # wrong class, of the same kind
            cat = int(rng.choice(THING_IDS[:-1] if shape.kind != "plane" else STUFF_IDS[:-1]))
        jittered = _jitter(shape, rng, H, W)
        shapes.append(Shape(jittered.kind, jittered.params, cat))
    for shape in scene:  # extras: on VOID, or on crowd of its own category (both usually exempt)
        if shape.kind == "void" or (shape.iscrowd and rng.random() < 0.7):
            cy, cx, ry, rx = shape.params
            cat = shape.category if shape.iscrowd else int(rng.choice(THING_IDS[:-1]))
            shapes.append(Shape("ellipse", (cy, cx, 0.6 * ry, 0.6 * rx), cat))
    for _ in range(rng.integers(0, 3)):  # plain false positives
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        cat = int(rng.choice(THING_IDS[:-1]))
        shapes.append(Shape("ellipse", (cy, cx, 0.05 * H, 0.05 * W), cat))
    for _ in range(rng.integers(0, 2)):  # unassigned predicted pixels
        shapes.append(Shape("void", (rng.uniform(0, H), rng.uniform(0, W), 0.05 * H, 0.05 * W), 0))
    return shapes


def _split_in_half(pair: PanopticPair, rng: np.random.Generator) -> PanopticPair:
    """Re-predict an even-area GT thing as exactly its first half (IoU 0.5) + a wrong-class half."""
    even = [
        s for s in pair.gt_segments if not s["iscrowd"] and s["area"] % 2 == 0 and s["area"] >= 2
    ]
    if not even:
        return pair
    target = even[int(rng.integers(len(even)))]
    flat = np.flatnonzero(pair.gt_ids.ravel() == target["id"])
    pred = pair.pred_ids.copy()
    used = {s["id"] for s in pair.pred_segments}
    new_ids = [i for i in rng.integers(1, 256**3, size=8) if int(i) not in used][:2]
    half = len(flat) // 2
    other = next(c for c in THING_IDS if c != target["category_id"])
    pred.ravel()[flat[:half]] = new_ids[0]
    pred.ravel()[flat[half:]] = new_ids[1]
    lost = set(np.unique(pair.pred_ids.ravel()[flat]).tolist())  # may be painted over entirely
    segments = []
    for s in pair.pred_segments:
        area = int(np.count_nonzero(pred == s["id"])) if s["id"] in lost else s["area"]
        if area:
            segments.append(dict(s, area=area))
    segments += [
        {"id": int(new_ids[0]), "category_id": target["category_id"], "iscrowd": 0, "area": half},
        {"id": int(new_ids[1]), "category_id": other, "iscrowd": 0, "area": len(flat) - half},
    ]
    return PanopticPair(pair.gt_ids, pair.gt_segments, pred, segments)


def make_pair(
    rng: np.random.Generator,
    *,
    height: int = 480,
    width: int = 640,
    num_segments: int = 20,
    empty_prediction: bool = False,
) -> PanopticPair:
    """One generated (GT, prediction) image pair."""
    scene = _scene(rng, height, width, num_segments)
    gt_ids, gt_segments = _render(scene, height, width, rng)
    if empty_prediction:
        return PanopticPair(gt_ids, gt_segments, np.zeros_like(gt_ids), [])
    pred_ids, pred_segments = _render(
        _prediction_shapes(scene, rng, height, width), height, width, rng
    )
    pair = PanopticPair(gt_ids, gt_segments, pred_ids, pred_segments)
    return _split_in_half(pair, rng) if rng.random() < 0.5 else pair


@dataclass(frozen=True)
class PanopticSet:
    """Paths of a written set, in panopticapi's argument order."""

    gt_json: Path
    pred_json: Path
    gt_dir: Path
    pred_dir: Path


def write_pair_set(
    root: str | Path,
    *,
    num_images: int = 20,
    height: int = 480,
    width: int = 640,
    num_segments: int = 20,
    seed: int = 0,
    empty_prediction_every: int = 10,
) -> PanopticSet:
    """Write `num_images` pairs under `root` in COCO panoptic format (JSON + PNGs for both).

    Every `empty_prediction_every`-th image (from the 4th) has no predicted segment at all.
    """
    root = Path(root)
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, gt_anns, pred_anns = [], [], []
    for k in range(num_images):
        empty = empty_prediction_every > 0 and k % empty_prediction_every == 3
        pair = make_pair(
            rng, height=height, width=width, num_segments=num_segments, empty_prediction=empty
        )
        name = f"{k:012d}.png"
        write_panoptic_png(gt_dir / name, pair.gt_ids)
        write_panoptic_png(pred_dir / name, pair.pred_ids)
        images.append({"id": k, "file_name": f"{k:012d}.jpg", "height": height, "width": width})
        gt_anns.append({"image_id": k, "file_name": name, "segments_info": pair.gt_segments})
        pred_segments = [
            {"id": s["id"], "category_id": s["category_id"]} for s in pair.pred_segments
        ]
        pred_anns.append({"image_id": k, "file_name": name, "segments_info": pred_segments})
    categories = synthetic_categories()
    paths = PanopticSet(root / "gt.json", root / "pred.json", gt_dir, pred_dir)
    for path, anns in ((paths.gt_json, gt_anns), (paths.pred_json, pred_anns)):
        with open(path, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return paths
