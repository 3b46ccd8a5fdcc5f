"""The model-zoo table (`zoo_table.ZooTable`) as Markdown, CSV or a standalone HTML page.

Markdown is read in terminals and pasted into READMEs, so by default every table line fits
`MARKDOWN_WIDTH` columns: the published PQ_th / PQ_st / PQ**, our PQ** and GPU-hours are left to
`wide`, steps are abbreviated (100k), and run and experiment names are shortened (…) where a line
would overflow. Run names link to their MLflow page through reference links listed at the end (a
URL is one word: that line may be longer). `wide` shows every column, unshortened. CSV and HTML
always hold everything; the CSV's `section` column tells the model-zoo rows from the other runs.
PQ is in percent everywhere, as in the published table.
"""

from __future__ import annotations

import csv
import html
import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from maxdeeplab.dashboards.zoo_table import RunSummary, TableRow, ZooTable
from maxdeeplab.platform.errors import ConfigError

FORMATS = ("md", "csv", "html")
MARKDOWN_WIDTH = 120
MIN_LABEL = 8  # characters a shortened name keeps, "…" included

LEGEND = (
    "PQ, PQ_th, PQ_st: official panopticapi script, in percent; PQ**: deeplab2's own pipeline "
    "(crowd as void). pub.: deeplab2's published COCO val numbers. Δ = ours − published. Ours: "
    "the run of the config with the best val/pq; numbers of runs still running are provisional."
)
COMPACT_LEGEND = (
    " `maxdeeplab table --wide` adds the published PQ_th, PQ_st and PQ**, our PQ** and GPU-hours."
)
OTHER_TITLE = "Other runs: no model-zoo config (best val/pq of each experiment)"
LINKS_LEGEND = (
    "Run names link to their MLflow page (for a local store, served by `maxdeeplab dashboard`)."
)

ZOO_HEADERS = [
    "config",
    "pub. PQ",
    "pub. PQ_th",
    "pub. PQ_st",
    "pub. PQ**",
    "our PQ",
    "our PQ_th",
    "our PQ_st",
    "our PQ**",
    "ΔPQ",
    "ΔPQ**",
    "steps",
    "GPU-h",
    "our run",
]
# The headers whose cells are CSV fields as they are.
ZOO_CELL_FIELDS = {
    "config": "config",
    "pub. PQ": "published_pq",
    "pub. PQ_th": "published_pq_thing",
    "pub. PQ_st": "published_pq_stuff",
    "pub. PQ**": "published_pq_pipeline",
    "our PQ": "pq",
    "our PQ_th": "pq_thing",
    "our PQ_st": "pq_stuff",
    "our PQ**": "pq_pipeline",
    "ΔPQ": "delta_pq",
    "ΔPQ**": "delta_pq_pipeline",
}
ZOO_COMPACT = ["config", "pub. PQ", "our PQ", "ΔPQ", "our PQ_th", "our PQ_st", "steps", "our run"]
OTHER_HEADERS = [
    "experiment",
    "variant",
    "crop",
    "steps",
    "PQ",
    "PQ_th",
    "PQ_st",
    "PQ**",
    "GPU-h",
    "run",
]
OTHER_COMPACT = ["experiment", "variant", "crop", "steps", "PQ", "PQ_th", "PQ_st", "run"]
CSV_FIELDS = [
    "section",
    "config",
    "variant",
    "crop_size",
    "published_pq",
    "published_pq_thing",
    "published_pq_stuff",
    "published_pq_pipeline",
    "pq",
    "pq_thing",
    "pq_stuff",
    "pq_pipeline",
    "delta_pq",
    "delta_pq_pipeline",
    "steps_done",
    "train_steps",
    "gpu_hours",
    "status",
    "in_progress",
    "run_name",
    "run_id",
    "experiment",
    "num_runs",
    "link",
]


# ---------------------------------------------------------------------------------------------
# Cells


