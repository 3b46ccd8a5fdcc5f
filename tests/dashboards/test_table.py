"""`maxdeeplab table`: the 9 published rows beside our best MLflow run of each config, and the
best run of each experiment that matches no config.

The store is real: runs are created from the model-zoo YAMLs through the project's tracking module
(the calls a training run makes), with metrics logged as training logs them (fractions).
"""

from __future__ import annotations

import csv
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow import MlflowClient

from maxdeeplab.cli.main import main
from maxdeeplab.dashboards.model_zoo import published_rows
from maxdeeplab.dashboards.zoo_table import build_table
from maxdeeplab.dashboards.zoo_table_formats import MARKDOWN_WIDTH, ZOO_HEADERS, render_table
from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import load_experiment

ROOT = Path(__file__).resolve().parents[2]
ZOO_DIR = ROOT / "experiments" / "model_zoo"
EXPERIMENT = "zoo-table-check"
# A study of its own: matches no zoo row, and its names are long.
STUDY = "drop-path-study-at-crop-321-for-the-zoo-table-with-a-long-experiment-name"
LONG_RUN = "max_deeplab_s_drop_path_study_at_crop_321-trial-00003-keep-prob-0.7-linear"
HOUR_MS = 3_600_000


def _run(work_dir: Path, config: str, name: str, metrics: dict[int, dict[str, float]], **kw):
    """A run of a model-zoo config; `metrics` maps step -> {name: value}. Returns (cfg, run id)."""
    overrides = [f"work_dir={work_dir}", f"tracking.experiment={EXPERIMENT}", "data.root=/coco"]
    cfg = load_experiment(ZOO_DIR / f"{config}.yaml", overrides + kw.get("overrides", []))
    run_id = tracking.create_run(cfg, name, parent_run_id=kw.get("parent"))
    logger = tracking.RunLogger(tracking.tracking_uri(cfg), run_id, system_metrics=False)
    for step, values in sorted(metrics.items()):
        logger.log_metrics(values, step=step)
    logger.close()
    if kw.get("hours") is not None:
        client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
        start = client.get_run(run_id).info.start_time
        client.set_terminated(run_id, "FINISHED", end_time=start + int(kw["hours"] * HOUR_MS))
    return cfg, run_id


def _val(pq: float, thing: float, stuff: float, pipeline: float) -> dict[str, float]:
    return {
        tracking.VAL_PQ: pq,
        tracking.VAL_PQ_THING: thing,
        tracking.VAL_PQ_STUFF: stuff,
        tracking.VAL_PQ_PIPELINE: pipeline,
    }


@pytest.fixture(scope="module")
def store(tracking_work_dir):
    return _make_store(tracking_work_dir)


def _make_store(work_dir: Path) -> dict[str, object]:
    s641 = "max_deeplab_s_os16_res641_100k"
    # Two finished runs of the same config: the better one (44.0) is ours.
    cfg, best_id = _run(
        work_dir,
        s641,
        "s641-good",
        {50_000: _val(0.30, 0.3, 0.3, 0.31), 100_000: _val(0.44, 0.48, 0.39, 0.45)},
        hours=2.0,
    )
    _run(work_dir, s641, "s641-worse", {100_000: _val(0.40, 0.41, 0.39, 0.41)}, hours=1.0)
    # A shortened smoke run of the same file is not a run of the config, however high its PQ.
    _, smoke_id = _run(
        work_dir,
        s641,
        "s641-smoke",
        {1000: _val(0.90, 0.9, 0.9, 0.9)},
        overrides=["train.steps=1000"],
        hours=0.1,
    )
    # A sweep's parent run with the config's params trained nothing itself: only its child counts.
    _, parent_id = _run(work_dir, "max_deeplab_s_os16_res1025_200k", "sweep-parent", {})
    _run(
        work_dir,
        "max_deeplab_s_os16_res1025_200k",
        "sweep-trial",
        {200_000: _val(0.41, 0.45, 0.35, 0.42)},
        parent=parent_id,
        hours=1.0,
    )
    # A run still training: evaluated at 20k, loss logged up to 25k.
    _, running_id = _run(
        work_dir,
        "max_deeplab_s_os16_res1025_400k",
        "s1025-running",
        {
            20_000: {**_val(0.30, 0.32, 0.27, 0.305), tracking.LOSS_TOTAL: 5.0},
            25_000: {tracking.LOSS_TOTAL: 4.0, tracking.TRAIN_LR: 1e-3},
        },
    )
    # Two runs of another experiment that match no row: the better one, still running, is shown.
    study = ["data.crop_size=321", f"tracking.experiment={STUDY}"]
    _run(work_dir, s641, "study-worse", {500: _val(0.20, 0.2, 0.2, 0.2)}, overrides=study, hours=1)
    _, study_id = _run(
        work_dir, s641, LONG_RUN, {500: _val(0.41, 0.45, 0.35, 0.42)}, overrides=study
    )
    return {
        "uri": tracking.tracking_uri(cfg),
        "work_dir": work_dir,
        "best": best_id,
        "running": running_id,
        "study": study_id,
        "smoke": smoke_id,
    }


