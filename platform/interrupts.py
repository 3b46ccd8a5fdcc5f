"""Ctrl-C and SIGTERM for a driver that waits on Ray (docs/architecture.md#faults).

Ray Train's `fit()` replaces the driver's SIGINT handler with its own, which aborts the run and
exits the process (`sys.exit`) before any caller's `except KeyboardInterrupt` can record anything;
Ray Tune's `fit()` catches SIGINT and returns as if the sweep had ended. Both install their handler
only when called from the main thread, so `run_interruptibly` calls them from a second thread and
keeps the signals in the main one: the caller sees `Interrupted` and can mark its MLflow runs KILLED
and say how to resume before Ray is shut down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from maxdeeplab.platform.errors import MaXDeepLabError

T = TypeVar("T")
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells do


class Interrupted(MaXDeepLabError):
    """The driver received SIGINT (Ctrl-C) or SIGTERM; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _raise_interrupted(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    raise Interrupted(f"interrupted ({name})", EXIT_CODES.get(signal.Signals(signum), 128 + signum))


def run_interruptibly(fn: Callable[[], T]) -> T:
    """`fn()`, run in a helper thread while the main thread turns SIGINT/SIGTERM into `Interrupted`.

    Outside the main thread (e.g. inside a Tune trial) `fn` simply runs: signals are not ours there.

    Raises:
        Interrupted: on SIGINT or SIGTERM (`fn` keeps running in its daemon thread until the caller
            shuts Ray down or the process exits).
        Exception: whatever `fn` raised.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the main thread as is
            outcome["error"] = exc

    previous = {sig: signal.getsignal(sig) for sig in EXIT_CODES}
    for sig in EXIT_CODES:
        signal.signal(sig, _raise_interrupted)
    worker = threading.Thread(target=target, name="ray-driver", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.2)  # wakes up for signal handlers
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
