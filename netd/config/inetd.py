"""Reading inetd.conf: each line becomes a service body in netd's own keys.

The lines are what Debian's update-inetd writes (openbsd-inetd's format, inetd.conf(5)):

    [HOST[,HOST...]:]SERVICE  SOCKET-TYPE  PROTOCOL  WAIT[.MAX]  USER[.GROUP|:GROUP]
        PROGRAM  [ARGV...]

A line becomes the same mapping a YAML service would be (listen, exec, program, user,
group, wait, limits), so netd.config.validate checks it with the very helpers it uses
for YAML, and `netd import` writes it out as YAML. Nothing here resolves users or
programs: that is validation's job.

- `#<off>#` lines are services a package added disabled: known, listed, not served;
- other comments (`#:GROUP:` headings included) and blank lines are skipped;
- a line holding only `HOST:` sets the host of the lines after it (`*:` resets it);
- a line netd cannot serve (RPC, raw sockets, a malformed line) carries its reason.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from netd.config.model import SERVICE_NAME
from netd.config.yamlsource import check_trusted
from netd.handlers.builtins import BUILTINS

DISABLED_MARK = "#<off>#"
FIELDS = "SERVICE SOCKET-TYPE PROTOCOL WAIT USER PROGRAM [ARGV...]"
# inetd.conf's protocol -> (netd scheme, which families: "" both, "4", "6")
PROTOCOLS = {"tcp": ("tcp", ""), "tcp4": ("tcp", "4"), "tcp6": ("tcp", "6"),
             "udp": ("udp", ""), "udp4": ("udp", "4"), "udp6": ("udp", "6"),
             "unix": ("unix", "")}
SOCKET_TYPES = {"stream": ("tcp", "unix"), "dgram": ("udp", "unix")}


@dataclass(frozen=True)
class InetdLine:
    """One service line of an inetd.conf file.

    `body` is the service in netd's keys when the line can be served; otherwise
    `problem` says why not. `disabled` lines (`#<off>#`) are known but not served.
    `notes` are differences worth saying that do not stop the line.
    """

    path: str
    line: int
    name: str
    text: str
    disabled: bool = False
    body: dict[str, Any] | None = None
    problem: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_inetd(path: str, text: str) -> list[InetdLine]:
    """Every service line of the inetd.conf `text` (read from `path`), in order."""
    lines: list[InetdLine] = []
    default_hosts: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        disabled = stripped.startswith(DISABLED_MARK)
        if disabled:
            stripped = stripped[len(DISABLED_MARK):].strip()
        elif stripped.startswith("#"):
            continue
        if not stripped:
            continue
        fields = stripped.split()
        if len(fields) == 1 and fields[0].endswith(":") and not disabled:
            host = fields[0][:-1]
            default_hosts = [] if host == "*" else host.split(",")
            continue
        lines.append(parse_line(path, number, fields, default_hosts, disabled))
    return lines


def parse_line(path: str, number: int, fields: list[str], default_hosts: list[str],
               disabled: bool = False) -> InetdLine:
    """One inetd.conf line, split into `fields`, as an InetdLine."""
    text = " ".join(fields)
    hosts, _, service = fields[0].rpartition(":")
    unix = len(fields) > 2 and fields[2] == "unix"
    # rstatd/1-5 (an RPC service and its versions) is named rstatd; a unix socket's
    # service field is its path.
    name = os.path.basename(fields[0]) if unix else service.partition("/")[0]
    name = name or fields[0]
    try:
        body, notes = _body(fields, hosts.split(",") if hosts else default_hosts)
    except ValueError as e:
        return InetdLine(path, number, name, text, disabled, problem=str(e))
    return InetdLine(path, number, name, text, disabled, body=body, notes=tuple(notes))


Body = tuple[str, dict[str, Any], InetdLine]


def service_bodies(lines: list[InetdLine]) -> tuple[list[Body], list[str]]:
    """(service name, body, first line) of every enabled line that can be served, and a
    FILE:LINE message for each line that cannot (or is served with a difference).

    Lines of one name that differ only in where they listen (tcp and udp of a builtin,
    tcp4 and tcp6) are one service; lines of one name that run different things are
    named NAME-PROTOCOL (echo-tcp, echo-udp).
    """
    by_name: dict[str, list[InetdLine]] = {}
    messages: list[str] = []
    for line in lines:
        if line.disabled:
            continue
        messages.extend(f"{line.where}: {line.name}: {note}" for note in line.notes)
        if line.body is None:
            messages.append(f"{line.where}: {line.name}: {line.problem}; line not served")
        elif not SERVICE_NAME.match(line.name):
            messages.append(f"{line.where}: {line.name}: not usable as a service name "
                            "(letters, digits, '.', '_' and '-'); line not served")
        else:
            by_name.setdefault(line.name, []).append(line)
    bodies: list[Body] = []
    for name, group in by_name.items():
        first = group[0].body or {}
        rest = {k: v for k, v in first.items() if k != "listen"}
        if all({k: v for k, v in (line.body or {}).items() if k != "listen"} == rest
               for line in group):
            listen = [spec for line in group for spec in (line.body or {})["listen"]]
            bodies.append((name, {**first, "listen": listen}, group[0]))
            continue
        seen: dict[str, InetdLine] = {}
        for line in group:
            split = f"{name}-{line.text.split()[2]}"
            if split in seen:
                messages.append(f"{line.where}: {name}: another {split} line at "
                                f"{seen[split].where} comes first; line not served")
                continue
            seen[split] = line
            bodies.append((split, line.body or {}, line))
    return bodies, messages


def _body(fields: list[str], hosts: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The netd service body of a line; ValueError says why the line cannot be served."""
    if len(fields) < 6:
        raise ValueError(f"expected at least 6 fields ({FIELDS}), got {len(fields)}")
    service, socket_type, protocol, wait_field, user_field, program = fields[:6]
    if protocol != "unix":
        service = service.rpartition(":")[2]
    argv = fields[6:]
    notes: list[str] = []
    if protocol.startswith("rpc/"):
        raise ValueError(f"{protocol}: RPC services must register with rpcbind (portmap), "
                         "which netd does not do")
    if socket_type not in SOCKET_TYPES:
        raise ValueError(f"socket type '{socket_type}' is not supported (netd serves "
                         "stream and dgram; raw, rdm and seqpacket need inetd)")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol '{protocol}' is not supported (expected one of "
                         f"{', '.join(PROTOCOLS)}, or rpc/... which netd does not serve)")
    scheme, family = PROTOCOLS[protocol]
    if scheme not in SOCKET_TYPES[socket_type]:
        raise ValueError(f"socket type {socket_type} does not go with protocol {protocol}")
    wait, rate = _wait(wait_field)
    body: dict[str, Any] = {"listen": _listen(service, socket_type, scheme, family, hosts)}
    if program == "internal":
        if service not in BUILTINS:
            raise ValueError(f"internal service '{service}' is not one of netd's builtins "
                             f"({', '.join(BUILTINS)})")
        body["builtin"] = service
    else:
        if socket_type == "dgram" and not wait:
            raise ValueError("dgram with nowait: netd hands a datagram socket only to one "
                             "child at a time (wait)")
        if not argv or argv[0] == program:
            body["exec"] = argv or [program]
        else:
            body["exec"] = argv
            body["program"] = program
        body["wait"] = wait
    body.update(_identity(user_field))
    if rate is not None:
        if wait and program != "internal":
            notes.append(f"{wait_field}: netd does not rate-limit wait-mode services; "
                         "served without the limit")
        else:
            body["limits"] = {"rate": f"{rate}/m"}
    return body, notes


