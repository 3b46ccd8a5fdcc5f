"""One driver per run: a live holder refuses a second driver, a gone one is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from maxdeeplab.platform.run_lock import STALE_AFTER_S, DriverLock, Holder, LockHeld
from maxdeeplab.platform.storage import Location


def plant(directory: Path, pid: int, host: str | None = None, age_s: float = 0.0) -> None:
    """A lock file as another driver would have left it."""
    now = time.time() - age_s
    holder = Holder(host or socket.gethostname(), pid, now, now, "maxdeeplab train x.yaml")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "driver.lock").write_text(json.dumps(asdict(holder)))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_holder_refuses_and_is_named(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant(tmp_path, holder.pid)
        with pytest.raises(
            LockHeld, match=rf"run 'r' is in use by another driver \(pid {holder.pid} "
        ):
            DriverLock(Location.parse(tmp_path), "run 'r'").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_gone_holder_is_taken_over(tmp_path: Path) -> None:
    plant(tmp_path, dead_pid())
    lock = DriverLock(Location.parse(tmp_path), "run 'r'")
    with lock:
        assert lock.read() is not None and lock.read().pid == os.getpid()  # type: ignore[union-attr]
    assert not (tmp_path / "driver.lock").exists()  # released


def test_another_hosts_lock_expires_with_its_heartbeat(tmp_path: Path) -> None:
    plant(tmp_path, 1, host="elsewhere", age_s=STALE_AFTER_S / 3)
    with pytest.raises(LockHeld, match="on elsewhere"):
        DriverLock(Location.parse(tmp_path), "sweep 's'").acquire()
    plant(tmp_path, 1, host="elsewhere", age_s=2 * STALE_AFTER_S)
    with DriverLock(Location.parse(tmp_path), "sweep 's'"):
        pass


def test_creation_is_atomic_between_threads_of_drivers(tmp_path: Path) -> None:
    """Of many simultaneous first acquisitions exactly one wins (O_EXCL on local disk)."""
    results: list[str] = []
    barrier = threading.Barrier(8)
    lock = DriverLock(Location.parse(tmp_path / "run"), "run 'r'")

    def contend() -> None:
        barrier.wait()
        try:
            results.append("won" if lock._create(Holder("h", 1, 0.0, 0.0, "")) else "lost")
        except OSError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]
