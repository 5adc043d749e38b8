"""Starting children: every fork and exec of netd lives here.

Two ways, chosen by what the child runs:
- exec services go through a Spawner: a small process forked once per identity
  (user, groups, rlimits, umask, cwd, chroot), which takes that identity for good and
  then starts each program it is handed with posix_spawn (vfork + exec in the C
  library). Forking the Python supervisor per connection runs about 1,000/s and slows
  as the supervisor grows, and CPython falls back to that slow full fork as soon as a
  spawn must change user; this way nothing changes identity per connection, the
  supervisor never forks per connection, and the spawn itself runs beside the
  supervisor's loop on another core. The supervisor hands the spawner the
  connection's fd over a Unix socket (SCM_RIGHTS); the spawner reports each
  program's pid and exit status back, so limits and event=exit stay exact;
- builtin and python services need the supervisor's code, so they fork; the child
  resets signals, closes every fd but its connection and the log, takes the
  service's identity, and never returns into the supervisor's loop (os._exit).
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import resource
import selectors
import signal
import socket
import struct
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netd.config.identity import RLIMITS
from netd.config.model import DEFAULT_PATH, Identity, Service
from netd.handlers.builtins import BUILTINS
from netd.handlers.python import load_handler
from netd.logs import Log

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


def exec_env(service: Service, peer: Peer) -> dict[str, str]:
    """A child's whole environment: PATH, the `passenv` names from netd's own environment,
    the config's `env`, the peer's UCSPI variables, REMOTE_HOST, NETD_SERVICE."""
    env = {"PATH": DEFAULT_PATH}
    for name in service.passenv:
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(service.env)
    env.update(peer.ucspi_env())
    if peer.remote is not None:
        env["REMOTE_HOST"] = peer.remote[0]  # as xinetd sets it: the address, no lookup
    env["NETD_SERVICE"] = service.name
    return env


def spawn_exec(program: str, argv: tuple[str, ...], env: dict[str, str], conn_fd: int,
               stderr_fd: int) -> int:
    """Start `program` with `argv` (argv[0] may name another program, as tcpd wants) and
    conn_fd as stdin and stdout; returns the child's pid.

    Every other fd of the supervisor is close-on-exec (Python's default), so the
    program holds exactly 0, 1 and 2. It gets default signal dispositions, an empty
    signal mask and its own session, so a Ctrl-C at netd's terminal reaches netd only.
    """
    return os.posix_spawn(
        program, argv, env,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, conn_fd, 0),
            (os.POSIX_SPAWN_DUP2, conn_fd, 1),
            (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
        ],
        setsigdef=ALL_SIGNALS,
        setsigmask=(),
        setsid=True,
    )


def fork_child(run: Callable[[], None], keep_fds: list[int], log: Log, service_name: str,
               identity: Identity) -> int:
    """Fork a child that takes `identity`, calls run() and exits; returns its pid.

    The child's exit status says how it went: 0 done, 1 the handler raised (logged
    with its traceback). It never returns into the caller.
    """
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        _become_clean_child(keep_fds)
        log.backlog.clear()  # the supervisor's, not ours to send
        log.patience_s = 1.0
        become(identity)
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


def become(identity: Identity) -> None:
    """Take on `identity` for good, in the order that keeps each step possible:
    limits and priority first, then the file system view, then groups, then user."""
    if identity.nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, identity.nice)
    for name, soft, hard in identity.rlimits:
        resource.setrlimit(RLIMITS[name], (soft, hard))
    if identity.umask is not None:
        os.umask(identity.umask)
    if identity.chroot is not None:
        os.chroot(identity.chroot)
        os.chdir("/")
    if identity.cwd is not None:
        os.chdir(identity.cwd)
    if identity.uid is None:
        return
    if os.geteuid() != 0:
        if identity.uid != os.geteuid():
            raise PermissionError(f"netd does not run as root and cannot run children as "
                                  f"{identity.user}")
        return
    assert identity.gid is not None
    # An empty list means no supplementary groups at all (xinetd's `groups = no`).
    os.setgroups(list(identity.groups if identity.groups is not None else (identity.gid,)))
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)


class Spawner:
    """A process that holds one identity and posix_spawns programs for the supervisor.

    `request()` hands it a program and fds; `events()` reads back what happened:
    {"token", "pid"} when a program started, {"token", "error"} when it could not,
    {"exit": pid, "status": waitstatus} when one ended. A request the socket cannot
    take now (the spawner is behind) is `held`, with copies of its fds, until flush()
    gets it through; meanwhile the supervisor stops accepting for this spawner.
    """

    def __init__(self, identity: Identity, keep_fds: list[int]) -> None:
        self.identity = identity
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            self.sock.close()
            _spawner_main(theirs, identity, keep_fds)
        theirs.close()
        self.pid = pid
        self.sock.setblocking(False)
        self.held: deque[tuple[bytes, array.array[int]]] = deque()

    def request(self, token: int, program: str, argv: tuple[str, ...], env: dict[str, str],
                conn_fd: int, stderr_fd: int) -> None:
        """Ask for program to be started with argv on conn_fd; the answer comes through
        events()."""
        message = json.dumps({"token": token, "program": program, "argv": argv,
                              "env": env}).encode()
        fds = array.array("i", [conn_fd, stderr_fd])
        if not self.held:
            try:
                self._send(message, fds)
                return
            except BlockingIOError:
                pass
        # The caller closes its fds when we return: keep our own copies until sent.
        self.held.append((message, array.array("i", [os.dup(fd) for fd in fds])))

    def flush(self) -> None:
        """Send what is held, in order, until the socket is full again."""
        while self.held:
            message, fds = self.held[0]
            try:
                self._send(message, fds)
            except BlockingIOError:
                return
            self.held.popleft()
            for fd in fds:
                os.close(fd)

    def _send(self, message: bytes, fds: array.array[int]) -> None:
        self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])

    def events(self) -> list[dict[str, Any]] | None:
        """What the spawner reported since the last call; None once it has gone."""
        found: list[dict[str, Any]] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return found
            except OSError:
                data = b""
            if not data:
                return None if not found else found
            found.append(json.loads(data))

    def close(self) -> None:
        """Tell the spawner to leave (it exits when its socket closes)."""
        self.sock.close()
        for _, fds in self.held:
            for fd in fds:
                os.close(fd)
        self.held.clear()


def _spawner_main(sock: socket.socket, identity: Identity, keep_fds: list[int]) -> None:
    """The spawner's whole life: take the identity, then serve requests until EOF."""
    status = 1
    try:
        _become_clean_child([sock.fileno(), *keep_fds])
        become(identity)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj == wake_r:
                    os.read(wake_r, 256)
                    _report_exits(sock)
                elif not _spawn_requested(sock):
                    status = 0
                    return
    except BaseException as e:  # report, then leave: never run the supervisor's code
        try:
            sock.send(json.dumps({"fatal": f"{type(e).__name__}: {e}"}).encode())
        except OSError:
            pass
    finally:
        os._exit(status)