def _listen(service: str, socket_type: str, scheme: str, family: str,
            hosts: list[str]) -> list[str]:
    if scheme == "unix":
        return [f"{'unix' if socket_type == 'stream' else 'unix-dgram'}:{service}"]
    if not service:
        raise ValueError("no service name or port")
    if not hosts or hosts == ["*"]:
        host = {"": "", "4": "0.0.0.0", "6": "[::]"}[family]
        return [f"{scheme}://{host}:{service}"]
    specs = []
    for host in hosts:
        host = host.strip("[]")
        if host == "*":
            host = {"": "", "4": "0.0.0.0", "6": "::"}[family]
        try:
            version = ipaddress.ip_address(host).version if host else 0
        except ValueError:
            version = 0  # a host name: resolved when the config is loaded
        if family and version and str(version) != family:
            raise ValueError(f"address {host} is not IPv{family}, as {scheme}{family} says")
        specs.append(f"{scheme}://{f'[{host}]' if version == 6 else host}:{service}")
    return specs


def _wait(field: str) -> tuple[bool, int | None]:
    """wait or nowait, with openbsd-inetd's optional `.MAX` (spawns per minute)."""
    mode, dot, count = field.partition(".")
    if mode not in ("wait", "nowait"):
        raise ValueError(f"'{field}' is not wait or nowait (optionally .MAX)")
    if not dot:
        return mode == "wait", None
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"'{field}': the number after '.' is the most spawns per minute")
    return mode == "wait", int(count)


def _identity(field: str) -> dict[str, Any]:
    """USER, USER.GROUP or USER:GROUP as netd's user, group (and groups) keys."""
    user, group = field, None
    for separator in (":", "."):
        if separator in field:
            user, _, group = field.partition(separator)
            break
    found: dict[str, Any] = {"user": user}
    if group:
        found["group"] = group
        if user in ("root", "0"):
            # openbsd-inetd gives root with a group only that group (setgroups(1, &gid));
            # any other user gets its own groups as well (initgroups), netd's default.
            found["groups"] = [group]
    return found


def read_file(path: str) -> str:
    """The text of the inetd.conf at `path`, refused (YamlError) when others than its owner
    may change it, as a YAML config is; raises OSError when it cannot be read."""
    with open(path, "rb") as f:
        check_trusted(path, os.fstat(f.fileno()))
        return f.read().decode("utf-8", "replace")
