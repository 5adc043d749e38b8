"""The pidfile: holds the daemon's pid, locked (flock) for as long as it runs.

It lives in a directory netd controls (netd.rundir) and is opened without following a
symbolic link, so nobody can make netd write its pid into another file or remove a
file that is not its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from netd.rundir import UnsafePath, own_dir, trusted_owner, user_name


class AlreadyRunning(Exception):
    """Another live netd holds the pidfile."""


class Pidfile:
    """A pidfile locked (flock) for as long as the daemon runs; a stale one is taken over."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def holder(self) -> int | None:
        """The pid of a live netd holding this pidfile (-1 while it has not written it
        yet), or None; raises UnsafePath for a pidfile whose pid cannot be trusted."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"pidfile {self.path} is a symbolic link; not following "
                                 "it") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UnsafePath(f"pidfile {self.path} is not a regular file; not using it")
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pid = _read_pid(fd)
            else:
                return None
        finally:
            os.close(fd)
        if pid is None:
            return -1
        if info.st_uid != 0 and _uid_of(pid) != info.st_uid:
            # Only root's pidfile may name a process of another user: anyone else's
            # could point root's `netd stop` at any process.
            raise UnsafePath(f"pidfile {self.path} belongs to {user_name(info.st_uid)} but "
                             f"names pid {pid}, a process of another user; not trusting it")
        return pid

    def acquire(self) -> int | None:
        """Lock and write our pid; returns the pid of a stale previous owner, if any."""
        own_dir(os.path.dirname(self.path))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"pidfile {self.path} is a symbolic link; not following it "
                                 "(remove it if it is not meant to be there)") from None
            raise
        try:
            _check_file(self.path, os.fstat(fd))
        except UnsafePath:
            os.close(fd)
            raise
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
        os.fchmod(fd, 0o644)  # the pid must be ours alone to write: root's stop signals it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return stale

    def release(self) -> None:
        """Remove the pidfile (only if the path still names our file) and drop the lock."""
        if self.fd is None:
            return
        try:
            ours, there = os.fstat(self.fd), os.lstat(self.path)
            if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _check_file(path: str, info: os.stat_result) -> None:
    """Refuse a pidfile that is not a plain file of netd's user (or root) and only ours:
    a hard link would make netd truncate whatever file it also names."""
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(f"pidfile {path} is not a regular file; not using it")
    if not trusted_owner(info.st_uid):
        raise UnsafePath(f"pidfile {path} is owned by {user_name(info.st_uid)}, neither root "
                         "nor the user netd runs as; not using it")
    if info.st_nlink != 1:
        raise UnsafePath(f"pidfile {path} has {info.st_nlink} hard links; not using it")


def _uid_of(pid: int) -> int | None:
    """The real uid of process `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None
