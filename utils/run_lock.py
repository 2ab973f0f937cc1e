"""One process per output folder: an advisory file lock held for as long as a script writes there.

Every script that writes a folder (training, extraction, SSK, verification) takes the lock of that folder at start.
The lock is ``flock`` on ``<folder>/.lock``: the kernel releases it when the process ends, however it ends (a kill
never leaves a stale lock), and a second process finds it held at once. The file records the holder's pid and command
line, which the second process names in its error. Under torchrun only the primary rank takes it.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import sys
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The folder is being written by another process."""


class RunLock:
    """The exclusive lock of ``folder`` (created if missing), as a context manager.

    Args:
        folder: the output folder.
        what: what the folder is, for the error (e.g. ``run folder``).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "output folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            RunLockError: another process holds it (its pid and command are named).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip().splitlines()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            command = holder[1] if len(holder) > 1 else "unknown"
            raise RunLockError(
                f"{self.what} {self.folder} is in use by another process (pid {pid}: {command}); wait for it to end, "
                "or write elsewhere"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{shlex.join(sys.argv)}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means nothing)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
