"""Process titles: what `ps` shows for each kind of netd process (setproctitle).

Without them every process reads `python3 .../netd run -c FILE`, the supervisor,
its spawners, the prefork workers and the handler children alike. Exec children are
the programs themselves and keep their own command lines. Titles are a nicety: when
setproctitle cannot be imported netd runs the same, with the command line it had.

Each function is called once, where its process starts: a handler child's title is
set in the child after the fork, so no connection costs its spawner anything.
"""

from __future__ import annotations

import functools
import os
import pwd
import socket
import struct
from collections.abc import Callable, Sequence

from netd.peer import describe

PREFIX = "netd: "
SERVICES_SHOWN = 3  # a spawner of more services names these, then "+N more"


@functools.cache
def _setters() -> tuple[Callable[[str], None], Callable[[str], None]] | None:
    # Imported at the first title, not with netd: setproctitle imports logging, which
    # a short command (`netd check`) would otherwise pay for (about 20 ms).
    try:
        from setproctitle import setproctitle, setthreadtitle
    except ImportError:
        return None
    return setproctitle, setthreadtitle


def _set(title: str, name: str) -> None:
    """`title` is what `ps -o args` shows; `name` (at most 15 bytes, no space, so
    that `ps -C`, `top` and tools reading /proc/PID/stat see one word) is the comm."""
    setters = _setters()
    if setters is not None:
        set_title, set_name = setters
        set_title(PREFIX + title)
        set_name(name)  # after the title, which sets the comm to its own first bytes


def supervisor(config_path: str) -> None:
    """`netd: supervisor -c /etc/netd/netd.yaml`."""
    _set(f"supervisor -c {config_path}", "netd-supervisor")


def loader(config_path: str) -> None:
    """`netd: loading /etc/netd/netd.yaml`: the short-lived child that reads a config
    for the supervisor (at start and at each reload)."""
    _set(f"loading {config_path}", "netd-loader")


def spawner(user: str | None, services: Sequence[str], leaving: str | None = None) -> None:
    """`netd: spawner user=nobody (echo, cat, finger, +2 more)`, with `retiring` or
    `stopping` at the end once it leaves (it finishes its children first)."""
    names = ", ".join(services[:SERVICES_SHOWN])
    if len(services) > SERVICES_SHOWN:
        names += f", +{len(services) - SERVICES_SHOWN} more"
    state = {"retire": " retiring", "stop": " stopping"}.get(leaving or "", "")
    _set(f"spawner user={user or _user_name()} ({names}){state}", "netd-spawner")


def worker(service: str) -> None:
    """`netd: worker hello`: a prefork worker of a service."""
    _set(f"worker {service}", "netd-worker")


def handler(service: str, conn: socket.socket, remote: object) -> None:
    """`netd: finger 127.0.0.1:40312`: a python handler's child and its peer (the
    client's pid for a unix socket, `wait` when it got the listening socket itself)."""
    if isinstance(remote, tuple):
        who = describe(remote, conn.family)
    elif remote is None:
        who = "wait"
    elif conn.family == socket.AF_UNIX:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
        except OSError:
            who = "unix"
        else:
            who = f"unix pid={struct.unpack('3i', creds)[0]}"
    else:
        who = describe(remote, conn.family)
    _set(f"{service} {who}", "netd-handler")


def _user_name() -> str:
    """The name of the user this process runs as (its uid when it has none)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
