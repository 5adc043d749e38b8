"""Turn located YAML values into a frozen Config, collecting every error on the way.

Each error reads `FILE:LINE: dotted.key: message`; all of them are reported at once.
"""

from __future__ import annotations

import difflib
import glob
import importlib
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, cast

from netd.config.addresses import AddressError, parse_address
from netd.config.identity import (
    DEFAULT_USER,
    forget_accounts,
    member_of,
    parse_limit,
    parse_nice,
    parse_umask,
    resolve_group,
    resolve_user,
)
from netd.config.inetd import InetdLine, read_file, read_inetd, service_bodies
from netd.config.model import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_CHILDREN,
    DEFAULT_PATH,
    SERVICE_NAME,
    Address,
    Config,
    DaemonConfig,
    Disabled,
    Identity,
    LogConfig,
    ProxyProtocol,
    Service,
    SocketFile,
)
from netd.config.yamlsource import Mapping, Sequence, Where, YamlError, load_file, located
from netd.handlers.builtins import BUILTINS
from netd.logs import FACILITIES, SEVERITIES
from netd.policy import AccessError, AccessList, Limits, parse_rate

TOP_KEYS = ("log", "daemon", "include", "inetd", "defaults", "services")
DAEMON_KEYS = ("pidfile", "control", "stop_timeout", "max_children")
ACCESS_KEYS = ("allow", "deny")
LIMIT_KEYS = ("instances", "per_source", "rate", "rate_pause")
PROXY_KEYS = ("from", "timeout")
LOG_KEYS = ("to", "syslog_address", "facility", "level")
HANDLER_KEYS = ("builtin", "exec", "python")
IDENTITY_KEYS = ("user", "group", "groups", "umask", "cwd", "chroot", "nice", "rlimits")
DEFAULTABLE_KEYS = ("wait", "env", "passenv", "stderr", "timeout", "max_duration", "backlog",
                    "access", "limits", "log_connections", *IDENTITY_KEYS)
SERVICE_KEYS = ("listen", *HANDLER_KEYS, "program", "disable", "workers", "threads", "socket",
                "proxy_protocol", "nodelay", "keepalive", *DEFAULTABLE_KEYS)
CONNECTION_LINES = ("accept", "exit")
SOCKET_KEYS = ("user", "group", "mode")
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

