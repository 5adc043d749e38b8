"""The pidfile: holds the daemon's pid, locked (flock) for as long as it runs."""

from __future__ import annotations

import errno
import fcntl
import os


class AlreadyRunning(Exception):
    """Another live netd holds the pidfile."""


class Pidfile:
    """A pidfile locked (flock) for as long as the daemon runs; a stale one is taken over."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def holder(self) -> int | None:
        """The pid of a live netd holding this pidfile, if any."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        finally:
            os.close(fd)
        return None

    def acquire(self) -> int | None:
        """Lock and write our pid; returns the pid of a stale previous owner, if any."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise AlreadyRunning(f"netd is already running (pid {pid}, pidfile "
                                     f"{self.path})") from None
            raise
        stale = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return stale

    def release(self) -> None:
        """Remove the pidfile and drop the lock."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
