"""`maxdeeplab bench pq`: our PQ evaluators against panopticapi and hotcoco, timed in the same run.

Generates a COCO-panoptic set (GT + noisy predictions, `synthetic_pairs.py`) in a temporary
folder, then times, at each worker/thread count: our file evaluator (numpy engine, and auto =
hotcoco backend), the official panopticapi (`panopticapi-lite`'s `pq_compute`) and hotcoco's
`PanopticEval`; and, on one core, our in-memory accumulator on already decoded maps. Every file
evaluation runs in a fresh subprocess (hotcoco's thread pool is sized once per process by
RAYON_NUM_THREADS), timed inside it around the evaluation only (JSON reading included, interpreter
start-up not), by wall clock and by CPU seconds (its threads plus reaped worker processes). On a
shared machine the wall-clock rates swing with the load; images per CPU-second compare the methods'
efficiency far more steadily. All results are checked against panopticapi (exit status 1 if any
PQ/SQ/RQ differs by more than 1e-9).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Agreement required with panopticapi on every PQ/SQ/RQ (All/Things/Stuff and per class).
TOLERANCE = 1e-9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=500, help="images in the generated set")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--segments", type=int, default=20, help="GT segments per image (about)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="counts to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write the set here and keep it (default: a temp folder)")


# ---- children: one evaluation each, in a fresh process ----
def _child(method: str, paths: dict[str, str], workers: int) -> dict[str, Any]:
    """Time one evaluation (wall and CPU seconds, this process's threads plus its reaped worker
    processes); imports happen before the clocks start, for every method alike."""
    import contextlib
    import io

    import panopticapi.evaluation  # noqa: F401  (imported before the clock, like the others)
    from hotcoco import panoptic

    from maxdeeplab.platform.eval.files import evaluate_files

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        if method in ("ours-numpy", "ours-auto"):
            evaluation = evaluate_files(
                paths["gt_json"],
                paths["gt_dir"],
                paths["pred_json"],
                paths["pred_dir"],
                workers=workers,
                progress=False,
                engine="numpy" if method == "ours-numpy" else "auto",
            )
            results = evaluation.result.to_panopticapi()
        elif method == "panopticapi":
            results = _official_pq_compute(paths, workers)
        elif method == "hotcoco":
            evaluator = panoptic.PanopticEval(
                paths["gt_json"],
                paths["pred_json"],
                gt_folder=paths["gt_dir"],
                pred_folder=paths["pred_dir"],
            )
            evaluator.evaluate()
            results = evaluator.results()
        else:
            raise ValueError(method)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return {"seconds": seconds, "cpu": max(cpu, 1e-6), "results": _plain(results)}


def _cpu_seconds() -> float:
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _official_pq_compute(paths: dict[str, str], workers: int) -> dict[str, Any]:
    """panopticapi's `pq_compute` with `workers` processes (it always takes every core), or in this
    process for 1; its own per-image function and averaging, so its own numbers."""
    import multiprocessing

    import panopticapi.evaluation as official

    gt_json = json.loads(Path(paths["gt_json"]).read_text())
    pred_json = json.loads(Path(paths["pred_json"]).read_text())
    categories = {c["id"]: c for c in gt_json["categories"]}
    predictions = {a["image_id"]: a for a in pred_json["annotations"]}
    matched = [(a, predictions[a["image_id"]]) for a in gt_json["annotations"]]
    args = (paths["gt_dir"], paths["pred_dir"], categories)
    if workers == 1:
        stat = official.pq_compute_single_core(0, matched, *args)
    else:
        stat = official.PQStat()
        with multiprocessing.Pool(workers) as pool:  # exit terminates and reaps the workers
            parts = [
                pool.apply_async(official.pq_compute_single_core, (k, chunk, *args))
                for k, chunk in enumerate(np.array_split(matched, workers))
            ]
            for part in parts:
                stat += part.get()
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = stat.pq_average(categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def _plain(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        g: {k: float(results[g][k]) for k in ("pq", "sq", "rq")} for g in ("All", "Things", "Stuff")
    }
    out["per_class"] = {
        str(c): {k: float(v[k]) for k in ("pq", "sq", "rq")}
        for c, v in results["per_class"].items()
    }
    return out


def _run_child(method: str, paths: dict[str, str], workers: int) -> dict[str, Any]:
    code = (
        "import json, sys; from maxdeeplab.cli.bench.pq import _child; "
        f"print('@@' + json.dumps(_child({method!r}, {paths!r}, {workers})))"
    )
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{method} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[2:])


def _max_diff(results: dict[str, Any], reference: dict[str, Any]) -> float:
    diff = max(
        abs(results[g][k] - reference[g][k])
        for g in ("All", "Things", "Stuff")
        for k in ("pq", "sq", "rq")
    )
    for cat, ref in reference["per_class"].items():
        got = results["per_class"].get(cat)
        if got is None:
            return float("inf")
        for k in ("pq", "sq", "rq"):
            # hotcoco reports -1.0 where panopticapi reports 0.0 for a category with no segment.
            value = 0.0 if got[k] == -1.0 else got[k]
            diff = max(diff, abs(value - ref[k]))
    return diff


# ---- the in-memory accumulator ----
def _time_accumulator(
    paths: dict[str, str], *, compact_ids: bool
) -> tuple[float, float, dict[str, Any]]:
    from maxdeeplab.platform.eval.accumulator import PQAccumulator
    from maxdeeplab.platform.eval.files import read_id_png

    gt_data = json.loads(Path(paths["gt_json"]).read_text())
    pred_data = json.loads(Path(paths["pred_json"]).read_text())
    accumulator = PQAccumulator(gt_data["categories"])
    seconds = cpu = 0.0
    for gt_ann, pred_ann in zip(gt_data["annotations"], pred_data["annotations"], strict=True):
        image = gt_ann["image_id"]
        gt_map = read_id_png(Path(paths["gt_dir"]) / gt_ann["file_name"], image=image)
        pred_map = read_id_png(Path(paths["pred_dir"]) / pred_ann["file_name"], image=image)
        gt_segs, pred_segs = gt_ann["segments_info"], pred_ann["segments_info"]
        # training-style ids: semantic·256 + instance (docs/deeplab2.md#pixelwise, step 8)
        if compact_ids:
            gt_map, gt_segs = _compact(gt_map, gt_segs)
            pred_map, pred_segs = _compact(pred_map, pred_segs)
        start, cpu_start = time.perf_counter(), time.process_time()  # only update() is timed
        accumulator.update(pred_map, pred_segs, gt_map, gt_segs, image_id=image)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
    return seconds, cpu, _plain(accumulator.compute().to_panopticapi())


def _compact(ids_map: np.ndarray, segments: list[dict]) -> tuple[np.ndarray, list[dict]]:
    lut = {0: 0}
    out = []
    for k, seg in enumerate(segments):
        new_id = seg["category_id"] * 256 + (k % 255) + 1
        lut[seg["id"]] = new_id
        out.append({**seg, "id": new_id})
    keys = np.array(sorted(lut))
    values = np.array([lut[k] for k in keys])
    return values[np.searchsorted(keys, ids_map)], out


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.cli.bench.synthetic_pairs import write_pair_set

    W, H = args.size
    with tempfile.TemporaryDirectory(prefix="bench_pq_") as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        pair_set = write_pair_set(
            root,
            num_images=args.images,
            height=H,
            width=W,
            num_segments=args.segments,
            seed=args.seed,
        )
        print(
            f"generated {args.images} images {W}x{H} (~{args.segments} segments) in "
            f"{time.perf_counter() - start:.1f}s under {root}"
        )
        paths = {
            "gt_json": str(pair_set.gt_json),
            "gt_dir": str(pair_set.gt_dir),
            "pred_json": str(pair_set.pred_json),
            "pred_dir": str(pair_set.pred_dir),
        }
        rows = []
        for workers in args.workers:
            for method in METHODS:
                out = _run_child(method, paths, workers)
                rows.append({"method": method, "workers": workers, **out})
        reference = rows[0]["results"]
        for row in rows:
            row["diff"] = _max_diff(row["results"], reference)
        accumulator = {}
        for compact in (False, True):
            wall, cpu, results = _time_accumulator(paths, compact_ids=compact)
            accumulator[compact] = (wall, cpu, _max_diff(results, reference))
    return _print_report(rows, accumulator, args.images)


METHODS = ("panopticapi", "hotcoco", "ours-numpy", "ours-auto")
LABELS = {
    "panopticapi": "panopticapi-lite",
    "hotcoco": "hotcoco",
    "ours-numpy": "ours, numpy engine",
    "ours-auto": "ours, auto (hotcoco)",
}


def _print_report(rows: list[dict], accumulator: dict[bool, tuple], images: int) -> int:
    """Images/s by wall clock and per CPU-second (the latter is robust to a busy machine)."""
    print(
        f"\n{'method':21s} {'workers':>7s} {'img/s':>7s} {'vs hotcoco':>10s} {'vs official':>11s}"
        f" {'img/CPU-s':>9s} {'vs hotcoco':>10s} {'max |Δ| vs official':>19s}"
    )
    by_key = {(r["method"], r["workers"]): r for r in rows}
    for row in rows:
        hotcoco, official = (
            by_key[("hotcoco", row["workers"])],
            by_key[("panopticapi", row["workers"])],
        )
        rate, cpu_rate = images / row["seconds"], images / row["cpu"]
        vs_hotcoco = hotcoco["seconds"] / row["seconds"]
        vs_official = official["seconds"] / row["seconds"]
        cpu_vs_hotcoco = hotcoco["cpu"] / row["cpu"]
        print(
            f"{LABELS[row['method']]:21s} {row['workers']:7d} {rate:7.1f} {vs_hotcoco:9.2f}x"
            f" {vs_official:10.2f}x {cpu_rate:9.1f} {cpu_vs_hotcoco:9.2f}x {row['diff']:19.1e}"
        )
    worst = max(r["diff"] for r in rows)
    for compact, (wall, cpu, diff) in accumulator.items():
        ids = "semantic*256+inst ids" if compact else "24-bit COCO ids     "
        worst = max(worst, diff)
        print(
            f"in-memory accumulator (1 core, {ids}): {wall / images * 1e3:.3f} ms/image wall,"
            f" {max(cpu, 1e-6) / images * 1e3:.3f} ms/image CPU, max |Δ| {diff:.1e}"
        )
    agree = worst <= TOLERANCE
    print(f"all agree with panopticapi within {TOLERANCE:g}: {'yes' if agree else 'NO'}")
    return 0 if agree else 1
