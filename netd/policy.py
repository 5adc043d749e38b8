"""Pure decisions on connections: access lists, instance and per-source limits, rate.

Nothing here reads a clock, a socket or a process: the supervisor passes in what it
knows (the peer, its counters, `time.monotonic()`) and acts on the answer. Two
questions are asked at two moments:

- before taking a connection from a listener's backlog, `check_rate` says whether the
  service must be suspended (xinetd's cps: the waiting connections stay queued);
- once the peer is known, `decide` says Accept or Refuse(reason), which costs no fork.

User and group names in access lists are resolved once, when the list is parsed.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RefuseReason = Literal["access", "instances", "per_source", "max_children"]

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel
MAX_RATE_COUNT = 10_000
RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")
RATE_WINDOWS_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class AccessError(ValueError):
    """Bad access-list entries: `problems` holds (list name, index, message) for each."""

    def __init__(self, problems: list[tuple[str, int, str]]) -> None:
        super().__init__("; ".join(f"{key}[{i}]: {message}" for key, i, message in problems))
        self.problems = problems


@dataclass(frozen=True)
class Rules:
    """One side of an access list: networks for IP peers, uids and gids for unix peers."""

    networks: tuple[IPNetwork, ...] = ()
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def matches_ip(self, ip: IPAddress) -> bool:
        """True when `ip` (already in its IPv4 form if v4-mapped) is in one of the networks."""
        return any(ip in network for network in self.networks)

    def matches_unix(self, uid: int, gid: int) -> bool:
        """True when the peer's uid or gid is listed."""
        return uid in self.uids or gid in self.gids

    @property
    def has_unix(self) -> bool:
        """True when any uid or gid is listed."""
        return bool(self.uids or self.gids)


@dataclass(frozen=True)
class AccessList:
    """Who may connect: deny wins; an empty allow (for the peer's kind) lets everyone in."""

    # IP rules apply to IP peers, uid/gid rules to unix-socket peers. v4-mapped IPv6
    # addresses and networks (::ffff:10.0.0.0/104) are kept as the IPv4 ones, so a v4
    # client is matched alike on a v4 and on a dual-stack socket.
    allow: Rules = Rules()
    deny: Rules = Rules()

    @classmethod
    def parse(cls, allow: list[str], deny: list[str]) -> AccessList:
        """Entries are addresses, CIDR networks, uid:N, gid:N, user:NAME or group:NAME."""
        problems: list[tuple[str, int, str]] = []
        sides = []
        for key, entries in (("allow", allow), ("deny", deny)):
            networks: list[IPNetwork] = []
            uids: set[int] = set()
            gids: set[int] = set()
            for i, entry in enumerate(entries):
                try:
                    _add_entry(entry, networks, uids, gids)
                except ValueError as e:
                    problems.append((key, i, str(e)))
            sides.append(Rules(tuple(networks), frozenset(uids), frozenset(gids)))
        if problems:
            raise AccessError(problems)
        return cls(allow=sides[0], deny=sides[1])

    @property
    def restricts_ip(self) -> bool:
        """True when some IP peer could be refused (any network listed at all)."""
        return bool(self.allow.networks or self.deny.networks)

    def permits_ip(self, ip: str) -> bool:
        """Whether an IP peer (v4, v6 or v4-mapped v6) may connect; ValueError if not an IP."""
        address = ip_form(ip)
        if self.deny.matches_ip(address):
            return False
        return not self.allow.networks or self.allow.matches_ip(address)

    def permits_unix(self, uid: int | None, gid: int | None) -> bool:
        """Whether a unix-socket peer may connect; unknown credentials pass only without rules."""
        if uid is None or gid is None:
            return not (self.allow.has_unix or self.deny.has_unix)
        if self.deny.matches_unix(uid, gid):
            return False
        return not self.allow.has_unix or self.allow.matches_unix(uid, gid)


def _add_entry(entry: str, networks: list[IPNetwork], uids: set[int], gids: set[int]) -> None:
    """Parse one access-list entry into the right collection; ValueError says what is wrong."""
    text = entry.strip()
    kind, colon, value = text.partition(":")
    if colon and kind in ("uid", "gid", "user", "group"):
        if kind == "uid":
            uids.add(_numeric_id(value, "uid"))
        elif kind == "gid":
            gids.add(_numeric_id(value, "gid"))
        elif kind == "user":
            try:
                uids.add(pwd.getpwnam(value).pw_uid)
            except KeyError:
                raise ValueError(f"no user named '{value}' on this system") from None
        else:
            try:
                gids.add(grp.getgrnam(value).gr_gid)
            except KeyError:
                raise ValueError(f"no group named '{value}' on this system") from None
        return
    networks.append(_network(text))


def _numeric_id(value: str, kind: str) -> int:
    if not value.isascii() or not value.isdigit() or int(value) > MAX_ID:
        raise ValueError(f"'{kind}:{value}' needs a number 0-{MAX_ID} after '{kind}:'")
    return int(value)


