"""One writer per output folder: an exclusive per-process OS lock on DIR/.lock.

A POSIX record lock (`fcntl.lockf`) belongs to the process that took it: forked children
(DataLoader workers) do not inherit it, and the kernel drops it the moment that process
dies, kill -9 included. (`flock`, used before, belongs to the open file, which forked
workers share: after a kill -9 of the run the lock lived on for the seconds its workers
took to notice, and an immediate rerun, as a requeue loop does, was refused.) The holder
writes who it is into the file, and a second run reads that to name it in its one-line
refusal. A record lock is also dropped when its process closes *any* descriptor of the
file, so the holder never opens the file a second time: it keeps the text it wrote.
Locks are local to one machine on filesystems that do not forward them (some NFS setups).
Under torchrun only rank 0 takes the lock; the other ranks write only their own shards.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["FolderBusy", "FolderLock", "LOCK_NAME"]

LOCK_NAME = ".lock"
_HELD: dict[str, str] = {}  # lock files this process holds -> their text (record locks never
                            # conflict within one process, and opening the file again is unsafe)


class FolderBusy(ValueError):
    """Another run holds the folder."""


def _busy(root: Path, holder: str) -> FolderBusy:
    try:
        h = json.loads(holder)
        who = f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        who = "a process that has not written its name yet"
    return FolderBusy(f"{root} is being written by another mixres embed run ({who}); "
                      "wait for it to finish or use another --out")


class FolderLock:
    def __init__(self, root: Path):
        self.root, self._fd, self.text = Path(root), None, ""

    def acquire(self) -> FolderLock:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        key = os.path.realpath(path)
        if key in _HELD:
            raise _busy(self.root, _HELD[key])
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise _busy(self.root, holder) from None
        self.text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.text.encode(), 0)
        self._fd, self._key = fd, key
        _HELD[key] = self.text
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD.pop(self._key, None)
            os.close(self._fd)  # closing the descriptor releases the record lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
