"""Reading xinetd configuration (xinetd.conf(5)) into netd service bodies, meaning kept.

What xinetd 2.3.15 does, not only what its manual says, decides each translation
(Debian's xinetd is that program; its source settles what the manual leaves open):

- only_from / no_access: a peer on no_access is refused, a peer on both lists is
  refused, and a given only_from (even an empty one) refuses whoever is not on it. That
  is netd's `access` (deny wins; allow restricts) except that an empty only_from lets
  nobody in, which netd writes as a deny of everything. `a.b.c.0` is a /24 (trailing
  zero octets are wildcards), `0.0.0.0` is every IPv4 peer, `a.b.{c,d}` is a list;
  host and domain names (matched by reverse DNS) and network names cannot be carried;
- `cps` is on by default (50 connections a second, then 10 s off), `groups` is `no`
  by default (no supplementary groups), a service runs its server with argv[0] the
  server's base name, or the first of server_args with NAMEINARGS;
- a service whose server is not executable, or whose user or group does not exist,
  is not served by xinetd ("DISABLING"): it is written with `disable: true`.

Every attribute that cannot be carried over is a warning naming its FILE:LINE.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from netd.handlers.builtins import BUILTINS

ATTRIBUTE = re.compile(r"^([A-Za-z_]+)\s*(\+=|-=|=)\s*(.*)$")
# Attributes whose values form a set (=, += and -=); in `defaults` they accumulate.
SET_ATTRIBUTES = {"only_from", "no_access", "log_on_success", "log_on_failure", "passenv",
                  "env", "disabled", "enabled"}
DEFAULT_CPS = ("50", "10")
EVERYONE = ["0.0.0.0/0", "::/0"]
RLIMITS = {"rlimit_as": "as", "rlimit_cpu": "cpu", "rlimit_files": "nofile"}
# What is not carried over, and why (attributes and flags netd has no counterpart for).
NOT_CARRIED = {
    "access_times": "netd has no time-of-day windows: the service is served at all times",
    "banner": "netd sends no banners", "banner_success": "netd sends no banners",
    "banner_fail": "netd sends no banners",
    "max_load": "netd does not refuse on load average",
    "deny_time": "netd has no SENSOR traps",
    "libwrap": "netd does not call libwrap (run the server through tcpd for hosts.allow)",
    "rlimit_data": "netd sets as, cpu, nofile, nproc, core and fsize limits only",
    "rlimit_rss": "netd sets as, cpu, nofile, nproc, core and fsize limits only",
    "rlimit_stack": "netd sets as, cpu, nofile, nproc, core and fsize limits only",
}
FLAGS_NOT_CARRIED = {
    "INTERCEPT": "netd does not filter a wait-mode server's packets",
    "IDONLY": "netd does not query the client's identd (RFC 1413)",
    "LABELED": "netd does not set SELinux contexts",
}
# Flags whose meaning netd has anyway: REUSE (always SO_REUSEADDR), NOLIBWRAP (netd
# never calls libwrap), NORETRY (netd does not retry a failed fork).
FLAGS_CARRIED = {"REUSE", "NOLIBWRAP", "NORETRY", "IPv4", "IPv6", "NAMEINARGS", "NODELAY",
                 "KEEPALIVE"}
UNSERVABLE_TYPES = {"RPC": "RPC services must register with rpcbind, which netd does not do",
                    "TCPMUX": "netd does not serve TCPMUX (RFC 1078)",
                    "TCPMUXPLUS": "netd does not serve TCPMUX (RFC 1078)"}


@dataclass
class Attribute:
    """One `name op values` line of a service or defaults entry."""

    name: str
    op: str
    values: list[str]
    where: str


@dataclass
class Entry:
    """A `service NAME { ... }` or `defaults { ... }` entry."""

    kind: str
    name: str
    where: str
    attributes: list[Attribute] = field(default_factory=list)


@dataclass
class Translated:
    """One xinetd service as a netd service body (None when it cannot be served)."""

    name: str
    where: str
    body: dict[str, Any] | None
    warnings: list[str]


class XinetdError(ValueError):
    """A file that is not xinetd configuration; the message names FILE:LINE."""


def read_entries(path: str, warnings: list[str], depth: int = 0) -> list[Entry]:
    """The entries of an xinetd file, following include and includedir as xinetd does."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    entries: list[Entry] = []
    current: Entry | None = None
    opened = False
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        words = text.split()
        if current is None:
            if words[0] in ("include", "includedir") and len(words) == 2 and depth < 8:
                entries.extend(_included(words[0], words[1], warnings, depth))
            elif words[0] == "service" and len(words) >= 2:
                current, opened = Entry("service", words[1], where), words[-1] == "{"
            elif words[0] == "defaults":
                current, opened = Entry("defaults", "defaults", where), words[-1] == "{"
            else:
                raise XinetdError(f"{where}: expected 'service NAME', 'defaults', 'include' "
                                  f"or 'includedir', got '{text}'")
            continue
        if not opened:
            if text != "{":
                raise XinetdError(f"{where}: expected '{{' after {current.where}")
            opened = True
            continue
        if text == "}":
            entries.append(current)
            current = None
            continue
        match = ATTRIBUTE.match(text)
        if match is None:
            warnings.append(f"{where}: '{text}' is not 'attribute = values'; xinetd skips it")
            continue
        current.attributes.append(Attribute(match.group(1), match.group(2),
                                            match.group(3).split(), where))
    if current is not None:
        raise XinetdError(f"{current.where}: entry not closed with '}}'")
    return entries


