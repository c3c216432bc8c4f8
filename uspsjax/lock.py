"""One run at a time per output: an advisory `fcntl` lock on a small file beside it.

The kernel releases the lock when its process ends, however it ends, so a lock left by a killed
run never blocks the next one; the file itself stays (git-ignored, `.*.lock`) because removing a
lock file another process may be opening would let two runs hold "the" lock at once.
"""

import fcntl
import os
from pathlib import Path

from uspsjax.errors import InputError, WriteError


class Lock:
    """An exclusive lock on `path`, taken at once or refused: InputError naming the process that
    holds it. Release with `release()` (or by exiting the process)."""

    def __init__(self, path: Path, what: str):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WriteError(f"{what}: cannot write its lock {path} ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise InputError(f"{what}: another run (pid {holder}) is writing it now; wait for "
                             f"it to finish or stop it (lock: {path})") from None
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk: the lock holds, but say so before anything runs
            self.release()
            raise WriteError(f"{what}: cannot write its lock {path} ({e.strerror})") from None

    def release(self) -> None:
        """Let the next run in."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
