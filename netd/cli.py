"""The `netd` command: argument parsing and one function per sub-command.

Exit codes follow sysexits: 0 ok, 64 usage, 71 OS error (bind), 78 config error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from netd import __version__
from netd.config import Config, ConfigError, load_config
from netd.logs import open_log
from netd.sockets import BindError
from netd.supervisor import Supervisor

EX_OK, EX_USAGE, EX_OSERR, EX_CONFIG = 0, 64, 71, 78
DEFAULT_CONFIG = "/etc/netd/netd.yaml"


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
    config_path = args.config or os.environ.get("NETD_CONFIG") or DEFAULT_CONFIG
    command: int = args.func(config_path)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netd", description="A super-server for Unix.")
    parser.add_argument("--version", action="version", version=f"netd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, func, text in (
        ("run", cmd_run, "serve in the foreground until SIGTERM or SIGINT"),
        ("check", cmd_check, "validate the config and print the resolved services"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("-c", "--config", metavar="FILE",
                         help=f"config file (default: $NETD_CONFIG or {DEFAULT_CONFIG})")
        sub.set_defaults(func=func)
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


def cmd_check(config_path: str) -> int:
    """Validate the config; print each service with its resolved addresses."""
    config = _load(config_path)
    if config is None:
        return EX_CONFIG
    print(f"{config.path}: OK, {len(config.services)} service(s)")
    width = max((len(s.name) for s in config.services), default=0)
    for service in config.services:
        addresses = ", ".join(
            f"{a} ({service.mode(a)})" for a in service.listen)
        print(f"  {service.name:<{width}}  {addresses}  {service.handler}")
    return EX_OK


def cmd_run(config_path: str) -> int:
    """Serve in the foreground until SIGTERM or SIGINT."""
    config = _load(config_path)
    if config is None:
        return EX_CONFIG
    log = open_log(config.log.to, config.log.syslog_address, config.log.facility,
                   config.log.level)
    _no_inherited_fds()
    supervisor = Supervisor(config, log)
    try:
        supervisor.bind_all()
    except BindError as e:
        log.event("error", "err", msg=e.strerror)
        print(f"netd: {e.strerror}", file=sys.stderr)
        return EX_OSERR
    return supervisor.run()


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