def _included(kind: str, target: str, warnings: list[str], depth: int) -> list[Entry]:
    if kind == "include":
        return read_entries(target, warnings, depth + 1)
    found: list[Entry] = []
    # xinetd skips names with a dot or ending in '~' (package backups, editor files).
    for name in sorted(os.listdir(target)):
        if "." not in name and not name.endswith("~"):
            found.extend(read_entries(os.path.join(target, name), warnings, depth + 1))
    return found


def translate(entries: list[Entry]) -> list[Translated]:
    """Every service entry as a netd body, with the defaults entry applied."""
    defaults = next((e for e in entries if e.kind == "defaults"), Entry("defaults", "", ""))
    return [_Service(entry, defaults).translate() for entry in entries
            if entry.kind == "service"]


class _Service:
    """The translation of one service entry: attribute lookups with xinetd's rules."""

    def __init__(self, entry: Entry, defaults: Entry) -> None:
        self.entry = entry
        self.defaults = defaults
        self.warnings: list[str] = []
        self.first: dict[str, Attribute] = {}
        for attribute in entry.attributes:
            # A single-valued attribute set twice keeps its first value, as in xinetd.
            self.first.setdefault(attribute.name, attribute)

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {self.entry.name}: {message}")

    def value(self, name: str) -> Attribute | None:
        """A single-valued attribute: the service's, else the defaults'."""
        return self.first.get(name) or next(
            (a for a in self.defaults.attributes if a.name == name), None)

    def word(self, name: str) -> str | None:
        attribute = self.value(name)
        return attribute.values[0] if attribute and attribute.values else None

    def values(self, name: str) -> tuple[list[str], Attribute | None] | None:
        """A set attribute after the defaults' values and the service's =, += and -=
        (None when neither gives it), and the service line that set it last."""
        result: list[str] | None = None
        last = None
        for attribute in self.defaults.attributes:
            if attribute.name == name:
                result = [*(result or []), *attribute.values]
        for attribute in self.entry.attributes:
            if attribute.name != name:
                continue
            last = attribute
            if attribute.op == "=":
                result = list(attribute.values)
            elif attribute.op == "+=":
                result = [*(result or []), *attribute.values]
            else:
                result = [v for v in (result or []) if v not in attribute.values]
        return None if result is None else (result, last)

    def where(self, name: str) -> str:
        attribute = self.value(name)
        return attribute.where if attribute else self.entry.where

    def translate(self) -> Translated:
        name = self.word("id") or self.entry.name
        try:
            body = self.body()
        except ValueError as e:
            self.warnings.append(f"{self.entry.where}: {self.entry.name}: {e}; not imported")
            body = None
        return Translated(name, self.entry.where, body, self.warnings)

    def body(self) -> dict[str, Any]:
        types = set((self.value("type") or Attribute("type", "=", [], "")).values)
        flags = set((self.value("flags") or Attribute("flags", "=", [], "")).values)
        for kind, why in UNSERVABLE_TYPES.items():
            if kind in types:
                raise ValueError(f"type {kind}: {why}")
        if "SENSOR" in flags:
            raise ValueError("flags SENSOR: a trap that bans whoever touches it; netd has "
                             "no such thing")
        if self.value("redirect") is not None:
            raise ValueError("redirect: netd does not forward connections to another host")
        socket_type, protocol = self.socket_type()
        wait_word = self.word("wait")
        if wait_word is None:
            raise ValueError("no wait attribute (xinetd requires one and disables the "
                             "service)")
        wait = wait_word == "yes"
        internal = "INTERNAL" in types
        body: dict[str, Any] = {"listen": self.listen(protocol, flags, types)}
        if internal:
            if self.entry.name not in BUILTINS:
                raise ValueError(f"internal service '{self.entry.name}' is not one of "
                                 f"netd's builtins ({', '.join(BUILTINS)})")
            body["builtin"] = self.entry.name
        else:
            self.handler(body, flags)
            body["wait"] = wait
        self.identity(body, internal)
        self.environment(body)
        access = self.access()
        if access:
            body["access"] = access
        self.limits(body, wait or socket_type == "dgram")
        self.logging(body)
        for flag in sorted(flags - FLAGS_CARRIED):
            why = FLAGS_NOT_CARRIED.get(flag, "not an xinetd flag netd knows")
            self.warn(self.where("flags"), f"flags {flag}: not carried over ({why})")
        for flag, key in (("NODELAY", "nodelay"), ("KEEPALIVE", "keepalive")):
            if flag in flags and protocol == "tcp":
                body[key] = True
        self.not_carried()
        if "NOLIBWRAP" not in flags and not internal and _hosts_rules():
            self.warn(self.entry.where, "xinetd checks /etc/hosts.allow and /etc/hosts.deny "
                      "(libwrap) for this service, netd does not: write the rules as "
                      "access:, or run the server through /usr/sbin/tcpd")
        if self.word("disable") == "yes" or self.turned_off():
            body["disable"] = True
        return body

    def turned_off(self) -> bool:
        """Whether the defaults' `disabled` names this service, or an `enabled` list
        leaves it out."""
        ident = self.word("id") or self.entry.name
        lists = {a.name: [v for b in self.defaults.attributes if b.name == a.name
                          for v in b.values] for a in self.defaults.attributes}
        return ident in lists.get("disabled", []) or \
            ("enabled" in lists and ident not in lists["enabled"])

    def socket_type(self) -> tuple[str, str]:
        socket_type, protocol = self.word("socket_type"), self.word("protocol")
        if socket_type is None and protocol in ("tcp", "udp"):
            socket_type = "stream" if protocol == "tcp" else "dgram"
        if socket_type not in ("stream", "dgram"):
            raise ValueError(f"socket_type {socket_type or '(none)'}: netd serves stream "
                             "and dgram sockets only")
        protocol = protocol or ("tcp" if socket_type == "stream" else "udp")
        if (socket_type, protocol) not in (("stream", "tcp"), ("dgram", "udp")):
            raise ValueError(f"socket_type {socket_type} with protocol {protocol} is not "
                             "served by netd")
        return socket_type, protocol

    def listen(self, protocol: str, flags: set[str], types: set[str]) -> str:
        port = self.word("port")
        if port is None:
            if "UNLISTED" in types:
                raise ValueError("an UNLISTED service needs a port (xinetd disables it)")
            try:
                socket.getservbyname(self.entry.name, protocol)
            except OSError:
                raise ValueError(f"no port, and '{self.entry.name}' is not a {protocol} "
                                 "service in /etc/services") from None
            port = self.entry.name
        host = self.word("bind") or self.word("interface")
        if host is not None:
            try:
                host = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
            except ValueError:
                pass  # a host name: netd resolves it when it loads the config, as xinetd
        elif "IPv4" in flags and "IPv6" not in flags:
            host = "0.0.0.0"
        elif self.word("v6only") == "yes":
            host = "[::]"
        else:
            # xinetd's default: one IPv6 socket that takes IPv4 too (v6only = no); netd
            # listens on both families for an empty host.
            host = ""
        return f"{protocol}://{host}:{port}"

    def handler(self, body: dict[str, Any], flags: set[str]) -> None:
        server = self.word("server")
        if server is None:
            raise ValueError("no server attribute (xinetd requires one and disables the "
                             "service)")
        args = (self.value("server_args") or Attribute("", "=", [], "")).values
        if "NAMEINARGS" in flags:
            if not args:
                raise ValueError("flags NAMEINARGS without server_args (xinetd disables "
                                 "the service)")
            argv = list(args)
        else:
            argv = [os.path.basename(server), *args]
        body["program"] = server
        body["exec"] = argv
        if not os.access(server, os.X_OK):
            self.disable(body, self.where("server"), f"server {server} is not executable "
                         "here")

    def disable(self, body: dict[str, Any], where: str, why: str) -> None:
        self.warn(where, f"{why}: xinetd would not serve it (DISABLING); written with "
                  "disable: true")
        body["disable"] = True

    def identity(self, body: dict[str, Any], internal: bool) -> None:
        user, group = self.word("user"), self.word("group")
        if user is None and not internal:
            raise ValueError("no user attribute (xinetd requires one and disables the "
                             "service)")
        if user is not None:
            body["user"] = int(user) if user.isdigit() else user
        if group is not None:
            body["group"] = int(group) if group.isdigit() else group
        entry = _passwd(user)
        if user is not None and entry is None:
            self.disable(body, self.where("user"), f"no user '{user}' here")
        if group is not None and _group(group) is None:
            self.disable(body, self.where("group"), f"no group '{group}' here")
        if self.word("groups") == "yes":
            # initgroups(user, its own primary group): netd's default when the group is
            # the user's own; otherwise the list as initgroups gives it now.
            if entry is not None and group is not None and _group(group) != entry.pw_gid:
                gids = os.getgrouplist(entry.pw_name, entry.pw_gid)
                body["groups"] = sorted({grp.getgrgid(g).gr_name for g in gids})
        elif user is not None or group is not None:
            body["groups"] = []  # xinetd's default, groups = no: setgroups(0, NULL)
        umask = self.word("umask")
        if umask is not None:
            body["umask"] = umask
        nice = self.word("nice")
        if nice is not None:
            body["nice"] = int(nice)
        rlimits = {}
        for attribute, limit in RLIMITS.items():
            value = self.word(attribute)
            if value is not None:
                rlimits[limit] = "unlimited" if value == "UNLIMITED" else \
                    (int(value) if value.isdigit() else value)
        if rlimits:
            body["rlimits"] = rlimits

    def environment(self, body: dict[str, Any]) -> None:
        env = self.values("env")
        if env is not None:
            pairs = {}
            for item in env[0]:
                key, equals, value = item.partition("=")
                if not equals or not key:
                    self.warn(self.where("env"), f"env item '{item}' is not NAME=VALUE; "
                              "xinetd skips it")
                    continue
                pairs[key] = value
            if pairs:
                body["env"] = pairs
        passenv = self.values("passenv")
        if passenv is not None and passenv[0]:
            body["passenv"] = passenv[0]

    def access(self) -> dict[str, list[str]]:
        allow: list[str] = []
        deny: list[str] = []
        only_from = self.values("only_from")
        no_access = self.values("no_access")
        for found, into, attribute in ((only_from, allow, "only_from"),
                                       (no_access, deny, "no_access")):
            if found is None:
                continue
            for item in found[0]:
                networks, problem = xinetd_networks(item)
                if problem is not None:
                    self.warn(self.where(attribute), f"{attribute} {item}: {problem}")
                into.extend(n for n in networks if n not in into)
        if only_from is not None and not allow:
            # A given only_from with nothing netd can match lets nobody in; netd's
            # empty allow would let everyone in.
            deny = [*deny, *(n for n in EVERYONE if n not in deny)]
        result = {}
        if allow:
            result["allow"] = allow
        if deny:
            result["deny"] = deny
        return result

    def limits(self, body: dict[str, Any], waits: bool) -> None:
        limits: dict[str, Any] = {}
        for attribute, key in (("instances", "instances"), ("per_source", "per_source")):
            value = self.word(attribute)
            if value is not None and value != "UNLIMITED":
                limits[key] = int(value)
        cps = self.value("cps")
        count, pause = cps.values[:2] if cps is not None and len(cps.values) >= 2 \
            else DEFAULT_CPS
        if count != "0":
            limits["rate"] = f"{count}/s"
            limits["rate_pause"] = f"{pause}s"
        if waits:
            # netd counts and rate-limits the children of nowait services only: a
            # wait-mode (or datagram) service has one child at a time.
            for attribute in ("instances", "per_source", "cps"):
                if attribute in self.first:
                    self.warn(self.first[attribute].where, f"{attribute}: netd does not "
                              "apply it to a wait-mode or datagram service")
            return
        if limits:
            body["limits"] = limits

    def logging(self, body: dict[str, Any]) -> None:
        success = self.values("log_on_success")
        if success is not None:
            flags = set(success[0])
            for flag in sorted(flags & {"USERID", "TRAFFIC"}):
                self.warn(self.where("log_on_success"), f"log_on_success {flag}: netd does "
                          "not log it (no identd queries; no redirects)")
            # xinetd logs a START line when any flag is set, an EXIT line for EXIT or
            # DURATION; netd's accept and exit lines carry all their fields.
            accept, exit_line = bool(flags), bool(flags & {"EXIT", "DURATION"})
            if not (accept and exit_line):
                lines = [k for k, on in (("accept", accept), ("exit", exit_line)) if on]
                body["log_connections"] = lines or False
        failure = self.values("log_on_failure")
        if failure is not None:
            if "USERID" in failure[0]:
                self.warn(self.where("log_on_failure"), "log_on_failure USERID: netd does "
                          "not query the client's identd")
            if not failure[0]:
                self.warn(self.where("log_on_failure"), "log_on_failure is empty: netd "
                          "always logs refused connections (event=refuse)")
        log_type = self.value("log_type")
        if log_type is not None and log_type.values not in (["SYSLOG", "daemon"],
                                                            ["SYSLOG", "daemon", "info"]):
            self.warn(log_type.where, f"log_type {' '.join(log_type.values)}: netd logs "
                      "every service to the one target of its log: section (syslog, "
                      "daemon, info by default)")

    def not_carried(self) -> None:
        for attribute in self.entry.attributes:
            if attribute.name in NOT_CARRIED:
                self.warn(attribute.where, f"{attribute.name}: not carried over "
                          f"({NOT_CARRIED[attribute.name]})")
            elif attribute.name == "mdns" and attribute.values == ["yes"]:
                continue  # mDNS registration exists on Mac OS X only
            elif attribute.name not in KNOWN:
                self.warn(attribute.where, f"{attribute.name}: not an xinetd attribute "
                          "(xinetd ignores it too)")


