"""One driver per run or sweep: a lock file in its directory (docs/architecture.md#faults).

A second `train --resume RUN` (or `sweep`) while a driver still works on the same directory would
resume from checkpoints the live run is rotating away and then mark the live run FAILED. The lock
names its holder (host, pid, start time) and the holder refreshes a heartbeat in it. A lock is
taken over when its holder is gone: on the same host, when no process with its pid runs; on another
host (a lock on shared or object storage), when the heartbeat is older than `STALE_AFTER_S`. So a
resume after a crash works, at once on one machine and after `STALE_AFTER_S` across machines.

On local disk the lock is created with O_EXCL, which also makes the "already exists" check of a new
run atomic; on object storage, which has no exclusive create, the holder reads its lock back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.storage import Location

LOCK_FILE = "driver.lock"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 90.0  # > several missed heartbeats: a holder on another host is gone


class LockHeld(ConfigError):
    """Another live driver holds the run or sweep."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # the holder's time of taking the lock (epoch seconds)
    heartbeat: float  # its last refresh (epoch seconds)
    command: str

    def is_alive(self, now: float) -> bool:
        if self.host == socket.gethostname():
            return _process_exists(self.pid)
        return now - self.heartbeat < STALE_AFTER_S


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie (exited, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class DriverLock:
    """Hold `<directory>/driver.lock` while this process drives the run or sweep in `directory`.

    Use as a context manager, or `acquire()` / `release()`.
    """

    def __init__(self, directory: Location, what: str, command: str = "") -> None:
        self.path = directory / LOCK_FILE
        self.what = what
        self.command = command
        self._holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or take it over from a holder that is gone.

        Raises:
            LockHeld: a live driver holds it (its host, pid and start time in the message).
        """
        now = time.time()
        mine = Holder(socket.gethostname(), os.getpid(), now, now, self.command)
        if not self._create(mine):
            current = self.read()
            if current is not None and current.is_alive(now) and current.pid != os.getpid():
                since = time.strftime("%H:%M:%S", time.localtime(current.started))
                raise LockHeld(
                    f"{self.what} is in use by another driver (pid {current.pid} on "
                    f"{current.host}, since {since}"
                    f"{': ' + current.command if current.command else ''}); wait for it to end "
                    f"or stop it, then retry (lock: {self.path})"
                )
            self._write(mine)  # the holder is gone: take over
        if self.read() != mine:  # object storage: someone else wrote after us
            raise LockHeld(f"{self.what} was locked by another driver just now ({self.path})")
        self._holder = mine
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="driver-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._holder is not None and self._same_holder(self.read()):
            self.path.remove_file()
        self._holder = None

    def read(self) -> Holder | None:
        """The current holder (None: no lock, or an unreadable one, which counts as none)."""
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _same_holder(self, other: Holder | None) -> bool:
        mine = self._holder
        return (
            other is not None
            and mine is not None
            and (other.host, other.pid, other.started)
            == (
                mine.host,
                mine.pid,
                mine.started,
            )
        )

    def _create(self, holder: Holder) -> bool:
        """Write the lock only if there is none; False if one exists (atomic on local disk)."""
        if not self.path.is_local:
            if self.path.exists():
                return False
            self._write(holder)
            return True
        target = self.path.local_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(holder)))
        return True

    def _write(self, holder: Holder) -> None:
        self.path.write_text(json.dumps(asdict(holder)))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._holder
            if holder is None or not self._same_holder(self.read()):
                return  # taken over (we were presumed gone): never write over the new holder
            self._holder = Holder(**{**asdict(holder), "heartbeat": time.time()})
            try:
                self._write(self._holder)
            except Exception:  # a storage hiccup: the next beat tries again
                continue

    def __enter__(self) -> DriverLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
