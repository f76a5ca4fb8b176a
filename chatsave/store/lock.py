"""The process lock that keeps two mutating chatsave runs off one store.

An advisory ``flock`` on ``<store>.lock``: the kernel drops it when its process dies, so
a crashed run never blocks the next one. The file also names its holder (pid, host,
command, start time), so a run that must wait or give up can say who holds the store,
and a run that finds a holder's name left behind by a dead process reports that it
took over a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chatsave.errors import LockedError, StoreError


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    command: str
    since: str

    def describe(self) -> str:
        return f"chatsave {self.command} (pid {self.pid} on {self.host}, since {self.since})"


def _read_holder(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        data: Any = json.loads(raw)
        return Holder(int(data["pid"]), str(data["host"]), str(data["command"]),
                      str(data["since"]))
    except (ValueError, KeyError, TypeError):
        return None


class StoreLock:
    """``acquire(command, wait)`` ... ``release()``: exclusive for mutating commands."""

    def __init__(self, store_path: Path) -> None:
        self.path = Path(str(store_path) + ".lock")
        self._fd: int | None = None
        self.stale: Holder | None = None

    def acquire(self, command: str, wait: float = 0.0) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        deadline = time.monotonic() + max(0.0, wait)
        delay = 0.05
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    who = holder.describe() if holder else "another chatsave process"
                    raise LockedError(
                        f"the store is locked by {who}",
                        hint="rerun later, or wait for it with --lock-wait SECONDS",
                        details={"holder": holder.__dict__ if holder else None},
                    ) from None
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
        # We hold it. A holder still named in the file never released it: it died.
        self.stale = _read_holder(fd)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
