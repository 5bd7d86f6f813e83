"""One writer per output folder: an exclusive OS lock on DIR/.lock.

`fcntl.flock` is released by the kernel when the holder exits in any way (kill -9
included), so a stale lock never needs cleaning up. The holder writes who it is into the
file, and a second run reads that to name it in its one-line refusal. (flock is local to
one machine: on NFS-like filesystems that do not forward it, two hosts are not kept apart.)
Under torchrun only rank 0 takes the lock; the other ranks write only their own shards.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["FolderBusy", "FolderLock"]

LOCK_NAME = ".lock"


class FolderBusy(ValueError):
    """Another run holds the folder."""


class FolderLock:
    def __init__(self, root: Path):
        self.root, self._fd = Path(root), None

    def acquire(self) -> FolderLock:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"host {h['host']}, pid {h['pid']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not written its name yet"
            raise FolderBusy(f"{self.root} is being written by another mixres embed run ({who}); "
                             "wait for it to finish or use another --out") from None
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