def _spawn_requested(sock: socket.socket) -> bool:
    """Start the program of one request; False when the supervisor has gone."""
    fds = array.array("i")
    # MSG_CMSG_CLOEXEC: the received fds must not leak into the program beyond 0-2.
    data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(2 * fds.itemsize),
                                       socket.MSG_CMSG_CLOEXEC)
    if not data:
        return False
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    request = json.loads(data)
    try:
        pid = spawn_exec(request["program"], tuple(request["argv"]), request["env"], fds[0],
                         fds[1])
        reply: dict[str, Any] = {"token": request["token"], "pid": pid}
    except OSError as e:
        reply = {"token": request["token"], "error": str(e)}
    finally:
        for fd in fds:
            os.close(fd)
    sock.send(json.dumps(reply).encode())
    return True


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"exit": pid, "status": status}).encode())


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `sig` when our parent dies."""
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), sig)


def become_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to us."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def serve_connection(service: Service, conn: socket.socket, remote: object) -> None:
    """In the child: run the service's builtin or python handler on `conn`."""
    conn.settimeout(service.timeout_s)
    if service.kind == "builtin":
        assert service.builtin is not None
        BUILTINS[service.builtin].stream(conn)
    else:
        assert service.python is not None
        load_handler(service.python)(conn, remote)
