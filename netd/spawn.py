"""Starting processes: every fork and exec of netd lives here, each with its steps
in order.

- A long-lived helper (a spawner, a prefork worker) is forked once from the
  supervisor: it resets signals, keeps only the fds it needs, takes its identity
  (limits, file system view, groups, user) for good, then runs its main function.
- An exec child is started by a spawner with posix_spawn (vfork + exec in the C
  library): forking a Python process per connection runs about 1,000/s and slows as
  the process grows, and CPython's fast spawn refuses to change user; a spawner has
  already taken the identity, so nothing changes identity per connection.
- A python handler child is forked by a spawner per connection: it needs netd's code.

Nothing forked ever returns into its parent's loop (os._exit).
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import resource
import signal
import socket
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace

from netd import proctitle
from netd.config import Config, ConfigError, load_config
from netd.config.identity import RLIMITS
from netd.config.model import DEFAULT_PATH, Identity, Service
from netd.handlers.python import load_handler
from netd.logs import Log
from netd.peer import Peer


def ignored_signals() -> tuple[signal.Signals, ...]:
    """The signals this process ignores: the only ones exec does not reset by itself
    (a handled signal reverts to its default in the new program, an ignored one stays
    ignored), so the only ones a spawned child needs reset."""
    return tuple(sig for sig in signal.valid_signals()
                 if sig not in (signal.SIGKILL, signal.SIGSTOP)
                 and signal.getsignal(sig) == signal.SIG_IGN)


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


class ExecSpawn:
    """Starts programs with libc's posix_spawn (vfork + exec), called through ctypes:
    the attributes and each program's argv are made once, not at every spawn as
    os.posix_spawn makes them. A spawner calls it from its loop: measured, that beats
    spawning from a thread of its own (the hand-overs between the threads, and the TLB
    flushes two running threads cost at each unmap, outweigh the overlap).

    Each child gets the connection as fd 0 and 1 and the stderr target as fd 2; every
    other fd of its parent is close-on-exec (Python's default), so the program holds
    exactly 0, 1 and 2. It gets default signal dispositions (exec resets handled
    signals by itself; `ignored`, from ignored_signals(), are reset by the child while
    its parent waits), an empty signal mask and its own session, so a Ctrl-C at netd's
    terminal reaches netd only.
    """

    def __init__(self, ignored: tuple[signal.Signals, ...]) -> None:
        # The attributes and each program's argv are the same for every child: made
        # once, and only read by spawns.
        self.attr = ctypes.create_string_buffer(_SPAWN_STRUCT_BYTES)
        self.reset = ctypes.create_string_buffer(_SIGSET_BYTES)
        self.mask = ctypes.create_string_buffer(_SIGSET_BYTES)
        _LIBC.posix_spawnattr_init(self.attr)
        _LIBC.sigemptyset(self.reset)
        for sig in ignored:
            _LIBC.sigaddset(self.reset, int(sig))
        _LIBC.sigemptyset(self.mask)
        _LIBC.posix_spawnattr_setsigdefault(self.attr, self.reset)
        _LIBC.posix_spawnattr_setsigmask(self.attr, self.mask)
        _LIBC.posix_spawnattr_setflags(self.attr, _SETSIGDEF | _SETSIGMASK | _SETSID)
        self.programs: dict[tuple[str, tuple[str, ...]],
                            tuple[bytes, ctypes.Array[ctypes.c_char_p]]] = {}

    def __call__(self, program: str, argv: tuple[str, ...], env: dict[str, str],
                 conn_fd: int, stderr_fd: int) -> int:
        """Start `program` with `argv` (argv[0] may name another program, as tcpd wants)
        on conn_fd; returns the child's pid, or raises OSError."""
        made = self.programs.get((program, argv))
        if made is None:
            made = self.programs[(program, argv)] = (os.fsencode(program), _strings(argv))
        actions = ctypes.create_string_buffer(_SPAWN_STRUCT_BYTES)
        _LIBC.posix_spawn_file_actions_init(actions)
        try:
            for fd, target in ((conn_fd, 0), (conn_fd, 1), (stderr_fd, 2)):
                failed = _LIBC.posix_spawn_file_actions_adddup2(actions, fd, target)
                if failed:  # EBADF: fd at or above RLIMIT_NOFILE
                    raise OSError(failed, f"fd {fd}: {os.strerror(failed)}", program)
            pid = ctypes.c_int()
            failed = _LIBC.posix_spawn(ctypes.byref(pid), made[0], actions, self.attr,
                                       made[1], _strings([f"{k}={v}" for k, v in env.items()]))
        finally:
            _LIBC.posix_spawn_file_actions_destroy(actions)
        if failed:
            raise OSError(failed, os.strerror(failed), program)
        return pid.value


# Through PyDLL a call keeps the GIL: nothing else runs in a spawner meanwhile, and a
# release and take-back would only add to each call.
_LIBC = ctypes.PyDLL(None, use_errno=True)
# glibc's posix_spawnattr_t is 336 bytes and posix_spawn_file_actions_t 80: room to spare.
_SPAWN_STRUCT_BYTES = 1024
_SIGSET_BYTES = 128
_SETSIGDEF, _SETSIGMASK, _SETSID = 0x04, 0x08, 0x80  # POSIX_SPAWN_* in glibc's spawn.h


def _strings(items: list[str] | tuple[str, ...]) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated array of C strings, as argv and envp are."""
    return (ctypes.c_char_p * (len(items) + 1))(*(os.fsencode(item) for item in items), None)


def lowest_fd(fd: int) -> int:
    """`fd` moved to the lowest free number, if that is lower (the old one is closed).

    posix_spawn's file actions refuse an fd whose number is at or above RLIMIT_NOFILE
    (EBADF: the child would keep the spawner's own fd 2), and a helper inherits its fds
    with the supervisor's numbers, which grow with its listeners, while a service's
    `rlimits: {nofile: N}` may be small.
    """
    low = os.dup(fd)
    if low > fd:
        os.close(low)
        return fd
    os.close(fd)
    return low


def fork_helper(main: Callable[[], None], keep_fds: list[int], identity: Identity,
                prepare: Callable[[], None] | None = None) -> int:
    """Fork a long-lived helper (a spawner, a prefork worker) that takes `identity`
    and runs main(); returns its pid. `prepare()` runs first, while it still has netd's
    own identity (to import what main() needs from files its new user may not read).
    It leaves with status 0 when main() returns, 1 when it raised, and never returns
    into the caller."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        _become_clean_child(keep_fds)
        if prepare is not None:
            prepare()
        become(identity)
        main()
        status = 0
    finally:
        os._exit(status)


def load_config_apart(path: str, running: tuple[Service, ...] = ()) -> Config:
    """load_config() in a child process: the caller (the supervisor) never imports the
    config's python handler modules (user code, as large as it likes: they are imported
    where they run, in spawners and workers) and keeps none of the parse's garbage.
    A service equal to one of `running` (the services being served) comes back as that
    very object: only what changed is sent over and rebuilt, so a reload of a large
    config never holds two copies of it. Raises ConfigError as load_config does."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            _become_clean_child([write_fd])
            proctitle.loader(path)
            try:
                outcome: tuple[str, object] = ("config", _unchanged_by_name(load_config(path),
                                                                             running))
            except ConfigError as e:
                outcome = ("errors", e.errors)
            data = pickle.dumps(outcome)
        except BaseException as e:  # it must report, then leave: never run on as a copy
            data = pickle.dumps(("errors", [f"{path}: cannot load: {type(e).__name__}: {e}"]))
        with os.fdopen(write_fd, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as got:
        data = got.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data) if data else ("errors", [f"{path}: cannot load"])
    if kind == "errors":
        raise ConfigError(list(value))
    config, services = value
    assert isinstance(config, Config)
    by_name = {service.name: service for service in running}
    return replace(config, services=tuple(by_name[entry] if isinstance(entry, str) else entry
                                          for entry in services))


def _unchanged_by_name(config: Config, running: tuple[Service, ...]
                       ) -> tuple[Config, tuple[Service | str, ...]]:
    """`config` without its services, and its services in order, each one equal to a
    running service given by its name only."""
    by_name = {service.name: service for service in running}
    return replace(config, services=()), tuple(
        service.name if by_name.get(service.name) == service else service
        for service in config.services)


def give_back_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's malloc_trim): a
    long-lived process that just dropped a large config stays its usual size."""
    gc.collect()
    _LIBC.malloc_trim(0)


def import_handlers(services: list[Service] | tuple[Service, ...]) -> None:
    """Import the python handler modules of `services` (in a spawner or worker, before it
    takes its identity, while netd's own files are surely readable)."""
    for service in services:
        if service.python is not None:
            load_handler(service.python)


def fork_handler(run: Callable[[], None], keep_fds: list[int], log: Log,
                 service_name: str) -> int:
    """Fork the child that runs a python handler on one connection; returns its pid.

    It already has its identity (its parent, a spawner, took it). The exit status says
    how it went: 0 done, 1 the handler raised (logged with its traceback).
    """
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        _become_clean_child(keep_fds)
        log.in_child()  # what waits in it is its parent's, not ours to send
        run()
        status = 0
    except (ConnectionError, TimeoutError) as e:
        # The peer went away or fell silent: the end of a connection, not a fault.
        log.event("close", "info", service=service_name, pid=os.getpid(), reason=_reason(e))
        status = 0
    except BaseException as e:  # the child must never fall back into its parent's loop
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


def exited_children() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of each child of this process that has exited, reaped now."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def signal_group(pid: int, sig: int) -> None:
    """Signal a child and what it started: every child leads its own session and group."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(sig: int, parent: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `sig` when our parent (`parent`, its
    pid as it was before the fork) dies."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # it died before the prctl took effect, even before we ran
        os.kill(os.getpid(), sig)


def become_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to us."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def serve_python(service: Service, conn: socket.socket, remote: object) -> None:
    """In a handler child: call the service's python handler on `conn`."""
    assert service.python is not None
    proctitle.handler(service.name, conn, remote)
    conn.settimeout(service.timeout_s)
    load_handler(service.python)(conn, remote)
