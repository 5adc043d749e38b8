"""The directory netd keeps its pidfile and control socket in, and the trust it needs.

Whoever can write that directory can plant a symbolic link or a file of their own
where netd writes its pid or listens for `stop`, or swap netd's files for theirs. So
netd makes the directory itself, or uses an existing one only when netd's own user
(or root) owns it and no one else may write it (a sticky directory such as /tmp
passes: there nobody can remove or rename another user's file, and netd checks its
own files one by one).
"""

from __future__ import annotations

import os
import pwd
import stat


class UnsafePath(PermissionError):
    """A path netd will not use for its own files; the message names it and says why."""


def trusted_owner(uid: int) -> bool:
    """True for root and for the user netd runs as."""
    return uid in (0, os.geteuid())


def user_name(uid: int) -> str:
    """`uid N (name)`, as messages show an owner."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def own_dir(path: str) -> None:
    """Make the directory `path` (and missing parents) if it is not there; raise
    UnsafePath when it is there but another user could control what is in it."""
    path = path or "."
    try:
        os.makedirs(path, mode=0o755)
    except FileExistsError:
        pass
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and not trusted_owner(link.st_uid):
        raise UnsafePath(f"{path} is a symbolic link made by {user_name(link.st_uid)}; "
                         "not following it (remove it, or give daemon.pidfile and "
                         "daemon.control a directory of netd's own)")
    try:
        info = os.stat(path)
    except OSError as e:
        raise UnsafePath(f"{path}: {e.strerror}; netd cannot keep its files there") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{path} is not a directory; netd cannot keep its files there")
    if not trusted_owner(info.st_uid):
        raise UnsafePath(f"{path} is owned by {user_name(info.st_uid)}, neither root nor the "
                         f"user netd runs as ({user_name(os.geteuid())}); not using it for "
                         "netd's pidfile and control socket: remove it, or set "
                         "daemon.pidfile and daemon.control elsewhere")
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise UnsafePath(f"{path} may be written by other users (mode {mode:04o}); not "
                         f"using it for netd's pidfile and control socket: chmod go-w {path}")
