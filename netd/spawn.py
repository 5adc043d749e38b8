"""Starting children: every fork and exec of netd lives here.

Two ways, chosen by what the child runs:
- exec services are started with posix_spawn (vfork + exec in the C library): the
  supervisor is never copied, so the rate does not fall as the supervisor grows;
- builtin and python services need the supervisor's code, so they fork; the child
  resets signals, closes every fd but its connection and the log, and never returns
  into the supervisor's loop (it leaves with os._exit).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from netd.logs import Log

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
ALL_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection and where it came in."""

    proto: str
    remote: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    local_path: str | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def of(cls, conn: socket.socket, proto: str, remote: object) -> Peer:
        """The peer of an accepted (or wait-mode) socket."""
        if conn.family == socket.AF_UNIX:
            local_path = conn.getsockname() or None
            if proto == "unix" and remote is not None:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                pid, uid, gid = struct.unpack("3i", creds)
                return cls(proto, local_path=local_path, pid=pid, uid=uid, gid=gid)
            return cls(proto, local_path=local_path)
        local = conn.getsockname()[:2]
        ip_remote = (str(remote[0]), int(remote[1])) if isinstance(remote, tuple) else None
        return cls(proto, remote=ip_remote, local=(local[0], local[1]))

    def ucspi_env(self) -> dict[str, str]:
        """The UCSPI variables (tcpserver, ucspi-unix) describing this peer."""
        if self.local_path is not None or self.proto.startswith("unix"):
            env = {"PROTO": "UNIX"}
            if self.local_path:
                env["UNIXLOCALPATH"] = self.local_path
            if self.pid is not None:
                env.update(UNIXREMOTEPID=str(self.pid), UNIXREMOTEEUID=str(self.uid),
                           UNIXREMOTEEGID=str(self.gid))
            return env
        prefix = "TCP" if self.proto == "tcp" else "UDP"
        env = {"PROTO": prefix}
        for side, address in (("LOCAL", self.local), ("REMOTE", self.remote)):
            if address is not None:
                env[f"{prefix}{side}IP"], env[f"{prefix}{side}PORT"] = address[0], str(address[1])
        return env


def exec_env(base_env: dict[str, str], service_name: str, peer: Peer) -> dict[str, str]:
    """A child's whole environment: the config's, the peer's UCSPI variables, NETD_SERVICE."""
    env = {"PATH": DEFAULT_PATH, **base_env, **peer.ucspi_env(), "NETD_SERVICE": service_name}
    return env


def spawn_exec(argv: tuple[str, ...], env: dict[str, str], conn_fd: int, stderr_fd: int) -> int:
    """Start argv with conn_fd as stdin and stdout; returns the child's pid.

    Every other fd of the supervisor is close-on-exec (Python's default), so the
    program holds exactly 0, 1 and 2. It gets default signal dispositions, an empty
    signal mask and its own session, so a Ctrl-C at netd's terminal reaches netd only.
    """
    return os.posix_spawn(
        argv[0], argv, env,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, conn_fd, 0),
            (os.POSIX_SPAWN_DUP2, conn_fd, 1),
            (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
        ],
        setsigdef=ALL_SIGNALS,
        setsigmask=(),
        setsid=True,
    )


def fork_child(run: Callable[[], None], keep_fds: list[int], log: Log, service_name: str) -> int:
    """Fork a child that calls run() and exits; returns the child's pid in the parent.

    The child's exit status says how it went: 0 done, 1 the handler raised (logged
    with its traceback). It never returns into the caller.
    """
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        _become_clean_child(keep_fds)
        run()
        status = 0
    except (ConnectionError, TimeoutError) as e:
        # The peer went away or fell silent: the end of a connection, not a fault.
        log.event("close", "info", service=service_name, pid=os.getpid(), reason=_reason(e))
        status = 0
    except BaseException as e:  # the child must never fall back into the supervisor
        log.event("error", "err", service=service_name, pid=os.getpid(),
                  msg=f"handler raised {type(e).__name__}: {e}",
                  traceback="".join(traceback.format_exception(e)).rstrip())
    finally:
        os._exit(status)


def _reason(e: BaseException) -> str:
    return "timeout" if isinstance(e, TimeoutError) else "reset"


def _become_clean_child(keep_fds: list[int]) -> None:
    """Default signals, empty mask, only 0-2 and keep_fds open (in a forked child)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    os.setsid()
    low = 3
    for fd in sorted(set(keep_fds)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