def _number(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _count(steps: int, short: bool) -> str:
    """100000 -> `100,000`, or `100k` when short."""
    if not short or steps < 1000:
        return f"{steps:,}"
    return f"{steps // 1000}k" if steps % 1000 == 0 else f"{steps / 1000:.1f}k"


def _steps(run: RunSummary, planned: int | None, short: bool) -> str:
    total = _count(planned, short) if planned is not None else "?"
    return f"{_count(run.steps_done, short)} / {total}"


def _status_note(run: RunSummary) -> str:
    if run.in_progress:
        return "(running)"
    return "" if run.status == "FINISHED" else f"({run.status.lower()})"


def _run_fields(run: RunSummary | None) -> dict[str, str]:
    """The CSV columns that describe our run (empty strings without one)."""
    fields = ("pq", "pq_thing", "pq_stuff", "pq_pipeline")
    record = {field: _number(getattr(run, field) if run else None) for field in fields}
    record["steps_done"] = str(run.steps_done) if run else ""
    record["gpu_hours"] = _number(run.gpu_hours, 1) if run else ""
    record["status"] = run.status if run else ""
    record["in_progress"] = str(run.in_progress) if run else ""
    record["run_name"] = run.run_name if run else ""
    record["run_id"] = run.run_id if run else ""
    record["experiment"] = run.experiment if run else ""
    record["link"] = run.link if run else ""
    return record


def _record(row: TableRow) -> dict[str, str]:
    """A model-zoo row as {csv column: text}."""
    entry = row.entry
    record = dict.fromkeys(CSV_FIELDS, "")
    record.update(_run_fields(row.best))
    record.update(
        section="zoo",
        config=entry.name,
        variant=entry.variant,
        crop_size=str(entry.crop_size),
        published_pq=f"{entry.pq:.1f}",
        published_pq_thing=f"{entry.pq_thing:.1f}",
        published_pq_stuff=f"{entry.pq_stuff:.1f}",
        published_pq_pipeline=f"{entry.pq_pipeline:.2f}",
        delta_pq=_number(row.delta("pq"), signed=True),
        delta_pq_pipeline=_number(row.delta("pq_pipeline"), signed=True),
        train_steps=str(entry.train_steps),
        num_runs=str(row.num_runs),
    )
    return record


def _other_record(run: RunSummary) -> dict[str, str]:
    """Another run as {csv column: text}, with the columns of `_record`."""
    record = dict.fromkeys(CSV_FIELDS, "")
    record.update(_run_fields(run), section="other", variant=run.variant, crop_size=run.crop_size)
    record["train_steps"] = str(run.train_steps) if run.train_steps is not None else ""
    return record


def _zoo_cells(row: TableRow, short: bool) -> dict[str, str]:
    """A model-zoo row's Markdown/HTML cells by header; `our run` holds the bare run name."""
    rec, best = _record(row), row.best
    cells = {header: rec[field] or "–" for header, field in ZOO_CELL_FIELDS.items()}
    cells["steps"] = _steps(best, row.entry.train_steps, short) if best else "–"
    cells["GPU-h"] = rec["gpu_hours"] or "–"
    cells["our run"] = best.run_name if best else "–"
    return cells


def _other_cells(run: RunSummary, short: bool) -> dict[str, str]:
    values = [run.experiment, run.variant, run.crop_size, _steps(run, run.train_steps, short)]
    values += [_number(getattr(run, k)) or "–" for k in ("pq", "pq_thing", "pq_stuff")]
    values += [_number(run.pq_pipeline) or "–", _number(run.gpu_hours, 1), run.run_name]
    return dict(zip(OTHER_HEADERS, values, strict=True))


# ---------------------------------------------------------------------------------------------
# Markdown


@dataclass(frozen=True)
class _Label:
    """A cell that may be shortened to fit the width: a name, linked when `ref` is set."""

    text: str
    ref: int | None = None  # the reference-link number
    note: str = ""

    def render(self, text: str) -> str:
        text = _escape(text).replace("[", "\\[").replace("]", "\\]")
        core = f"[{text}][{self.ref}]" if self.ref is not None else text
        return f"{core} {self.note}" if self.note else core


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _line(cells: Sequence[str | _Label], width: int | None) -> str:
    """A table line; labels lose characters, longest first, until it fits `width`."""
    texts = {i: c.text for i, c in enumerate(cells) if isinstance(c, _Label)}
    lengths = {i: len(text) for i, text in texts.items()}

    def render() -> str:
        parts = []
        for i, cell in enumerate(cells):
            if isinstance(cell, _Label):
                text = texts[i]
                short = text if lengths[i] >= len(text) else text[: lengths[i] - 1] + "…"
                parts.append(cell.render(short))
            else:
                parts.append(_escape(cell))
        return "| " + " | ".join(parts) + " |"

    line = render()
    while width is not None and len(line) > width and lengths:
        longest = max(lengths, key=lambda i: lengths[i])
        if lengths[longest] <= MIN_LABEL:
            break
        lengths[longest] -= 1
        line = render()
    return line


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str | _Label]], width: int | None
) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + [_line(row, width) for row in rows]