def test_best_run_deltas_progress_and_gpu_hours(store):
    table = build_table(store["uri"], EXPERIMENT)
    assert [row.entry.name for row in table.rows] == [e.name for e in published_rows()]
    rows = {row.entry.name: row for row in table.rows}

    s641 = rows["max_deeplab_s_os16_res641_100k"]
    assert s641.num_runs == 2  # the smoke run does not count
    best = s641.best
    assert best is not None and best.run_id == store["best"] and best.run_name == "s641-good"
    assert (best.pq, best.pq_thing, best.pq_stuff, best.pq_pipeline) == pytest.approx(
        (44.0, 48.0, 39.0, 45.0)
    )
    assert s641.delta("pq") == pytest.approx(44.0 - 45.9)
    assert s641.delta("pq_pipeline") == pytest.approx(45.0 - 46.36)
    assert best.steps_done == 100_000 and not best.in_progress
    # 8 GPU workers (the zoo configs' resources) for 2 hours.
    assert best.gpu_hours == pytest.approx(16.0, abs=1e-3)

    running = rows["max_deeplab_s_os16_res1025_400k"].best
    assert running is not None and running.run_id == store["running"]
    assert running.in_progress and running.steps_done == 25_000
    assert running.pq == pytest.approx(30.0)

    swept = rows["max_deeplab_s_os16_res1025_200k"]
    assert swept.num_runs == 1 and swept.best is not None
    assert swept.best.run_name == "sweep-trial" and swept.best.pq == pytest.approx(41.0)

    with_runs = {s641.entry.name, swept.entry.name, "max_deeplab_s_os16_res1025_400k"}
    others = [row for name, row in rows.items() if name not in with_runs]
    assert len(others) == 6 and all(r.best is None and r.num_runs == 0 for r in others)


def test_runs_of_no_zoo_config_are_the_other_runs_best_per_experiment(store):
    # Filtered: the smoke run (1000 steps) is this experiment's only run that matches no row.
    (smoke,) = build_table(store["uri"], EXPERIMENT).other_runs
    assert (smoke.run_name, smoke.variant, smoke.crop_size) == (
        "s641-smoke",
        "max_deeplab_s",
        "641",
    )
    assert (smoke.train_steps, smoke.steps_done, smoke.pq) == (1000, 1000, pytest.approx(90.0))

    others = {run.experiment: run for run in build_table(store["uri"]).other_runs}
    study = others[STUDY]
    assert study.run_id == store["study"] and study.in_progress and study.crop_size == "321"
    assert (study.pq, study.pq_thing, study.pq_stuff) == pytest.approx((41.0, 45.0, 35.0))
    experiment_id = MlflowClient(tracking_uri=store["uri"]).get_experiment_by_name(STUDY)
    assert study.link == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id.experiment_id}/runs/{store['study']}"
    )
    assert others[EXPERIMENT].run_name == "s641-smoke"


def test_markdown_fits_120_columns_and_shows_ours_and_the_other_runs(store, capsys):
    assert main(["table", "--work-dir", str(store["work_dir"])]) == 0
    out = capsys.readouterr().out
    links = [line for line in out.splitlines() if re.match(r"\[\d+\]: ", line)]
    assert all(len(line) <= MARKDOWN_WIDTH for line in out.splitlines() if line not in links)
    lines = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if "|" in line}
    for entry in published_rows():
        assert lines[entry.name].startswith(f"| {entry.name} | {entry.pq:.1f} | ")
    good = lines["max_deeplab_s_os16_res641_100k"]
    assert "| 44.00 | -1.90 | 48.00 | 39.00 | 100k / 100k | [s641-good][" in good
    running = lines["max_deeplab_s_os16_res1025_400k"]
    assert "| 30.00 | -19.00 |" in running and "| 25k / 400k |" in running  # 30.0 - 49.0
    assert running.endswith("] (running) |")
    empty = lines["max_deeplab_l_os16_res1025_400k"]
    assert empty.count("–") == 6  # 3 PQs, the delta, steps, run

    assert "### Other runs" in out
    smoke = lines[EXPERIMENT]
    assert "| max_deeplab_s | 641 | 1k / 1k | 90.00 | 90.00 | 90.00 | [s641-smoke][" in smoke
    (study,) = [line for name, line in lines.items() if name.startswith(STUDY[:9])]
    assert "…" in study and LONG_RUN not in study and study.endswith("] (running) |")
    # Every run name links to its MLflow page.
    ref = re.search(r"\[s641-smoke\]\[(\d+)\]", smoke).group(1)
    assert any(
        line.startswith(f"[{ref}]: http") and line.endswith(store["smoke"]) for line in links
    )