class ConfigError(Exception):
    """A configuration that cannot be used: `errors` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors

@dataclass
class _Errors:
    items: list[str]

    def add(self, where: Where, key: str, message: str) -> None:
        self.items.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")


@dataclass
class _Found:
    """What a config serves, what it names but does not serve, and what to say about it."""

    services: list[Service] = field(default_factory=list)
    disabled: list[Disabled] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

def load_config(path: str) -> Config:
    """Read, include, merge and validate the config at `path`; raises ConfigError."""
    forget_accounts()
    errors = _Errors([])
    path = os.path.abspath(path)
    root = _load_mapping(path, errors)
    if root is None:
        raise ConfigError(errors.items)
    _check_keys(root, TOP_KEYS, "", errors)
    log = _log_config(root, errors)
    daemon = _daemon_config(root, path, errors)
    sources = _service_sources(root, path, errors)
    defaults = _defaults(root, errors)
    found = _Found()
    for name, (body, where) in sources.items():
        if _disabled(body, f"services.{name}.", errors):
            found.disabled.append(_disabled_service(name, body, where, defaults, found))
            continue
        service = _service(name, body, where, defaults, errors)
        if service is not None:
            found.services.append(service)
    _inetd_services(root, path, sources, defaults, errors, found)
    if errors.items:
        raise ConfigError(errors.items)
    return Config(path=path, log=log, daemon=daemon, services=tuple(found.services),
                  disabled=tuple(found.disabled), warnings=tuple(found.warnings))

def service_problems(name: str, body: dict[str, Any], where: Where) -> list[str]:
    """What validation finds wrong with one service `body` (netd's keys, as a YAML
    service would have them); empty when netd would serve it."""
    problems = _Errors([])
    empty = Mapping()
    empty.where, empty.key_where = where, {}
    _service(name, located(body, where), where, empty, problems, prefix=f"{name}.")
    return problems.items


def load_daemon_config(path: str) -> DaemonConfig:
    """Only the `daemon:` section (where the running netd's pidfile and control socket
    are), so that `netd stop` and `status` find it while the rest of the file is broken,
    even when that is not YAML; the default paths when the section cannot be read."""
    path = os.path.abspath(path)
    root = _load_mapping(path, _Errors([])) or _load_mapping(path, _Errors([]), only="daemon")
    if root is None:
        return DaemonConfig.default()
    return _daemon_config(root, path, _Errors([]))


def _load_mapping(path: str, errors: _Errors, only: str | None = None) -> Mapping | None:
    try:
        value = load_file(path, only)
    except YamlError as e:
        errors.add(e.where, "", e.message)
        return None
    except OSError as e:
        errors.items.append(f"{path}: cannot read: {e.strerror}")
        return None
    if value is None:
        empty = Mapping()
        empty.where, empty.key_where = Where(path, 1), {}
        return empty
    if not isinstance(value, Mapping):
        errors.add(Where(path, 1), "", f"expected a mapping of keys, got {_kind(value)}")
        return None
    return value

def _check_keys(mapping: Mapping, allowed: tuple[str, ...], prefix: str, errors: _Errors) -> None:
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            also = (f"; did you mean '{hint[0]}'?" if hint
                    else f" (expected one of: {', '.join(allowed)})")
            errors.add(mapping.key_where[key], prefix + key, f"unknown key{also}")

def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"

def _get(mapping: Mapping, key: str, want: type | tuple[type, ...], dotted: str,
         errors: _Errors, what: str) -> Any:
    """mapping[key] if present and of type `want`; otherwise None (and an error if wrong)."""
    if key not in mapping:
        return None
    value = mapping[key]
    wants = want if isinstance(want, tuple) else (want,)
    # YAML's true/false are ints to isinstance; only a bool setting accepts them.
    if not isinstance(value, wants) or (isinstance(value, bool) and bool not in wants):
        errors.add(mapping.key_where[key], dotted, f"expected {what}, got {_kind(value)}")
        return None
    return value

def _section(root: Mapping, key: str, errors: _Errors) -> Mapping:
    # A section with everything under it commented out is empty, not an error.
    value = None if root.get(key) is None else _get(root, key, dict, key, errors, "a mapping")
    if value is None:
        empty = Mapping()
        empty.where, empty.key_where = root.where, {}
        return empty
    return cast(Mapping, value)

def _choice(mapping: Mapping, key: str, choices: tuple[str, ...], dotted: str,
            errors: _Errors) -> str | None:
    value: str | None = _get(mapping, key, str, dotted, errors, "a string")
    if value is not None and value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        also = f"; did you mean '{hint[0]}'?" if hint else ""
        errors.add(mapping.key_where[key], dotted,
                   f"'{value}' is not one of {', '.join(choices)}{also}")
        return None
    return value

def _log_config(root: Mapping, errors: _Errors) -> LogConfig:
    log = _section(root, "log", errors)
    _check_keys(log, LOG_KEYS, "log.", errors)
    default = LogConfig()
    to = _choice(log, "to", ("syslog", "stderr", "journal"), "log.to", errors) or default.to
    address = _get(log, "syslog_address", str, "log.syslog_address", errors, "a path or udp://host:port")
    facility = (_choice(log, "facility", tuple(FACILITIES), "log.facility", errors)
                or default.facility)
    level = _choice(log, "level", tuple(SEVERITIES), "log.level", errors) or default.level
    return LogConfig(to=cast(Any, to), syslog_address=address or default.syslog_address,
                     facility=facility, level=level)

def _daemon_config(root: Mapping, path: str, errors: _Errors) -> DaemonConfig:
    section = _section(root, "daemon", errors)
    _check_keys(section, DAEMON_KEYS, "daemon.", errors)
    default = DaemonConfig.default()
    base = os.path.dirname(path)
    files = {}
    for key in ("pidfile", "control"):
        value = _get(section, key, str, f"daemon.{key}", errors, "a file path")
        files[key] = os.path.join(base, value) if value else getattr(default, key)
    stop_timeout_s = _duration_setting("stop_timeout", section, section, "daemon.", errors)
    max_children = _bound(section, "max_children", DEFAULT_MAX_CHILDREN, "daemon.", errors)
    return DaemonConfig(pidfile=files["pidfile"], control=files["control"],
                        stop_timeout_s=default.stop_timeout_s if stop_timeout_s is None
                        else stop_timeout_s, max_children=max_children)


def _service_sources(root: Mapping, path: str, errors: _Errors) -> dict[str, tuple[Mapping, Where]]:
    """Every service body by name, from the main file then the includes in sorted order."""
    sources: dict[str, tuple[Mapping, Where]] = {}
    _collect_services(root, "services", sources, errors)
    includes = _get(root, "include", (list, str), "include", errors, "a list of globs")
    if includes is None:
        return sources
    patterns = [includes] if isinstance(includes, str) else includes
    base = os.path.dirname(path)
    for i, pattern in enumerate(patterns):
        where = root.key_where["include"] if isinstance(includes, str) else includes.item_where[i]
        if not isinstance(pattern, str):
            errors.add(where, f"include[{i}]", f"expected a glob string, got {_kind(pattern)}")
            continue
        for file in sorted(glob.glob(os.path.join(base, pattern))):
            if file == path or os.path.isdir(file):
                continue
            included = _load_mapping(file, errors)
            if included is None:
                continue
            _check_keys(included, ("services",), "", errors)
            _collect_services(included, "services", sources, errors)
    return sources

def _collect_services(doc: Mapping, key: str, sources: dict[str, tuple[Mapping, Where]],
                      errors: _Errors) -> None:
    if doc.get(key) is None:
        return  # absent, or every service in it commented out
    services = _get(doc, key, dict, key, errors, "a mapping of service names")
    for name, body in (services or {}).items():
        where = services.key_where[name]
        if not SERVICE_NAME.match(name):
            errors.add(where, f"services.{name}",
                       "a service name is letters, digits, '.', '_' and '-'")
            continue
        if name in sources:
            errors.add(where, f"services.{name}",
                       f"service '{name}' is defined twice (also at {sources[name][1]})")
            continue
        if not isinstance(body, Mapping):
            errors.add(where, f"services.{name}", f"expected a mapping, got {_kind(body)}")
            continue
        sources[name] = (body, where)

def _disabled(body: Mapping, prefix: str, errors: _Errors) -> bool:
    """True when the service says `disable: true`."""
    return bool(_get(body, "disable", bool, prefix + "disable", errors, "true or false"))


def _disabled_service(name: str, body: Mapping, where: Where, defaults: Mapping,
                      found: _Found) -> Disabled:
    """A disabled service is checked like any other, but what is wrong with it is a
    warning: it is not served, so it cannot break the config (its program may not be
    installed yet)."""
    problems = _Errors([])
    service = _service(name, body, where, defaults, problems)
    found.warnings.extend(f"{problem} (service disabled)" for problem in problems.items)
    return Disabled(name, str(where), service.handler if service else "")


def _inetd_services(root: Mapping, path: str, sources: dict[str, tuple[Mapping, Where]],
                    defaults: Mapping, errors: _Errors, found: _Found) -> None:
    """The services of the inetd.conf files named by `inetd:`. A line netd cannot serve
    is a warning with its reason, never an error: one package's line must not stop
    the others. A name defined both in YAML and in inetd.conf is an error."""
    value = _get(root, "inetd", (list, str), "inetd", errors, "a list of inetd.conf paths")
    if value is None:
        return
    paths = [value] if isinstance(value, str) else value
    lines: list[InetdLine] = []
    for i, name in enumerate(paths):
        where = root.key_where["inetd"] if isinstance(value, str) else value.item_where[i]
        if not isinstance(name, str):
            errors.add(where, f"inetd[{i}]", f"expected a file path, got {_kind(name)}")
            continue
        file = os.path.join(os.path.dirname(path), name)
        try:
            lines.extend(read_inetd(file, read_file(file)))
        except FileNotFoundError:
            continue  # no inetd.conf yet: update-inetd creates it with the first service
        except YamlError as e:
            errors.add(e.where, "", e.message)
        except OSError as e:
            errors.add(where, f"inetd[{i}]", f"cannot read {file}: {e.strerror}")
    served: set[str] = set()
    bodies, notes = service_bodies(lines)
    found.warnings.extend(notes)
    for name, body, line in bodies:
        if name in sources:
            errors.add(Where(line.path, line.line), name,
                       f"service '{name}' is defined twice: in inetd.conf here and in "
                       f"YAML at {sources[name][1]}; remove one")
            continue
        problems = _Errors([])
        service = _service(name, located(body, Where(line.path, line.line)),
                           Where(line.path, line.line), defaults, problems, prefix=f"{name}.")
        found.warnings.extend(f"{problem}; line not served" for problem in problems.items)
        if service is not None:
            found.services.append(service)
            served.add(name)
    for line in lines:
        if line.disabled and line.name not in served and line.name not in sources \
                and all(d.name != line.name for d in found.disabled):
            found.disabled.append(Disabled(line.name, line.where, line.text))


def _defaults(root: Mapping, errors: _Errors) -> Mapping:
    defaults = _section(root, "defaults", errors)
    _check_keys(defaults, DEFAULTABLE_KEYS, "defaults.", errors)
    return defaults

def _service(name: str, body: Mapping, where: Where, defaults: Mapping,
             errors: _Errors, prefix: str | None = None) -> Service | None:
    prefix = prefix or f"services.{name}."
    _check_keys(body, SERVICE_KEYS, prefix, errors)
    before = len(errors.items)

    def setting(key: str, want: type | tuple[type, ...], what: str) -> tuple[Any, Mapping]:
        source = body if key in body else defaults
        label = prefix + key if key in body else "defaults." + key
        return _get(source, key, want, label, errors, what), source

    listen = _listen(body, prefix, where, errors)
    handlers = [k for k in HANDLER_KEYS if k in body]
    if len(handlers) != 1:
        message = ("needs one of builtin, exec or python" if not handlers
                   else f"has {' and '.join(handlers)}; exactly one of builtin, exec or python")
        errors.add(where, prefix.rstrip("."), message)
    env = _env(body, defaults, prefix, errors)
    builtin = argv = python = None
    if handlers == ["builtin"]:
        builtin = _choice(body, "builtin", tuple(BUILTINS), prefix + "builtin", errors)
    elif handlers == ["exec"]:
        argv = _argv(body, prefix, dict(env), errors, resolve="program" not in body)
    elif handlers == ["python"]:
        python = _python(body, prefix, errors)
    program = _program(body, prefix, dict(env), handlers, errors)

    wait, source = setting("wait", bool, "true or false")
    if wait and handlers == ["builtin"] and "wait" in body:
        errors.add(body.key_where["wait"], prefix + "wait",
                   "builtins serve streams nowait and datagrams in the supervisor; remove it")
    if wait is False and handlers != ["builtin"]:
        _no_dgram_nowait(name, listen or [], source, "wait" in body, prefix, errors)
    stderr_mode = None
    if "stderr" in body or "stderr" in defaults:
        source = body if "stderr" in body else defaults
        label = prefix + "stderr" if "stderr" in body else "defaults.stderr"
        # YAML reads a bare `null` as None: that is the documented `stderr: null`.
        stderr_mode = ("null" if source["stderr"] is None
                       else _choice(source, "stderr", ("log", "null"), label, errors))
    identity = _identity(body, defaults, prefix, errors)
    workers = _count(body, "workers", 1, 256, prefix, errors)
    threads = _count(body, "threads", 1, 1024, prefix, errors)
    if workers and handlers == ["exec"]:
        errors.add(body.key_where["workers"], prefix + "workers",
                   "is for builtin and python services; an exec service starts a program "
                   "per connection")
    for unsupported in ("proxy_protocol", "limits", "nodelay", "keepalive"):
        if workers and unsupported in body:
            errors.add(body.key_where[unsupported], prefix + unsupported,
                       "is not applied in workers mode (the workers accept by themselves); "
                       "use nowait mode for it")
    timeout_s = _duration_setting("timeout", body, defaults, prefix, errors)
    max_duration_s = _duration_setting("max_duration", body, defaults, prefix, errors)
    socket_file = _socket_file(body, prefix, errors)
    access = _access(*_setting_source("access", body, defaults, prefix), errors)
    limits = _limits(*_setting_source("limits", body, defaults, prefix), errors)
    proxy = _proxy(body, prefix, errors)
    if proxy is not None and listen and not all(a.scheme == "tcp" for a in listen):
        errors.add(body.key_where["proxy_protocol"], prefix + "proxy_protocol",
                   "is for tcp:// addresses only")
    tcp_options = {key: bool(_get(body, key, bool, prefix + key, errors, "true or false"))
                   for key in ("nodelay", "keepalive")}
    for key, wanted in tcp_options.items():
        if wanted and listen and not any(a.scheme == "tcp" for a in listen):
            errors.add(body.key_where[key], prefix + key, "is for tcp:// addresses")
    passenv = _passenv(*_setting_source("passenv", body, defaults, prefix), errors)
    log_accept, log_exit = _log_connections(
        *_setting_source("log_connections", body, defaults, prefix), errors)
    backlog, source = setting("backlog", int, "a number of connections")
    if backlog is not None and not 1 <= backlog <= 65535:
        errors.add(source.key_where["backlog"], prefix + "backlog", "must be 1-65535")
    if len(errors.items) > before or listen is None:
        return None
    return Service(
        name=name, listen=tuple(listen), kind=cast(Any, handlers[0]), builtin=builtin,
        argv=tuple(argv or ()), python=python,
        wait=None if handlers == ["builtin"] else wait, env=env,
        stderr=cast(Any, stderr_mode or "log"),
        timeout_s=300.0 if timeout_s is None else timeout_s,
        backlog=backlog or 128, identity=identity, workers=workers or 0,
        threads=threads or 16, max_duration_s=max_duration_s or None,
        socket_file=socket_file, access=access, limits=limits, proxy=proxy,
        program=program, passenv=passenv, log_accept=log_accept, log_exit=log_exit,
        origin=str(where), **tcp_options,
    )

def _no_dgram_nowait(name: str, listen: list[Address], source: Mapping, in_body: bool,
                     prefix: str, errors: _Errors) -> None:
    """`wait: false` on a datagram address is an error: a datagram socket has no
    connection to accept and hand to a child, so netd would spin on it."""
    datagram = next((a for a in listen if not a.is_stream), None)
    if datagram is None:
        return
    why = ("inetd's dgram nowait is not supported (a datagram socket has no connections "
           "to hand each to a child; in wait mode one child gets the socket itself)")
    if in_body:
        errors.add(source.key_where["wait"], prefix + "wait",
                   f"false cannot serve {datagram}: {why}; write `wait: true` or drop the "
                   "key (datagram addresses default to wait mode)")
    else:
        errors.add(source.key_where["wait"], "defaults.wait",
                   f"false cannot serve services.{name}, which listens on {datagram}: {why}; "
                   f"write `wait: true` in services.{name}")


def _setting_source(key: str, body: Mapping, defaults: Mapping,
                    prefix: str) -> tuple[Mapping, str, str]:
    """Where a defaultable setting comes from: (the mapping holding it, key, its label)."""
    if key in body:
        return body, key, prefix + key
    return defaults, key, "defaults." + key


def _subsection(source: Mapping, key: str, label: str, allowed: tuple[str, ...],
                errors: _Errors) -> Mapping | None:
    value = source.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        errors.add(source.key_where[key], label, f"expected a mapping, got {_kind(value)}")
        return None
    _check_keys(value, allowed, label + ".", errors)
    return value


def _address_list(section: Mapping, key: str, label: str, errors: _Errors) -> list[str]:
    value = section.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        errors.add(section.key_where[key], f"{label}.{key}",
                   "expected a list of addresses or networks")
        return []
    return [str(v) for v in value]


def _access(source: Mapping, key: str, label: str, errors: _Errors) -> AccessList:
    section = _subsection(source, key, label, ACCESS_KEYS, errors)
    if section is None:
        return AccessList()
    lists = {k: _address_list(section, k, label, errors) for k in ACCESS_KEYS}
    try:
        return AccessList.parse(lists["allow"], lists["deny"])
    except AccessError as e:
        for side, index, message in e.problems:
            items = section[side]
            where = items.item_where[index] if isinstance(items, Sequence) \
                else section.key_where[side]
            errors.add(where, f"{label}.{side}[{index}]", message)
        return AccessList()


def _limits(source: Mapping, key: str, label: str, errors: _Errors) -> Limits:
    section = _subsection(source, key, label, LIMIT_KEYS, errors)
    if section is None:
        return DEFAULT_LIMITS
    rate = None
    if "rate" in section:
        try:
            rate = parse_rate(str(section["rate"]))
        except ValueError as e:
            errors.add(section.key_where["rate"], f"{label}.rate", str(e))
    pause_s = _duration_setting("rate_pause", section, section, label + ".", errors)
    return Limits(instances=_bound(section, "instances", DEFAULT_LIMITS.instances, label + ".",
                                   errors),
                  per_source=_bound(section, "per_source", DEFAULT_LIMITS.per_source,
                                    label + ".", errors),
                  rate=rate, rate_pause_s=10.0 if pause_s is None else pause_s)


def _proxy(body: Mapping, prefix: str, errors: _Errors) -> ProxyProtocol | None:
    """`proxy_protocol: {from: [load balancers], timeout: 5s}`; `true` alone is refused,
    since a header from just anyone would let a client forge its own address."""
    label = prefix + "proxy_protocol"
    value = body.get("proxy_protocol")
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping) or "from" not in value:
        where = body.key_where["proxy_protocol"]
        errors.add(where, label, "name the load balancers allowed to send headers: "
                   "proxy_protocol: {from: [10.0.0.5, 10.0.1.0/24]}")
        return None
    section = _subsection(body, "proxy_protocol", label, PROXY_KEYS, errors)
    assert section is not None
    addresses = _address_list(section, "from", label, errors)
    if not addresses:
        errors.add(section.key_where["from"], label + ".from",
                   "name at least one load balancer address or network")
        return None
    try:
        trusted = AccessList.parse(addresses, [])
    except AccessError as e:
        for _, index, message in e.problems:
            errors.add(section.key_where["from"], f"{label}.from[{index}]", message)
        return None
    timeout_s = _duration_setting("timeout", section, section, label + ".", errors)
    return ProxyProtocol(trusted=trusted, timeout_s=5.0 if timeout_s is None else timeout_s)


def _socket_file(body: Mapping, prefix: str, errors: _Errors) -> SocketFile:
    section = body.get("socket")
    if section is None:
        return SocketFile()
    if not isinstance(section, Mapping):
        errors.add(body.key_where["socket"], prefix + "socket",
                   f"expected a mapping like {{user: www-data, mode: '0660'}}, "
                   f"got {_kind(section)}")
        return SocketFile()
    _check_keys(section, SOCKET_KEYS, prefix + "socket.", errors)
    parsed: dict[str, int] = {}
    for key, parse in (("user", lambda v: resolve_user(v)[1]), ("group", resolve_group),
                       ("mode", parse_umask)):
        if key in section:
            try:
                parsed[key] = parse(section[key])
            except ValueError as e:
                errors.add(section.key_where[key], f"{prefix}socket.{key}", str(e))
    return SocketFile(uid=parsed.get("user"), gid=parsed.get("group"), mode=parsed.get("mode"))


def _bound(body: Mapping, key: str, default: int | None, prefix: str,
           errors: _Errors) -> int | None:
    """A bound on children: a number, `unlimited` (None), or `default` when not given."""
    if key not in body:
        return default
    if body[key] == "unlimited":
        return None
    value: int | None = _get(body, key, int, prefix + key, errors, "a number or unlimited")
    if value is not None and not 1 <= value <= 1_000_000:
        errors.add(body.key_where[key], prefix + key, "must be 1-1000000, or unlimited")
        return None
    return value


def _count(body: Mapping, key: str, low: int, high: int, prefix: str,
           errors: _Errors) -> int | None:
    value: int | None = _get(body, key, int, prefix + key, errors, "a number")
    if value is not None and not low <= value <= high:
        errors.add(body.key_where[key], prefix + key, f"must be {low}-{high}")
        return None
    return value


def _identity(body: Mapping, defaults: Mapping, prefix: str, errors: _Errors) -> Identity:
    """Who the children run as. When netd runs as root, a service that names no user
    runs as `nobody`: root only when the config says `user: root`."""
    found: dict[str, Any] = {}
    for key in IDENTITY_KEYS:
        source, label = (body, prefix + key) if key in body else (defaults, "defaults." + key)
        if key not in source:
            continue
        value = source[key]
        if key == "rlimits" and isinstance(value, Mapping):
            found[key] = _rlimits(value, label, errors)
            continue
        try:
            found[key] = _identity_value(key, value)
        except ValueError as e:
            errors.add(source.key_where[key], label, str(e))
    user = found.get("user")
    if user is None and os.geteuid() == 0:
        user = resolve_user(DEFAULT_USER)
    name, uid, gid = user if user is not None else (None, None, None)
    gid = found.get("group", gid)
    groups = found.get("groups")
    if name is not None and gid is not None and groups is None:
        groups = member_of(name, gid)
    return Identity(user=name, uid=uid, gid=gid, groups=groups,
                    umask=found.get("umask"), cwd=found.get("cwd"), chroot=found.get("chroot"),
                    nice=found.get("nice"), rlimits=found.get("rlimits", ()))


def _identity_value(key: str, value: Any) -> Any:
    """One identity setting, parsed; raises ValueError saying what would be valid."""
    if key == "user":
        return resolve_user(value)
    if key == "group":
        return resolve_group(value)
    if key == "groups":
        if not isinstance(value, list):
            raise ValueError(f"expected a list of groups, got {_kind(value)}")
        return tuple(resolve_group(g) for g in value)
    if key == "umask":
        return parse_umask(value)
    if key == "nice":
        return parse_nice(value)
    if key in ("cwd", "chroot"):
        if not isinstance(value, str) or not os.path.isabs(value):
            raise ValueError(f"expected an absolute path, got {_kind(value)}")
        if key == "chroot" and not os.path.isdir(value):
            raise ValueError(f"directory '{value}' does not exist")
        return value
    raise ValueError(f"expected a mapping like {{nofile: 1024}}, got {_kind(value)}")


def _rlimits(section: Mapping, label: str, errors: _Errors) -> tuple[tuple[str, int, int], ...]:
    limits = []
    for name, value in section.items():
        try:
            limits.append(parse_limit(name, value))
        except ValueError as e:
            errors.add(section.key_where[name], f"{label}.{name}", str(e))
    return tuple(limits)


def _listen(body: Mapping, prefix: str, where: Where, errors: _Errors) -> list[Address] | None:
    if "listen" not in body:
        errors.add(where, prefix + "listen", "is required (for example tcp://127.0.0.1:7007)")
        return None
    value = body["listen"]
    specs: list[tuple[str, Where]]
    if isinstance(value, str):
        specs = [(value, body.key_where["listen"])]
    elif isinstance(value, Sequence) and value:
        specs = list(zip(value, value.item_where, strict=True))
    else:
        errors.add(body.key_where["listen"], prefix + "listen",
                   f"expected an address or a list of addresses, got {_kind(value)}")
        return None
    addresses: list[Address] = []
    for spec, spec_where in specs:
        if not isinstance(spec, str):
            errors.add(spec_where, prefix + "listen", f"expected an address, got {_kind(spec)}")
            continue
        try:
            addresses.extend(parse_address(spec))
        except AddressError as e:
            errors.add(spec_where, prefix + "listen", str(e))
    return addresses

def _env(body: Mapping, defaults: Mapping, prefix: str,
         errors: _Errors) -> tuple[tuple[str, str], ...]:
    merged: dict[str, str] = {}
    for source, label in ((defaults, "defaults.env"), (body, prefix + "env")):
        env = _get(source, "env", dict, label, errors, "a mapping of NAME: value")
        for key, value in (env or {}).items():
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                errors.add(env.key_where[key], f"{label}.{key}",
                           f"expected a string, got {_kind(value)}")
            elif "=" in key or "\0" in key or not key:
                errors.add(env.key_where[key], f"{label}.{key}", "not a valid variable name")
            else:
                merged[key] = str(value)
    return tuple(merged.items())

def _argv(body: Mapping, prefix: str, env: dict[str, str], errors: _Errors,
          resolve: bool = True) -> list[str] | None:
    """exec's argv; argv[0] resolved to the program's path unless `program` names it."""
    argv = _get(body, "exec", list, prefix + "exec", errors, "an argv list like [/bin/cat]")
    if argv is None:
        return None
    where = body.key_where["exec"]
    if not argv or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in argv):
        errors.add(where, prefix + "exec", "expected a non-empty list of strings")
        return None
    argv = [str(a) for a in argv]
    if not resolve:
        return argv
    program = _which(argv[0], env, where, prefix + "exec", errors)
    return None if program is None else [program, *argv[1:]]


def _which(name: str, env: dict[str, str], where: Where, label: str,
           errors: _Errors) -> str | None:
    """The absolute path of the program `name`, looked up on the service's PATH."""
    program = shutil.which(name, path=env.get("PATH", DEFAULT_PATH))
    if program is None:
        problem = "does not exist" if not os.path.exists(name) else "is not executable"
        errors.add(where, label, f"program '{name}' {problem}")
        return None
    return os.path.abspath(program)


