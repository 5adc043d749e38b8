"""The `netd` command: argument parsing and one function per sub-command.

Exit codes follow sysexits: 0 ok, 64 usage, 69 unavailable (already running),
71 OS error (bind), 78 config error; `status` exits 3 when netd is not running, as
LSB init scripts do, and `stop`/`reload` exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from netd import __version__
from netd.config import Config, ConfigError, load_config, load_daemon_config
from netd.control import NotRunning, request
from netd.logs import open_log
from netd.pidfile import AlreadyRunning, Pidfile
from netd.sockets import BindError
from netd.supervisor import Supervisor
from netd.systemd import Notifier, passed_sockets

EX_OK, EX_NOT_RUNNING, EX_USAGE, EX_UNAVAILABLE, EX_OSERR, EX_NOPERM, EX_CONFIG = (
    0, 3, 64, 69, 71, 77, 78)
DEFAULT_CONFIG = "/etc/netd/netd.yaml"
Report = Callable[[int, str], None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the netd command line; returns the process exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage; sysexits says 64
        return EX_OK if e.code == 0 else EX_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EX_USAGE
    args.config = args.config or os.environ.get("NETD_CONFIG") or DEFAULT_CONFIG
    try:
        result: int = args.func(args)
    except PermissionError as e:
        print(f"netd: {e}", file=sys.stderr)
        return EX_NOPERM
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
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("-c", "--config", metavar="FILE",
                         help=f"config file (default: $NETD_CONFIG or {DEFAULT_CONFIG})")
        sub.set_defaults(func=func)
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


def _load(config_path: str) -> Config | None:
    try:
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
        return EX_CONFIG
    if args.names:
        for service in config.services:
            print(service.name)
        return EX_OK
    print(f"{config.path}: OK, {len(config.services)} service(s)")
    width = max((len(s.name) for s in config.services), default=0)
    for service in config.services:
        addresses = ", ".join(f"{a} ({service.mode(a)})" for a in service.listen)
        print(f"  {service.name:<{width}}  {addresses}  {service.handler}")
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGTERM or SIGINT (how systemd runs netd)."""
    passed = passed_sockets()  # before anything else: LISTEN_PID names this process
    config = _load(args.config)
    if config is None:
        return EX_CONFIG

    def report(code: int, message: str) -> None:
        if code != EX_OK:
            print(f"netd: {message}", file=sys.stderr)

    return serve(config, passed, report)


def cmd_start(args: argparse.Namespace) -> int:
    """Detach and serve; exit only once the daemon is ready, or say why it is not."""
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    holder = Pidfile(config.daemon.pidfile).holder()
    if holder is not None:
        print(f"netd: already running (pid {holder}, pidfile {config.daemon.pidfile})",
              file=sys.stderr)
        return EX_UNAVAILABLE

    # python-daemon is needed by `netd start` only: the supervisor of `netd run` (how
    # systemd runs netd) does not carry it.
    from netd.daemon import start_detached

    def serve_detached(report_fd: int) -> int:
        def report(code: int, message: str) -> None:
            line = f"ready {message}" if code == EX_OK else f"error {code} {message}"
            os.write(report_fd, line.replace("\n", " ").encode() + b"\n")
            os.close(report_fd)

        return serve(config, {}, report)

    return start_detached(serve_detached, [])


def serve(config: Config, passed: dict[int, str], report: Report) -> int:
    """Take the pidfile, bind, report readiness (or the failure), then serve."""
    pidfile = Pidfile(config.daemon.pidfile)
    try:
        stale = pidfile.acquire()
    except (AlreadyRunning, OSError) as e:
        report(EX_UNAVAILABLE, str(e))
        return EX_UNAVAILABLE
    try:
        _no_inherited_fds()
        log = open_log(config.log.to, config.log.syslog_address, config.log.facility,
                       config.log.level)
        if stale is not None and stale != os.getpid():
            log.event("pidfile", "warning", path=config.daemon.pidfile, stale_pid=stale,
                      msg="took over the pidfile of a netd that is gone")
        supervisor = Supervisor(config, log, Notifier(), passed)
        try:
            supervisor.bind_all()
        except OSError as e:  # BindError says which address; others name their file
            message = e.strerror if isinstance(e, BindError) and e.strerror else str(e)
            log.event("error", "err", msg=message)
            report(EX_OSERR, message)
            return EX_OSERR
        report(EX_OK, str(os.getpid()))
        return supervisor.run()
    finally:
        pidfile.release()


def _ask(args: argparse.Namespace, command: str, timeout_s: float = 30.0) -> dict[str, Any]:
    return request(load_daemon_config(args.config).control, command, timeout_s)


def cmd_stop(args: argparse.Namespace) -> int:
    """Ask the daemon to stop, and wait until it has exited."""
    daemon = load_daemon_config(args.config)
    timeout_s = args.timeout if args.timeout is not None else daemon.stop_timeout_s + 5
    try:
        pid = int(request(daemon.control, "stop")["pid"])
    except NotRunning as e:
        print(f"netd: {e}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            print(f"netd: pid {pid} still running after {timeout_s:g}s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"netd stopped (pid {pid})")
    return EX_OK


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


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the daemon to re-read its config; exit 78 with the errors when it is bad."""
    try:
        reply = _ask(args, "reload")
    except NotRunning as e:
        print(f"netd: {e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"netd: reload failed, the running config stays in force:\n{reply.get('error')}",
              file=sys.stderr)
        return EX_CONFIG
    changes = ", ".join(f"{k} {','.join(reply[k])}" for k in ("added", "changed", "removed")
                        if reply.get(k))
    print(f"netd reloaded ({changes or 'no changes'})")
    return EX_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Print the daemon's state and its services (all, or those named); exit 3 when it
    is not running."""
    try:
        reply = _ask(args, "status")
    except NotRunning as e:
        print(f"netd: {e}", file=sys.stderr)
        return EX_NOT_RUNNING
    if args.services:
        running = [s["name"] for s in reply["services"]]
        unknown = [name for name in args.services if name not in running]
        if unknown:
            print(f"netd: no service {', '.join(unknown)} in the running config "
                  f"(it has: {', '.join(running) or 'none'})", file=sys.stderr)
            return EX_USAGE
        reply["services"] = [s for s in reply["services"] if s["name"] in args.services]
    if args.json:
        print(json.dumps(reply, indent=2))
        return EX_OK
    daemon = reply["daemon"]
    print(f"netd {daemon['version']} running, pid {daemon['pid']}, "
          f"up {daemon['uptime_s']:.0f}s, {daemon['children']} children")
    print(f"config: {daemon['config']}")
    last = daemon.get("last_reload")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"]))
        result = "ok" if last["ok"] else f"error: {last['error']}"
        print(f"last reload: {when} {result}")
    for service in reply["services"]:
        print(f"{service['name']}: {service['state']}, {service['handler']}, "
              f"{service['children']} children, {service['accepted']} accepted, "
              f"{service['refused']} refused")
        for listen in service["listen"]:
            print(f"    {listen['proto']} {listen['address']} ({listen['mode']})")
    return EX_OK


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
