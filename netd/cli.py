"""The `netd` command: argument parsing and one function per sub-command.

Exit codes follow sysexits: 0 ok, 64 usage, 69 unavailable (already running),
71 OS error (bind), 77 permission (including a pidfile, control socket or run
directory netd will not trust), 78 config error; `status` exits 3 when netd is not
running, as LSB init scripts do, and `stop`/`reload` exit 1 when there is no daemon
or no result in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from netd import __version__, proctitle
from netd.config import Config, ConfigError, load_config, load_daemon_config
from netd.config.model import DaemonConfig
from netd.control import NotRunning, request
from netd.logs import open_log
from netd.pidfile import AlreadyRunning, Pidfile
from netd.sockets import BindError

EX_FAILED = 1        # stop, reload: no daemon, or no result in time
EX_NOT_RUNNING = 3   # status: not running (LSB)
RELOAD_WAIT_S = 30.0
DEFAULT_CONFIG = "/etc/netd/netd.yaml"
Report = Callable[[int, str], None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the netd command line; returns the process exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage; sysexits says 64
        return os.EX_OK if e.code == 0 else os.EX_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        return os.EX_USAGE
    if args.command != "import":
        args.config = args.config or os.environ.get("NETD_CONFIG") or DEFAULT_CONFIG
    try:
        result: int = args.func(args)
    except PermissionError as e:
        print(f"netd: {e}", file=sys.stderr)
        return os.EX_NOPERM
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netd", description="A super-server for Unix.")
    parser.add_argument("--version", action="version", version=f"netd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, func, text in (
        ("run", cmd_run, "serve in the foreground until SIGTERM or SIGINT"),
        ("start", cmd_start, "start netd as a daemon; returns once it is ready"),
        ("stop", cmd_stop, "stop the running daemon gracefully"),
        ("reload", cmd_reload, "re-read the config; on any error keep the running one"),
        ("status", cmd_status, "show the daemon and every service with its counters"),
        ("check", cmd_check, "validate the config and print the resolved services"),
        ("import", cmd_import, "print xinetd files or inetd.conf as netd YAML"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(func=func)
        if name == "import":
            sub.add_argument("files", nargs="+", metavar="FILE",
                             help="xinetd service files, xinetd.conf or inetd.conf")
            continue
        sub.add_argument("-c", "--config", metavar="FILE",
                         help=f"config file (default: $NETD_CONFIG or {DEFAULT_CONFIG})")
        if name == "stop":
            sub.add_argument("--timeout", type=float, metavar="S",
                             help="seconds to wait for the daemon to exit "
                                  "(default: daemon.stop_timeout + 5)")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON for scripts")
            sub.add_argument("services", nargs="*", metavar="SERVICE",
                             help="show only these services (default: all)")
        if name == "check":
            sub.add_argument("--names", action="store_true",
                             help="print only the service names, one a line (for scripts "
                                  "and shell completion)")
    return parser


def _load(config_path: str, apart: bool = False) -> Config | None:
    """The config, or None after printing its errors. `apart`: for the process that will
    serve it, loaded in a child (spawn.load_config_apart)."""
    try:
        if apart:
            # Here, not at the top: only `run` and `start` need it, and what it imports
            # (ctypes, pickle, traceback) would slow every `netd check`.
            from netd.spawn import load_config_apart
            return load_config_apart(config_path)
        return load_config(config_path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        count = len(e.errors)
        print(f"netd: {count} error{'s' if count != 1 else ''} in {config_path}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config; print each service with its resolved addresses."""
    config = _load(args.config)
    if config is None:
        return os.EX_CONFIG
    if args.names:
        # Disabled services too: `netd status` lists them.
        for name in [s.name for s in config.services] + [d.name for d in config.disabled]:
            print(name)
        return os.EX_OK
    disabled = f", {len(config.disabled)} disabled" if config.disabled else ""
    print(f"{config.path}: OK, {len(config.services)} service(s){disabled}")
    names = [s.name for s in config.services] + [d.name for d in config.disabled]
    width = max((len(name) for name in names), default=0)
    for service in config.services:
        addresses = ", ".join(f"{a} ({service.mode(a)})" for a in service.listen)
        print(f"  {service.name:<{width}}  {addresses}  {service.handler}")
    for off in config.disabled:
        print(f"  {off.name:<{width}}  disabled ({off.origin})  {off.handler}")
    if config.metrics is not None:
        print(f"metrics: GET /metrics on {', '.join(map(str, config.metrics.listen))}")
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return os.EX_OK