def _program(body: Mapping, prefix: str, env: dict[str, str], handlers: list[str],
             errors: _Errors) -> str | None:
    """`program`: the file an exec service runs when exec's first item is only its
    argv[0] (inetd's program field, xinetd's NAMEINARGS: tcpd with argv[0] in.fingerd)."""
    name = _get(body, "program", str, prefix + "program", errors, "a program path")
    if name is None:
        return None
    where = body.key_where["program"]
    if handlers != ["exec"]:
        errors.add(where, prefix + "program", "goes with exec: it is the file run, and "
                   "exec's first item the argv[0] it is given")
        return None
    return _which(name, env, where, prefix + "program", errors)


def _passenv(source: Mapping, key: str, label: str, errors: _Errors) -> tuple[str, ...]:
    """Names of variables a child takes from netd's own environment (xinetd's passenv)."""
    value = source.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
            isinstance(v, str) and v and "=" not in v and "\0" not in v for v in value):
        errors.add(source.key_where[key], label, "expected a list of variable names like "
                   "[TZ, LANG]")
        return ()
    return tuple(value)


def _log_connections(source: Mapping, key: str, label: str,
                     errors: _Errors) -> tuple[bool, bool]:
    """Which of the accept and exit lines are logged at info (the others at debug):
    true (both, the default), false (neither) or a list of accept and exit."""
    value = source.get(key, True)
    if isinstance(value, bool):
        return value, value
    if isinstance(value, list) and all(v in CONNECTION_LINES for v in value):
        return "accept" in value, "exit" in value
    errors.add(source.key_where[key], label,
               f"expected true, false or a list of {' and '.join(CONNECTION_LINES)}, "
               f"got {_kind(value)}")
    return True, True

