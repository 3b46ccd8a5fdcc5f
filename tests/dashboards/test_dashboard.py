"""`maxdeeplab dashboard` in a real headless Chromium: the experiment and its `val/pq` column show.

The store is made with the project's tracking module (the same calls a training run makes). The
dashboard runs as the user runs it (the CLI in its own process), stopped with SIGINT as Ctrl-C
would; the screenshot is kept under `test-artifacts/` (gitignored).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from maxdeeplab.dashboards.mlflow_ui import free_port, port_is_free
from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, TrackingConfig

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXPERIMENT = "zoo-dashboard-check"
RUN_NAME = "dashboard-trial"
PQ_VALUE = 0.4321
STARTUP_S = 150  # the UI answered in ~25 s on 2 busy cores


def _make_store(work_dir: Path) -> tuple[str, str]:
    cfg = ExperimentConfig(work_dir=str(work_dir), tracking=TrackingConfig(experiment=EXPERIMENT))
    run_id = tracking.create_run(cfg, RUN_NAME)
    logger = tracking.RunLogger(tracking.tracking_uri(cfg), run_id, system_metrics=False)
    logger.log_metrics({tracking.VAL_PQ: 0.25, tracking.VAL_PQ_THING: 0.2}, step=10)
    logger.log_metrics({tracking.VAL_PQ: PQ_VALUE, tracking.VAL_PQ_THING: 0.5}, step=20)
    logger.close()
    tracking.finish_run(cfg, run_id)
    return tracking.experiment_id(cfg), run_id


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


def _wait_for_line(lines: queue.Queue, prefix: str, seen: list[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(
        f"no line starting {prefix!r} within {timeout_s} s; output:\n{''.join(seen)}"
    )


def test_dashboard_shows_experiment_and_val_pq_in_chromium(tracking_work_dir, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"headless Chromium is not installed ({CHROMIUM}); apt-get install chromium")
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed"
    )

    work_dir = tracking_work_dir
    experiment_id, run_id = _make_store(work_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "maxdeeplab.cli", "dashboard"]
    command += ["--port", str(port), "--work-dir", str(work_dir)]
    cli = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # SIGINT below then reaches the CLI only, as Ctrl-C in its terminal would.
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(cli.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        ready = _wait_for_line(lines, "MLflow UI: ", seen, STARTUP_S)
        url = f"http://127.0.0.1:{port}"
        assert url in ready
        runs_line = _wait_for_line(lines, f"  runs of {EXPERIMENT}: ", seen, 30)
        runs_url = runs_line.split(": ", 1)[1].strip()
        assert runs_url == f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"

        # The data is served before we look for it in the page.
        experiments = _post(f"{url}/api/2.0/mlflow/experiments/search", {"max_results": 100})
        assert EXPERIMENT in [e["name"] for e in experiments["experiments"]]
        runs = _post(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        (run,) = runs["runs"]
        assert run["info"]["run_id"] == run_id
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics[tracking.VAL_PQ] == pytest.approx(PQ_VALUE)

        screenshot = _check_in_browser(playwright_api, url, runs_url)
        print(f"dashboard screenshot: {screenshot}")
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGINT)
        try:
            code = cli.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cli.pid, signal.SIGKILL)
            raise
    assert code == 0, "".join(seen)
    # Ctrl-C stopped the UI's whole process group: its port is free again.
    deadline = time.monotonic() + 15
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert port_is_free(port)


def _check_in_browser(playwright_api, url: str, runs_url: str) -> Path:
    out_dir = ROOT / "test-artifacts"
    out_dir.mkdir(exist_ok=True)
    screenshot = out_dir / "dashboard.png"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"{url}/#/experiments?workflowType=machine_learning")
            page.get_by_role("link", name=EXPERIMENT).first.wait_for(timeout=90_000)

            page.goto(runs_url)
            page.get_by_text(RUN_NAME, exact=True).first.wait_for(timeout=60_000)
            # MLflow 3 shows no metric column until one is picked from "Columns".
            page.get_by_role("button", name="Columns").click()
            page.get_by_text(tracking.VAL_PQ, exact=True).first.click()
            page.keyboard.press("Escape")
            close_assistant = page.get_by_role("button", name="Close")
            if close_assistant.count():
                close_assistant.first.click()  # the side panel would hide the metric column
            header = page.locator(".ag-header-cell", has_text=tracking.VAL_PQ).first
            header.wait_for(timeout=30_000)
            header.scroll_into_view_if_needed()
            assert header.inner_text().strip() == tracking.VAL_PQ
            cell = page.locator(".ag-cell", has_text=str(PQ_VALUE)).first
            cell.wait_for(timeout=30_000)
            assert cell.is_visible()
            page.screenshot(path=str(screenshot))
        except Exception:
            if "page" in locals():
                page.screenshot(path=str(out_dir / "dashboard-failure.png"))
            raise
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000  # a real, non-empty PNG
    return screenshot