def _network(text: str) -> IPNetwork:
    """An address or CIDR network, v4-mapped IPv6 ones turned into IPv4."""
    if "%" in text:
        raise ValueError(f"'{text}': zone ids (%IFACE) cannot be matched; remove it")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"'{text}' is not an IP address, a CIDR network, uid:N, gid:N, user:NAME"
                f" or group:NAME (host names are not resolved)") from e
        raise ValueError(f"'{text}' has host bits set; did you mean '{loose}'?") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(V4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def ip_form(ip: str) -> IPAddress:
    """The address in `ip`, with a v4-mapped IPv6 address as the IPv4 one it stands for."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Rate:
    """At most `count` connections in any `window_s` seconds (written 50/s, 300/m, 1000/h)."""

    count: int
    window_s: float


def parse_rate(text: str) -> Rate:
    """The Rate in `text` such as 50/s, 300/m or 1000/h; ValueError says what is wrong."""
    match = RATE.match(text)
    if match is None:
        raise ValueError(f"'{text}' is not a rate (like 50/s, 300/m or 1000/h)")
    count = int(match.group(1))
    if not 1 <= count <= MAX_RATE_COUNT:
        raise ValueError(f"'{text}': the count must be 1-{MAX_RATE_COUNT} per window;"
                         " for more, use a shorter unit")
    return Rate(count, RATE_WINDOWS_S[match.group(2)])


@dataclass(frozen=True)
class Limits:
    """A service's bounds; None means unbounded."""

    instances: int | None = None
    per_source: int | None = None
    rate: Rate | None = None
    rate_pause_s: float = 10.0


class RateWindow:
    """The recent arrivals of one service: never more than rate.count in any rate.window_s."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self.arrivals: deque[float] = deque(maxlen=rate.count)

    def full(self, now_s: float) -> bool:
        """True when one more arrival at `now_s` would exceed the rate."""
        # Compared as free_at_s computes it, so the window has room at exactly that time.
        while self.arrivals and self.free_at_s() <= now_s:
            self.arrivals.popleft()
        return len(self.arrivals) >= self.rate.count

    def record(self, now_s: float) -> None:
        """Count one connection taken from the backlog at `now_s` (monotonic seconds)."""
        self.arrivals.append(now_s)

    def free_at_s(self) -> float:
        """When the oldest arrival leaves the window, making room for one more."""
        return self.arrivals[0] + self.rate.window_s


@dataclass
class Counters:
    """One service's running children, in all and per source (see `source_key`)."""

    children: int = 0
    by_source: dict[str, int] = field(default_factory=dict)

    def started(self, source: str | None) -> None:
        """A child started for a connection from `source` (None: not counted per source)."""
        self.children += 1
        if source is not None:
            self.by_source[source] = self.by_source.get(source, 0) + 1

    def ended(self, source: str | None) -> None:
        """That child exited; sources whose count falls to zero are forgotten."""
        self.children = max(0, self.children - 1)
        if source is not None and source in self.by_source:
            if self.by_source[source] <= 1:
                del self.by_source[source]
            else:
                self.by_source[source] -= 1

    def from_source(self, source: str | None) -> int:
        """How many children serve `source` now."""
        return 0 if source is None else self.by_source.get(source, 0)


@dataclass(frozen=True)
class UnixPeer:
    """A unix-socket peer's credentials (SO_PEERCRED); None when the kernel gave none."""

    uid: int | None
    gid: int | None


Peer = str | UnixPeer  # an IP address as text, or a unix-socket peer


def source_key(peer: Peer) -> str | None:
    """What per_source counts by: the IP (v4-mapped as IPv4), or uid:N for unix peers."""
    if isinstance(peer, UnixPeer):
        return None if peer.uid is None else f"uid:{peer.uid}"
    if ":" not in peer:
        return peer  # accept() spells an IPv4 address one way: no parsing per connection
    return str(ip_form(peer))


@dataclass(frozen=True)
class Accept:
    """Serve the connection."""


@dataclass(frozen=True)
class Refuse:
    """Close the connection without a child, logging event=refuse reason=`reason`."""

    reason: RefuseReason


@dataclass(frozen=True)
class Suspend:
    """Stop accepting on the service until `until_s` (monotonic); connections stay queued."""

    until_s: float


def check_rate(window: RateWindow | None, limits: Limits, now_s: float) -> Suspend | None:
    """Before accepting: Suspend when one more connection now would exceed the rate."""
    # The pause lasts rate_pause_s and at least until the window has room again, so a
    # resumed service can always take the connection that is waiting.
    if window is None or not window.full(now_s):
        return None
    return Suspend(max(now_s + limits.rate_pause_s, window.free_at_s()))


def decide(access: AccessList, limits: Limits, counters: Counters, peer: Peer,
           all_children: int, max_children: int | None) -> Accept | Refuse:
    """Accept or Refuse a connection from `peer`; all_children counts every service's."""
    # The most specific reason wins: access, per_source, instances, max_children.
    permitted = (access.permits_unix(peer.uid, peer.gid) if isinstance(peer, UnixPeer)
                 else not access.restricts_ip or access.permits_ip(peer))
    if not permitted:
        return Refuse("access")
    per_source = limits.per_source
    if per_source is not None and counters.from_source(source_key(peer)) >= per_source:
        return Refuse("per_source")
    if limits.instances is not None and counters.children >= limits.instances:
        return Refuse("instances")
    if max_children is not None and all_children >= max_children:
        return Refuse("max_children")
    return Accept()
