"""The configuration as frozen, typed objects: what the rest of netd reads.

Nothing downstream of netd.config sees YAML or raw dicts; these objects are built
once by netd.config.validate and compared field by field on reload.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Literal

from netd.policy import AccessList, Limits

Scheme = Literal["tcp", "udp", "unix", "unix-dgram"]
HandlerKind = Literal["builtin", "exec", "python"]
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A child's PATH when the config gives none; also where a bare program name is looked up.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Bounds on children when the config sets none (README, "Default limits", says why);
# `unlimited` lifts each. One client meets per_source first, one busy service instances,
# all services together max_children.
DEFAULT_LIMITS = Limits(instances=512, per_source=256)
DEFAULT_MAX_CHILDREN = 1024


@dataclass(frozen=True)
class Address:
    """One resolved listening address: `spec` as written, plus what to bind.

    For tcp/udp, `family` and `sockaddr` come from getaddrinfo; for unix schemes,
    `path` is the socket file.
    """

    spec: str
    scheme: Scheme
    family: int = socket.AF_UNIX
    sockaddr: tuple[str, int] | tuple[str, int, int, int] | None = None
    path: str | None = None

    @property
    def socktype(self) -> int:
        return socket.SOCK_STREAM if self.scheme in ("tcp", "unix") else socket.SOCK_DGRAM

    @property
    def is_stream(self) -> bool:
        return self.socktype == socket.SOCK_STREAM

    @property
    def proto(self) -> str:
        return self.scheme

    @property
    def key(self) -> tuple[object, ...]:
        """What identifies the socket: two specs naming the same socket share a key."""
        where = self.path if self.sockaddr is None else self.sockaddr[:2]
        return (self.scheme, self.family, where)

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.scheme}:{self.path}"
        assert self.sockaddr is not None
        host, port = self.sockaddr[0], self.sockaddr[1]
        host = f"[{host}]" if self.family == socket.AF_INET6 else host
        return f"{self.scheme}://{host}:{port}"


@dataclass(frozen=True)
class Identity:
    """Who a service's children run as and within which limits.

    None means "as the supervisor": a netd not running as root cannot change user.
    """

    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    umask: int | None = None
    cwd: str | None = None
    chroot: str | None = None
    nice: int | None = None
    rlimits: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class SocketFile:
    """Owner, group and mode given to a service's Unix socket files."""

    uid: int | None = None
    gid: int | None = None
    mode: int | None = None


@dataclass(frozen=True)
class ProxyProtocol:
    """PROXY protocol (v1 or v2) headers, taken only from the `trusted` load balancers."""

    trusted: AccessList
    timeout_s: float = 5.0


@dataclass(frozen=True)
class Service:
    """One configured service: where it listens and what serves each connection."""

    name: str
    listen: tuple[Address, ...]
    kind: HandlerKind
    builtin: str | None = None
    argv: tuple[str, ...] = ()
    python: str | None = None
    wait: bool | None = None
    env: tuple[tuple[str, str], ...] = ()
    stderr: Literal["log", "null"] = "log"
    timeout_s: float = 300.0
    backlog: int = 128
    identity: Identity = Identity()
    workers: int = 0
    threads: int = 16
    max_duration_s: float | None = None
    socket_file: SocketFile = SocketFile()
    access: AccessList = AccessList()
    limits: Limits = DEFAULT_LIMITS
    proxy: ProxyProtocol | None = None
    # The file an exec service runs, when it is not argv[0] (inetd's program field,
    # xinetd's NAMEINARGS): /usr/sbin/tcpd run with argv[0] /usr/sbin/in.fingerd.
    program: str | None = None
    passenv: tuple[str, ...] = ()
    # Whether the accept and exit lines are logged at info (else at debug): pollers.
    log_accept: bool = True
    log_exit: bool = True
    nodelay: bool = False
    keepalive: bool = False
    # Where the service was defined (FILE:LINE), for messages; not part of its identity,
    # so a line that moves in its file does not make a reload restart it.
    origin: str = field(default="", compare=False)

    def mode(self, address: Address) -> Literal["nowait", "wait", "inline", "workers"]:
        """How connections on `address` are served.

        nowait: a child per connection; wait: one child gets the socket itself (inetd's
        wait, the default for datagrams); inline: a builtin, served in its spawner's
        own loop with no child; workers: `workers` long-lived children accept and serve.
        """
        if self.workers and address.is_stream:
            return "workers"
        if self.kind == "builtin":
            return "inline"
        if self.wait is None:
            return "nowait" if address.is_stream else "wait"
        return "wait" if self.wait else "nowait"

    def waits(self, address: Address) -> bool:
        """True when a child gets the socket on `address` itself (inetd's wait mode)."""
        return self.mode(address) == "wait"

    @property
    def handler(self) -> str:
        """What serves the connections, as an administrator would write it."""
        if self.kind == "builtin":
            return f"builtin {self.builtin}"
        if self.kind == "exec":
            via = f" (via {self.program})" if self.program else ""
            return "exec " + " ".join(self.argv) + via
        return f"python {self.python}"


@dataclass(frozen=True)
class Disabled:
    """A service the config names but does not serve (`disable: true`, `#<off>#`)."""

    name: str
    origin: str
    handler: str = ""


@dataclass(frozen=True)
class LogConfig:
    """Where log lines go and which are kept."""

    to: Literal["syslog", "stderr", "journal"] = "syslog"
    syslog_address: str = "/dev/log"
    facility: str = "daemon"
    level: str = "info"


def default_run_dir() -> str:
    """Where the pidfile and control socket go by default: /run/netd for root,
    $XDG_RUNTIME_DIR/netd (or /tmp/netd-UID) for anyone else."""
    if os.geteuid() == 0:
        return "/run/netd"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "netd") if runtime else f"/tmp/netd-{os.geteuid()}"


@dataclass(frozen=True)
class DaemonConfig:
    """The daemon's own files and its stop deadline."""

    pidfile: str
    control: str
    stop_timeout_s: float = 10.0
    max_children: int | None = DEFAULT_MAX_CHILDREN

    @classmethod
    def default(cls) -> DaemonConfig:
        run_dir = default_run_dir()
        return cls(pidfile=f"{run_dir}/netd.pid", control=f"{run_dir}/control.sock")


@dataclass(frozen=True)
class MetricsConfig:
    """Where the supervisor serves its metrics: Prometheus' text format over HTTP."""

    listen: tuple[Address, ...]


@dataclass(frozen=True)
class Config:
    """A whole, valid configuration."""

    path: str
    log: LogConfig = LogConfig()
    daemon: DaemonConfig = field(default_factory=DaemonConfig.default)
    services: tuple[Service, ...] = field(default_factory=tuple)
    metrics: MetricsConfig | None = None  # off unless the config names an address
    disabled: tuple[Disabled, ...] = field(default_factory=tuple)
    # FILE:LINE: messages about what is not served and why (inetd.conf lines netd
    # cannot serve, problems of disabled services): said, but not fatal.
    warnings: tuple[str, ...] = field(default_factory=tuple)