def _python(body: Mapping, prefix: str, errors: _Errors) -> str | None:
    spec: str | None = _get(body, "python", str, prefix + "python", errors, "module:function")
    if spec is None:
        return None
    where = body.key_where["python"]
    module_name, colon, function = spec.partition(":")
    if not colon or not module_name or not function:
        errors.add(where, prefix + "python", f"'{spec}' is not module:function")
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure of user code at import is a config error
        errors.add(where, prefix + "python",
                   f"cannot import module '{module_name}': {type(e).__name__}: {e}")
        return None
    target = getattr(module, function, None)
    if not callable(target):
        errors.add(where, prefix + "python",
                   f"module '{module_name}' has no function '{function}'")
        return None
    return spec

def _duration_setting(key: str, body: Mapping, defaults: Mapping, prefix: str,
                      errors: _Errors) -> float | None:
    source = body if key in body else defaults
    if key not in source:
        return None
    label = prefix + key if source is body else "defaults." + key
    value = source[key]
    seconds = parse_duration(value)
    if seconds is None:
        errors.add(source.key_where[key], label,
                   f"'{value}' is not a duration (like 10s, 500ms, 2m, 1h)")
    return seconds

def parse_duration(value: Any) -> float | None:
    """Seconds in `value` (10s, 500ms, 2m, 1h, or a number), or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = DURATION.match(value)
    if match is None:
        return None
    return float(match.group(1)) * DURATION_UNITS_S[match.group(2)]
