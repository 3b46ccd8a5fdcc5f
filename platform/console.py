"""A sweep's terminal: our own lines on it, everything else in the sweep's log file.

A sweep's driver would otherwise show Ray Tune's status tables and result boxes, its TensorBoard
hint, raylet warnings, Ray's copy of every worker's output and MLflow's database messages, and two
trials' progress lines could not be told apart. While `own_lines_only` is active, whatever writes
to `sys.stdout` or `sys.stderr` (Tune's reporter, Ray's log and error threads, Ray's and MLflow's
loggers, which all look the streams up when they write) goes to a log file instead. The terminal
keeps the lines the training loop marks (`progress.CONSOLE_MARKER`), which a sweep's trials prefix
with their trial's name, and the driver's own log messages (the `maxdeeplab` loggers' handler keeps
the stream it was made with).

The marked lines reach the driver through Ray's (private) log-forwarding hook, as in
`launch.show_only_progress_lines`; without it nothing is redirected.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HANDLER = "maxdeeplab_own_lines"  # our handler's name in Ray's log dispatcher


@contextlib.contextmanager
def own_lines_only(log_path: Path) -> Iterator[None]:
    """Send stdout and stderr to `log_path` (appended), show the loop's marked lines meanwhile."""
    from maxdeeplab.platform.training.progress import marked_text

    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        yield
        return
    terminal = sys.stdout
    lock = threading.Lock()  # Ray's log thread and error thread both write

    def show_marked(data: dict[str, Any]) -> None:
        for line in data.get("lines", []):
            text = marked_text(line)
            if text is not None:
                with lock:
                    terminal.write(text + "\n")
                    terminal.flush()

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1, encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        dispatcher.add_handler(HANDLER, show_marked)
        try:
            yield
        finally:
            dispatcher.remove_handler(HANDLER)
            sys.stdout, sys.stderr = saved