KNOWN = {"id", "type", "flags", "disable", "socket_type", "protocol", "wait", "user", "group",
         "instances", "nice", "server", "server_args", "only_from", "no_access",
         "log_type", "log_on_success", "log_on_failure", "rpc_version", "rpc_number", "env",
         "passenv", "port", "redirect", "bind", "interface", "per_source", "cps", "groups",
         "umask", "mdns", "v6only", *NOT_CARRIED, *RLIMITS, *SET_ATTRIBUTES}


def xinetd_networks(item: str) -> tuple[list[str], str | None]:
    """The networks an only_from / no_access item matches in xinetd 2.3.15 (addr.c), as
    netd access entries, and why part of it cannot be carried (or None)."""
    if "{" in item:
        return _factorized(item)
    if "/" in item:
        address, _, bits = item.partition("/")
        try:
            network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
        except ValueError:
            return [], "not an address/mask; xinetd skips it"
        if network.version == 6 and network.prefixlen == 128:
            # addr.c takes an IPv6 /128 for a host name and never matches it.
            return [], "xinetd never matches an IPv6 /128 (it takes it for a host name); " \
                       "left out, as xinetd has it"
        return [_entry(network)], None
    if ":" in item:
        try:
            return [str(ipaddress.IPv6Address(item))], None  # matched exactly, :: too
        except ValueError:
            return [], "not an IPv6 address; xinetd skips it"
    if re.fullmatch(r"[0-9.]+", item):
        try:
            packed = socket.inet_aton(item)  # what getaddrinfo's numeric parsing accepts
        except OSError:
            return [], "not an IPv4 address; xinetd skips it"
        value = int.from_bytes(packed, "big")
        if value == 0:
            return ["0.0.0.0/0"], None
        zero_octets = 0
        while not value >> (8 * zero_octets) & 0xFF:
            zero_octets += 1
        network = ipaddress.IPv4Network((value, 32 - 8 * zero_octets))
        return [_entry(network)], None
    return [], ("a host or domain name (xinetd matches it by reverse DNS, netd matches "
                "addresses only); left out")