def cmd_import(args: argparse.Namespace) -> int:
    """Print the services of xinetd files (or inetd.conf) as netd YAML; every attribute
    that cannot be carried over is a warning on stderr naming its FILE:LINE."""
    from netd.importer import ImportFailure, import_files

    try:
        yaml_text, warnings = import_files(args.files)
    except ImportFailure as e:
        print(f"netd: {e}", file=sys.stderr)
        return os.EX_CONFIG
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(yaml_text)
    return os.EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGTERM or SIGINT (how systemd runs netd)."""
    from netd.systemd import passed_sockets

    passed = passed_sockets()  # before anything else: LISTEN_PID names this process
    config = _load(args.config, apart=True)
    if config is None:
        return os.EX_CONFIG

    def report(code: int, message: str) -> None:
        if code != os.EX_OK:
            print(f"netd: {message}", file=sys.stderr)

    return serve(config, passed, report)


def cmd_start(args: argparse.Namespace) -> int:
    """Detach and serve; exit only once the daemon is ready, or say why it is not."""
    config = _load(args.config, apart=True)
    if config is None:
        return os.EX_CONFIG
    holder = Pidfile(config.daemon.pidfile).holder()
    if holder is not None:
        print(f"netd: already running (pid {holder}, pidfile {config.daemon.pidfile})",
              file=sys.stderr)
        return os.EX_UNAVAILABLE

    # python-daemon is needed by `netd start` only: the supervisor of `netd run` (how
    # systemd runs netd) does not carry it.
    from netd.daemon import start_detached

    def serve_detached(report_fd: int) -> int:
        def report(code: int, message: str) -> None:
            line = f"ready {message}" if code == os.EX_OK else f"error {code} {message}"
            os.write(report_fd, line.replace("\n", " ").encode() + b"\n")
            os.close(report_fd)

        return serve(config, {}, report)

    return start_detached(serve_detached, [])


def serve(config: Config, passed: dict[int, str], report: Report) -> int:
    """Take the pidfile, bind, report readiness (or the failure), then serve."""
    pidfile = Pidfile(config.daemon.pidfile)
    try:
        stale = pidfile.acquire()
    except PermissionError as e:  # also a pidfile or run directory netd will not trust
        report(os.EX_NOPERM, str(e))
        return os.EX_NOPERM
    except (AlreadyRunning, OSError) as e:
        report(os.EX_UNAVAILABLE, str(e))
        return os.EX_UNAVAILABLE
    # Imported here: the commands that do not serve (check, status...) start faster.
    from netd.supervisor import Supervisor
    from netd.systemd import Notifier

    try:
        _no_inherited_fds()
        log = open_log(config.log.to, config.log.syslog_address, config.log.facility,
                       config.log.level)
        for warning in config.warnings:
            log.event("config", "warning", msg=warning)
        if stale is not None and stale != os.getpid():
            log.event("pidfile", "warning", path=config.daemon.pidfile, stale_pid=stale,
                      msg="took over the pidfile of a netd that is gone")
        proctitle.supervisor(config.path)
        supervisor = Supervisor(config, log, Notifier(), passed)
        try:
            supervisor.bind_all()
        except OSError as e:  # BindError says which address; others name their file
            message = e.strerror if isinstance(e, BindError) and e.strerror else str(e)
            code = os.EX_NOPERM if isinstance(e, PermissionError) else os.EX_OSERR
            log.event("error", "err", msg=message)
            report(code, message)
            return code
        report(os.EX_OK, str(os.getpid()))
        return supervisor.run()
    finally:
        pidfile.release()


def cmd_stop(args: argparse.Namespace) -> int:
    """Ask the daemon to stop (or, without its control socket, send it SIGTERM), and
    wait until it has exited."""
    daemon = load_daemon_config(args.config)
    timeout_s = args.timeout if args.timeout is not None else daemon.stop_timeout_s + 5
    try:
        pid: int | None = int(request(daemon.control, "stop")["pid"])
    except NotRunning as e:
        pid = _signal_daemon(daemon, e, signal.SIGTERM)
    if pid is None:
        return EX_FAILED
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            print(f"netd: pid {pid} still running after {timeout_s:g}s", file=sys.stderr)
            return EX_FAILED
        time.sleep(0.05)
    print(f"netd stopped (pid {pid})")
    return os.EX_OK


def _running_pid(daemon: DaemonConfig, why: NotRunning) -> int | None:
    """The pid of the netd holding the pidfile, when its control socket does not answer;
    None (having said so) when no netd holds it."""
    pid = Pidfile(daemon.pidfile).holder()
    if pid is None:
        print(f"netd: netd is not running ({why}; pidfile {daemon.pidfile} is not locked)",
              file=sys.stderr)
        return None
    if pid < 0:
        print(f"netd: a netd holds {daemon.pidfile} but has not written its pid yet "
              "(starting?); try again", file=sys.stderr)
        return None
    return pid


def _signal_daemon(daemon: DaemonConfig, why: NotRunning, sig: signal.Signals) -> int | None:
    """Without a control socket: send `sig` to the netd holding the pidfile; its pid, or
    None (having said why) when there is none to signal."""
    pid = _running_pid(daemon, why)
    if pid is None:
        return None
    print(f"netd: {why}; sending {sig.name} to pid {pid} (pidfile {daemon.pidfile})",
          file=sys.stderr)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it exited meanwhile: for stop, that is the result
    except PermissionError:
        raise PermissionError(f"not allowed to signal netd (pid {pid}): run this as root or "
                              "as the user netd runs as") from None
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Our own child (tests start netd directly) lingers as a zombie until reaped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Terminated(Exception):
    """The command got SIGTERM."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the config, then ask the daemon to re-read it (or, without its control
    socket, send it SIGHUP and wait for the socket to come back with the result); exit
    78 with the errors when it is bad.

    SIGTERM ends it cleanly (exit 0, saying so): systemd sends it to a running
    ExecReload when the unit is stopped, and a reload command killed by a signal leaves
    the unit failed. The daemon goes on with the reload, and then with the stop.
    """
    signal.signal(signal.SIGTERM, _terminated)
    doing = "checking the config (netd was not asked to reload)"
    try:
        config = _load(args.config)
        if config is None:
            return os.EX_CONFIG
        doing = "waiting for the reload's result (netd goes on with the reload)"
        reply = _ask_reload(config.daemon)
        if reply is None:
            return EX_FAILED
        if not reply.get("ok"):
            print("netd: reload failed, the running config stays in force:\n"
                  f"{reply.get('error')}", file=sys.stderr)
            return os.EX_CONFIG
        changes = ", ".join(f"{k} {','.join(reply[k])}"
                            for k in ("added", "changed", "removed") if reply.get(k))
        print(f"netd reloaded ({changes or 'no changes'})")
        return os.EX_OK
    except Terminated:
        print(f"netd: stopped by SIGTERM while {doing}", file=sys.stderr)
        return os.EX_OK


def _ask_reload(daemon: DaemonConfig) -> dict[str, Any] | None:
    """The daemon's reply to a reload, over its control socket or, without one, by
    SIGHUP; None (having said why) when there is none."""
    try:
        return request(daemon.control, "reload")
    except NotRunning as e:
        sent_s = time.time()
        pid = _signal_daemon(daemon, e, signal.SIGHUP)
        if pid is None:
            return None
        found = _reload_result(daemon.control, pid, sent_s)
        if found is None:
            print(f"netd: no result from pid {pid} within {RELOAD_WAIT_S:g}s (its control "
                  f"socket {daemon.control} did not come back); see its log", file=sys.stderr)
        return found


def _reload_result(control: str, pid: int, sent_s: float) -> dict[str, Any] | None:
    """The outcome of the reload a SIGHUP sent at `sent_s` (wall clock) started: netd
    re-creates a missing control socket when it reloads, and its status then holds
    `last_reload`. None when that does not happen in time or netd exits."""
    deadline = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < deadline and _alive(pid):
        try:
            status = request(control, "status", max(0.1, deadline - time.monotonic()))
        except NotRunning:
            time.sleep(0.05)
            continue
        last: dict[str, Any] | None = status.get("daemon", {}).get("last_reload")
        if last is not None and last["time"] >= sent_s:
            return last
        time.sleep(0.05)
    return None


def cmd_status(args: argparse.Namespace) -> int:
    """Print the daemon's state and its services (all, or those named); exit 3 when it
    is not running."""
    daemon = load_daemon_config(args.config)
    try:
        reply = request(daemon.control, "status")
    except NotRunning as e:
        pid = _running_pid(daemon, e)
        if pid is None:
            return EX_NOT_RUNNING
        why = (f"{e}, so nothing more can be shown (was it removed? `netd reload` makes "
               "netd create it again)")
        if args.json:
            print(json.dumps({"ok": False, "daemon": {"pid": pid, "pidfile": daemon.pidfile},
                              "error": why}, indent=2))
        else:
            print(f"netd running, pid {pid} (pidfile {daemon.pidfile})")
            print(f"netd: {why}", file=sys.stderr)
        return os.EX_OK
    if args.services:
        running = [s["name"] for s in reply["services"]]
        unknown = [name for name in args.services if name not in running]
        if unknown:
            print(f"netd: no service {', '.join(unknown)} in the running config "
                  f"(it has: {', '.join(running) or 'none'})", file=sys.stderr)
            return os.EX_USAGE
        reply["services"] = [s for s in reply["services"] if s["name"] in args.services]
    if args.json:
        print(json.dumps(reply, indent=2))
        return os.EX_OK
    daemon_state = reply["daemon"]
    print(f"netd {daemon_state['version']} running, pid {daemon_state['pid']}, "
          f"up {daemon_state['uptime_s']:.0f}s, {daemon_state['children']} children")
    print(f"config: {daemon_state['config']}")
    if daemon_state.get("metrics"):
        print(f"metrics: GET /metrics on {', '.join(daemon_state['metrics'])}")
    last = daemon_state.get("last_reload")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"]))
        result = "ok" if last["ok"] else f"error: {last['error']}"
        print(f"last reload: {when} {result}")
    for service in reply["services"]:
        if service["state"] == "disabled":
            print(f"{service['name']}: disabled ({service['origin']}), {service['handler']}")
            continue
        print(f"{service['name']}: {service['state']}, {service['handler']}, "
              f"{service['children']} children, {service['accepted']} accepted, "
              f"{service['refused']} refused")
        for listen in service["listen"]:
            print(f"    {listen['proto']} {listen['address']} ({listen['mode']})")
    return os.EX_OK


def _no_inherited_fds() -> None:
    """Mark fds netd inherited from whoever started it close-on-exec.

    netd's own fds are close-on-exec already; without this, a stray fd from the shell
    or a service manager would leak into every exec'd child.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the fd listdir itself used, now closed