def render_markdown(table: ZooTable, *, wide: bool = False) -> str:
    """The Markdown tables; lines fit `MARKDOWN_WIDTH` columns unless `wide`."""
    width = None if wide else MARKDOWN_WIDTH
    links: list[str] = []

    def label(run: RunSummary) -> _Label:
        links.append(run.link)
        return _Label(run.run_name, len(links), _status_note(run))

    headers = ZOO_HEADERS if wide else ZOO_COMPACT
    rows = []
    for row in table.rows:
        cells: dict[str, str | _Label] = dict(_zoo_cells(row, short=not wide))
        if row.best is not None:
            cells["our run"] = label(row.best)
        rows.append([cells[h] for h in headers])
    legend = LEGEND + ("" if wide else COMPACT_LEGEND)
    parts = ["\n".join(_table(headers, rows, width)), _wrap(legend)]
    if table.other_runs:
        headers = OTHER_HEADERS if wide else OTHER_COMPACT
        rows = []
        for run in table.other_runs:
            cells = dict(_other_cells(run, short=not wide))
            cells["experiment"] = _Label(run.experiment)
            cells["run"] = label(run)
            rows.append([cells[h] for h in headers])
        parts += [f"### {OTHER_TITLE}", "\n".join(_table(headers, rows, width))]
    if links:
        parts.append(_wrap(LINKS_LEGEND))
        parts.append("\n".join(f"[{i}]: {link}" for i, link in enumerate(links, start=1)))
    return "\n\n".join(parts) + "\n"


def _wrap(text: str) -> str:
    return textwrap.fill(text, MARKDOWN_WIDTH, break_on_hyphens=False)


# ---------------------------------------------------------------------------------------------
# CSV and HTML


def render_csv(table: ZooTable) -> str:
    """One record per model-zoo row (`section` zoo), then one per other run (`section` other)."""
    buffer = io.StringIO()
    records = [_record(row) for row in table.rows] + [_other_record(r) for r in table.other_runs]
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def _running(run: RunSummary | None) -> bool:
    return run is not None and run.in_progress


def _html_run(run: RunSummary | None) -> str:
    if run is None:
        return "–"
    note = _status_note(run)
    name = f'<a href="{html.escape(run.link)}">{html.escape(run.run_name)}</a>'
    return f"{name} {html.escape(note)}" if note else name


def _html_table(headers: Sequence[str], rows: Sequence[tuple[list[str], str, bool]]) -> str:
    """`rows`: (escaped cells, the run cell's HTML, in progress)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for cells, run, running in rows:
        marker = ' class="in-progress"' if running else ""
        tds = "".join(f"<td>{c}</td>" for c in [*cells, run])
        body.append(f"<tr{marker}>{tds}</tr>")
    rows_html = "\n".join(body)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows_html}\n</tbody>\n</table>"


def render_html(table: ZooTable) -> str:
    def cells(by_header: dict[str, str], headers: Sequence[str]) -> list[str]:
        return [html.escape(by_header[h]) for h in headers[:-1]]  # the last: the run, linked

    zoo = [
        (cells(_zoo_cells(row, short=False), ZOO_HEADERS), _html_run(row.best), _running(row.best))
        for row in table.rows
    ]
    sections = [_html_table(ZOO_HEADERS, zoo), f"<p>{html.escape(LEGEND)}</p>"]
    if table.other_runs:
        others = [
            (cells(_other_cells(run, short=False), OTHER_HEADERS), _html_run(run), run.in_progress)
            for run in table.other_runs
        ]
        sections += [f"<h3>{html.escape(OTHER_TITLE)}</h3>", _html_table(OTHER_HEADERS, others)]
    style = (
        "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,td:last-child{text-align:left}tr.in-progress{background:#fff6d5}"
    )
    body = "\n".join(sections)
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>MaX-DeepLab model zoo</title>'
        f"<style>{style}</style></head><body>\n<h2>MaX-DeepLab model zoo: published vs ours</h2>\n"
        f"{body}\n</body></html>\n"
    )


def render_table(table: ZooTable, fmt: str = "md", *, wide: bool = False) -> str:
    """The table as Markdown (`wide`: every column, unshortened), CSV or a standalone HTML page.

    Raises:
        ConfigError: an unknown format.
    """
    if fmt == "md":
        return render_markdown(table, wide=wide)
    if fmt == "csv":
        return render_csv(table)
    if fmt == "html":
        return render_html(table)
    raise ConfigError(f"unknown table format {fmt!r}; expected one of {', '.join(FORMATS)}")