def _factorized(item: str) -> tuple[list[str], str | None]:
    """a.b.{c,d}: each listed value completes the address, the rest is a wildcard."""
    match = re.fullmatch(r"((?:\d+\.){0,3})\{(\d+(?:,\d+)*)\}", item)
    if match is None:
        return [], "not a factorized address like 10.1.{2,3}; xinetd refuses it"
    prefix = [int(p) for p in match.group(1).split(".") if p]
    networks = []
    for value in match.group(2).split(","):
        octets = [*prefix, int(value)]
        bits = 8 * len(octets)
        address = ".".join(str(o) for o in octets + [0] * (4 - len(octets)))
        try:
            networks.append(_entry(ipaddress.IPv4Network(f"{address}/{bits}")))
        except ValueError:
            return [], f"'{address}' is not an IPv4 address; xinetd refuses it"
    return networks, None


def _entry(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    full = network.max_prefixlen == network.prefixlen
    return str(network.network_address) if full else str(network)


def _hosts_rules() -> bool:
    """Whether /etc/hosts.allow or /etc/hosts.deny holds a rule (not only comments)."""
    for path in ("/etc/hosts.allow", "/etc/hosts.deny"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                if any(line.strip() and not line.lstrip().startswith("#") for line in f):
                    return True
        except OSError:
            continue
    return False


def _passwd(user: str | None) -> pwd.struct_passwd | None:
    if user is None:
        return None
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        return None


def _group(group: str) -> int | None:
    try:
        return (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
    except (KeyError, OverflowError):
        return None
