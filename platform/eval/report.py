"""PQ results for people and for tools: panopticapi's printed table and its JSON result structure.

The JSON is what `panopticapi.evaluation.pq_compute` returns (`All`/`Things`/`Stuff` with `pq`,
`sq`, `rq` as fractions and `n`; `per_class` keyed by category id), plus a `meta` block (engine,
mode, image counts) that readers of the panopticapi structure ignore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maxdeeplab.platform.eval.pq import PQResult

GROUPS = ("All", "Things", "Stuff")


def format_table(result: PQResult) -> str:
    """The All / Things / Stuff table (PQ, SQ, RQ in percent; N categories), panopticapi's way."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name in GROUPS:
        g = result.groups[name]
        lines.append(
            f"{name:10s}| {100 * g['pq']:5.1f}  {100 * g['sq']:5.1f}  {100 * g['rq']:5.1f} "
            f"{g['n']:5d}"
        )
    return "\n".join(lines)


def format_per_class(result: PQResult, names: dict[int, str] | None = None) -> str:
    """One line per category: id, name, PQ/SQ/RQ in percent and the TP/FP/FN counts behind them."""
    names = names or {}
    header = (
        f"{'id':>5s} {'category':20s} {'PQ':>5s} {'SQ':>5s} {'RQ':>5s} "
        f"{'TP':>6s} {'FP':>6s} {'FN':>6s}"
    )
    lines = [header, "-" * len(header)]
    for cat, v in result.per_class.items():
        if v["tp"] + v["fp"] + v["fn"] == 0:
            continue  # not in the means, as in panopticapi
        lines.append(
            f"{cat:5d} {names.get(cat, '')[:20]:20s} {100 * v['pq']:5.1f} {100 * v['sq']:5.1f} "
            f"{100 * v['rq']:5.1f} {v['tp']:6d} {v['fp']:6d} {v['fn']:6d}"
        )
    return "\n".join(lines)


def results_json(result: PQResult, *, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """panopticapi's result dict (JSON-ready: per_class keys become strings when dumped)."""
    out = result.to_panopticapi()
    if meta:
        out["meta"] = meta
    return out


def write_results(
    path: str | Path, result: PQResult, *, meta: dict[str, Any] | None = None
) -> None:
    """Write `results_json` to `path` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results_json(result, meta=meta), f, indent=2)