def test_wide_markdown_shows_every_column_and_whole_names(store, capsys):
    assert main(["table", "--work-dir", str(store["work_dir"]), "--wide"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| " + " | ".join(ZOO_HEADERS) + " |"
    good = next(line for line in out.splitlines() if "s641-good" in line)
    assert "| 44.00 | 48.00 | 39.00 | 45.00 | -1.90 | -1.36 | 100,000 / 100,000 | 16.0 |" in good
    assert f"| {STUDY} |" in out and f"[{LONG_RUN}][" in out


def test_experiment_only_filters_and_csv_holds_both_sections(store, capsys, tmp_path):
    client = MlflowClient(tracking_uri=store["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    before = len(client.search_runs([experiment.experiment_id]))
    out_file = tmp_path / "table.csv"
    argv = ["table", "--work-dir", str(store["work_dir"]), "--experiment", EXPERIMENT]
    assert main([*argv, "--format", "csv", "--out", str(out_file)]) == 0
    printed = capsys.readouterr()
    # Nothing is logged without --log-run: no new run, no artifact.
    assert "logged" not in printed.err
    assert len(client.search_runs([experiment.experiment_id])) == before

    records = list(csv.DictReader(io.StringIO(printed.out)))
    zoo = [r for r in records if r["section"] == "zoo"]
    assert [r["config"] for r in zoo] == [e.name for e in published_rows()]
    good = zoo[0]
    assert (good["published_pq"], good["pq"], good["delta_pq"]) == ("45.9", "44.00", "-1.90")
    assert (good["steps_done"], good["gpu_hours"], good["run_id"]) == (
        "100000",
        "16.0",
        store["best"],
    )
    running = next(r for r in zoo if r["config"] == "max_deeplab_s_os16_res1025_400k")
    assert (running["in_progress"], running["status"]) == ("True", "RUNNING")
    assert zoo[-1]["pq"] == "" and zoo[-1]["published_pq"] == "51.3"
    (other,) = [r for r in records if r["section"] == "other"]
    assert (other["config"], other["run_name"], other["pq"]) == ("", "s641-smoke", "90.00")
    assert (other["variant"], other["crop_size"], other["train_steps"]) == (
        "max_deeplab_s",
        "641",
        "1000",
    )
    assert out_file.read_text() == printed.out

    html_text = render_table(build_table(store["uri"], EXPERIMENT), "html")
    cells = _html_rows(html_text)
    assert len(cells) == 12  # the header and the 9 rows; the other runs' header and row
    assert [row[0] for row in cells[1:10]] == [e.name for e in published_rows()]
    assert cells[1][5] == "44.00" and cells[1][9] == "-1.90"
    assert cells[11][:2] == [EXPERIMENT, "max_deeplab_s"] and cells[11][-1] == "s641-smoke"
    assert 'class="in-progress"><td>max_deeplab_s_os16_res1025_400k' in html_text
    assert f'/runs/{store["best"]}">s641-good</a>' in html_text


def test_logging_into_a_given_run(store, capsys):
    client = MlflowClient(tracking_uri=store["uri"])
    argv = ["table", "--work-dir", str(store["work_dir"]), "--log-run", store["best"]]
    assert main([*argv, "--format", "html"]) == 0
    assert f"MLflow run {store['best']}" in capsys.readouterr().err
    names = [a.path for a in client.list_artifacts(store["best"])]
    assert "model_zoo_table.html" in names


def test_unknown_experiment_is_a_one_line_error(store, capsys):
    argv = ["table", "--work-dir", str(store["work_dir"]), "--experiment", "nope"]
    assert main(argv) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def _html_rows(text: str) -> list[list[str]]:
    class Rows(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[list[str]] = []
            self.cell: list[str] | None = None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = []

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.rows[-1].append("".join(self.cell))
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    parser = Rows()
    parser.feed(text)
    return parser.rows
