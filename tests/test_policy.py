"""netd.policy: access lists, limits, the rate window and decide(), as tables of cases
plus property-based tests (deny always wins, v4-mapped addresses are their IPv4 selves,
the rate window never admits more than N per window and agrees with a brute-force count).

Pure functions only: no sockets, no processes, time is a number the test passes in.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netd.peer import Peer
from netd.policy import (
    Accept,
    AccessError,
    AccessList,
    Counters,
    Limits,
    Rate,
    RateWindow,
    Refuse,
    Suspend,
    check_rate,
    decide,
    parse_rate,
    source_key,
)

ip = Peer.from_ip
unix = Peer.from_creds
PROPERTY = settings(max_examples=200, deadline=None)
ROOT_GROUP = grp.getgrgid(0).gr_name
NOBODY = pwd.getpwnam("nobody")


# -- parsing access lists -----------------------------------------------------------------


def test_every_kind_of_entry_is_parsed() -> None:
    access = AccessList.parse(
        [" 10.0.0.0/8 ", "192.168.1.7", "2001:db8::/32", "::1", "::ffff:172.16.0.0/108",
         "uid:0", "gid:100", "user:nobody", f"group:{ROOT_GROUP}"],
        ["10.9.0.0/16", "uid:4294967294"])
    assert access.allow.networks == (
        ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.168.1.7/32"),
        ipaddress.IPv6Network("2001:db8::/32"), ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv4Network("172.16.0.0/12"))
    assert access.allow.uids == {0, NOBODY.pw_uid}
    assert access.allow.gids == {100, 0}
    assert access.deny.networks == (ipaddress.IPv4Network("10.9.0.0/16"),)
    assert access.deny.uids == {4294967294}


def test_empty_lists_are_an_open_door() -> None:
    access = AccessList.parse([], [])
    assert access == AccessList()
    assert access.permits_ip("203.0.113.9") and access.permits_ip("2001:db8::1")
    assert access.permits_unix(1000, 1000) and access.permits_unix(None, None)


BAD_ENTRIES = [
    ("10.0.0.300", "'10.0.0.300' is not an IP address, a CIDR network"),
    ("10.0.0.0/33", "is not an IP address"),
    ("example.com", "host names are not resolved"),
    ("", "'' is not an IP address"),
    ("10.0.0.1/8", "has host bits set; did you mean '10.0.0.0/8'?"),
    ("2001:db8::1/32", "did you mean '2001:db8::/32'?"),
    ("fe80::%eth0/64", "zone ids"),
    ("uid:", "'uid:' needs a number 0-4294967294"),
    ("uid:-1", "needs a number"),
    ("uid:root", "needs a number"),
    ("gid:4294967295", "'gid:4294967295' needs a number"),
    ("uid:١", "needs a number"),
    ("user:no-such-user-netd-test", "no user named 'no-such-user-netd-test' on this system"),
    ("group:no-such-group-netd-test", "no group named 'no-such-group-netd-test'"),
]


@pytest.mark.parametrize(("entry", "message"), BAD_ENTRIES)
def test_a_bad_entry_is_an_error_that_says_why(entry: str, message: str) -> None:
    for allow, deny, key in (([entry], [], "allow"), ([], [entry], "deny")):
        with pytest.raises(AccessError) as caught:
            AccessList.parse(allow, deny)
        assert isinstance(caught.value, ValueError)
        [(where, index, said)] = caught.value.problems
        assert (where, index) == (key, 0)
        assert message in said, said
        assert f"{key}[0]: " in str(caught.value)


def test_every_bad_entry_is_reported_at_once_with_its_place() -> None:
    with pytest.raises(AccessError) as caught:
        AccessList.parse(["10.0.0.0/8", "nonsense", "uid:x"], ["bad/99", "::1"])
    assert [(key, i) for key, i, _ in caught.value.problems] == [
        ("allow", 1), ("allow", 2), ("deny", 0)]


# -- access decisions ---------------------------------------------------------------------

IP_CASES = [
    # allow, deny, peer, permitted
    ([], [], "192.0.2.1", True),
    (["10.0.0.0/8"], [], "10.200.3.4", True),
    (["10.0.0.0/8"], [], "11.0.0.1", False),
    (["10.0.0.0/8"], [], "2001:db8::1", False),
    (["10.0.0.0/8"], ["10.9.0.0/16"], "10.9.1.1", False),
    (["10.0.0.0/8"], ["10.9.0.0/16"], "10.8.1.1", True),
    ([], ["10.9.0.0/16"], "10.8.1.1", True),
    ([], ["10.9.0.0/16"], "10.9.255.255", False),
    (["10.9.1.1"], ["10.9.1.1"], "10.9.1.1", False),
    (["0.0.0.0/0"], [], "203.0.113.5", True),
    (["0.0.0.0/0"], [], "2001:db8::5", False),
    (["::/0"], [], "2001:db8::5", True),
    (["::/0"], [], "203.0.113.5", False),
    (["::/0"], [], "::ffff:203.0.113.5", False),
    (["2001:db8::/32"], ["2001:db8:bad::/48"], "2001:db8:bad::1", False),
    (["2001:db8::/32"], ["2001:db8:bad::/48"], "2001:db8:900d::1", True),
    (["fe80::/10"], [], "fe80::1%eth0", True),
    (["10.0.0.0/8"], [], "::ffff:10.1.2.3", True),
    (["10.0.0.0/8"], ["::ffff:10.1.0.0/112"], "10.1.2.3", False),
    (["::ffff:10.0.0.0/104"], [], "10.1.2.3", True),
    (["::ffff:10.0.0.0/104"], [], "::ffff:11.1.2.3", False),
    (["127.0.0.1", "::1"], [], "::1", True),
    (["127.0.0.1", "::1"], [], "127.0.0.2", False),
    (["uid:0"], [], "192.0.2.1", True),
    ([], ["uid:0"], "192.0.2.1", True),
]


@pytest.mark.parametrize(("allow", "deny", "peer", "permitted"), IP_CASES)
def test_ip_peers(allow: list[str], deny: list[str], peer: str, permitted: bool) -> None:
    assert AccessList.parse(allow, deny).permits_ip(peer) is permitted


def test_a_peer_that_is_not_an_ip_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        AccessList().permits_ip("not-an-ip")


UNIX_CASES = [
    # allow, deny, (uid, gid), permitted
    ([], [], (1000, 1000), True),
    (["uid:0"], [], (0, 5), True),
    (["uid:0"], [], (1000, 0), False),
    (["gid:100"], [], (1000, 100), True),
    (["uid:0", "gid:100"], [], (1000, 100), True),
    (["gid:100"], ["uid:1000"], (1000, 100), False),
    ([], ["gid:100"], (1000, 100), False),
    ([], ["gid:100"], (1000, 1000), True),
    (["user:root"], [], (0, 0), True),
    (["10.0.0.0/8"], [], (1000, 1000), True),
    ([], ["0.0.0.0/0", "::/0"], (1000, 1000), True),
    ([], [], (None, None), True),
    (["uid:0"], [], (None, None), False),
    ([], ["uid:0"], (None, None), False),
    (["10.0.0.0/8"], [], (None, None), True),
]


@pytest.mark.parametrize(("allow", "deny", "creds", "permitted"), UNIX_CASES)
def test_unix_peers(allow: list[str], deny: list[str], creds: tuple[int | None, int | None],
                    permitted: bool) -> None:
    assert AccessList.parse(allow, deny).permits_unix(*creds) is permitted


# -- access properties ----------------------------------------------------------------------


@st.composite
def networks(draw: st.DrawFn) -> str:
    """A CIDR network as an administrator would write it, v4, v6 or v4-mapped v6."""
    address = draw(st.ip_addresses())
    prefix = draw(st.integers(0, address.max_prefixlen))
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    mapped: bool = draw(st.booleans())
    if network.version == 4 and mapped:
        return f"::ffff:{network.network_address}/{prefix + 96}"
    return str(network)


peers = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
)


def reference_in(peer: str, entry: str) -> bool:
    """Whether `peer` is in `entry`, with v4-mapped addresses and networks read as IPv4."""
    address = ipaddress.ip_address(peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    network = ipaddress.ip_network(entry)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return address.version == network.version and address in network


@PROPERTY
@given(st.lists(networks(), max_size=5), st.lists(networks(), min_size=1, max_size=5), peers)
def test_deny_always_wins(allow: list[str], deny: list[str], peer: str) -> None:
    access = AccessList.parse(allow + deny, deny)
    if any(reference_in(peer, entry) for entry in deny):
        assert not access.permits_ip(peer)


@PROPERTY
@given(st.lists(networks(), max_size=5), st.lists(networks(), max_size=5), peers)
def test_ip_decisions_match_a_reference(allow: list[str], deny: list[str], peer: str) -> None:
    expected = (not any(reference_in(peer, entry) for entry in deny)
                and (not allow or any(reference_in(peer, entry) for entry in allow)))
    assert AccessList.parse(allow, deny).permits_ip(peer) is expected


@PROPERTY
@given(st.lists(networks(), max_size=5), st.lists(networks(), max_size=5),
       st.ip_addresses(v=4))
def test_a_v4_mapped_peer_is_its_ipv4_self(allow: list[str], deny: list[str],
                                           address: ipaddress.IPv4Address) -> None:
    access = AccessList.parse(allow, deny)
    assert access.permits_ip(str(address)) is access.permits_ip(f"::ffff:{address}")
    assert source_key(ip(str(address))) == source_key(ip(f"::ffff:{address}"))


@PROPERTY
@given(st.lists(st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), max_size=4),
       st.lists(st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), max_size=4), peers)
def test_v4_mapped_entries_are_their_ipv4_selves(
        allow: list[tuple[ipaddress.IPv4Address, int]],
        deny: list[tuple[ipaddress.IPv4Address, int]], peer: str) -> None:
    def v4(entries: list[tuple[ipaddress.IPv4Address, int]]) -> list[str]:
        return [str(ipaddress.ip_network(f"{a}/{p}", strict=False)) for a, p in entries]

    def mapped(entries: list[tuple[ipaddress.IPv4Address, int]]) -> list[str]:
        return [f"::ffff:{ipaddress.ip_network(f'{a}/{p}', strict=False).network_address}/{p + 96}"
                for a, p in entries]

    plain = AccessList.parse(v4(allow), v4(deny))
    assert AccessList.parse(mapped(allow), mapped(deny)) == plain
    assert AccessList.parse(mapped(allow), v4(deny)).permits_ip(peer) is plain.permits_ip(peer)


ids = st.integers(0, 70000)


@PROPERTY
@given(st.lists(ids, max_size=4), st.lists(ids, max_size=4), st.lists(ids, max_size=4),
       st.lists(ids, max_size=4), ids, ids)
def test_unix_deny_always_wins_and_allow_matches_uid_or_gid(
        allow_uids: list[int], allow_gids: list[int], deny_uids: list[int],
        deny_gids: list[int], uid: int, gid: int) -> None:
    access = AccessList.parse([f"uid:{u}" for u in allow_uids] + [f"gid:{g}" for g in allow_gids],
                              [f"uid:{u}" for u in deny_uids] + [f"gid:{g}" for g in deny_gids])
    denied = uid in deny_uids or gid in deny_gids
    allowed = not (allow_uids or allow_gids) or uid in allow_uids or gid in allow_gids
    assert access.permits_unix(uid, gid) is (allowed and not denied)


# -- rates ----------------------------------------------------------------------------------

RATES = [
    ("50/s", Rate(50, 1.0)),
    ("300/m", Rate(300, 60.0)),
    ("1000/h", Rate(1000, 3600.0)),
    (" 1 / s ", Rate(1, 1.0)),
    ("10000/s", Rate(10000, 1.0)),
]


@pytest.mark.parametrize(("text", "rate"), RATES)
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


BAD_RATES = [
    ("50", "is not a rate (like 50/s, 300/m or 1000/h)"),
    ("50/d", "is not a rate"),
    ("2.5/s", "is not a rate"),
    ("-1/s", "is not a rate"),
    ("/s", "is not a rate"),
    ("fast", "is not a rate"),
    ("0/s", "the count must be 1-10000 per window"),
    ("10001/s", "for more, use a shorter unit"),
]


@pytest.mark.parametrize(("text", "message"), BAD_RATES)
def test_bad_rates_say_what_a_rate_looks_like(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rate(text)


def admit_all(window: RateWindow, times: list[float]) -> list[float]:
    """Feed arrivals to the window as the supervisor would; return those it let in."""
    admitted = []
    for now_s in times:
        if not window.full(now_s):
            window.record(now_s)
            admitted.append(now_s)
    return admitted


def test_the_window_admits_n_then_slides() -> None:
    window = RateWindow(Rate(3, 1.0))
    times = [0.0, 0.1, 0.2, 0.3, 0.99, 1.0, 1.05, 1.1, 1.2, 2.0, 2.05, 2.1, 2.2]
    assert admit_all(window, times) == [0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 2.0, 2.1, 2.2]


def test_a_minute_rate_takes_a_burst_then_waits_the_minute() -> None:
    window = RateWindow(parse_rate("300/m"))
    assert len(admit_all(window, [i / 100 for i in range(400)])) == 300
    assert window.full(59.9)
    assert not window.full(60.0)


arrivals = st.lists(st.floats(0, 0.5, allow_nan=False), max_size=150).map(
    lambda gaps: [sum(gaps[:i + 1]) for i in range(len(gaps))])
rates = st.builds(Rate, st.integers(1, 8), st.sampled_from([0.5, 1.0, 3.0, 60.0]))


@PROPERTY
@given(rates, arrivals)
def test_the_window_never_admits_more_than_n_per_window(rate: Rate, times: list[float]) -> None:
    admitted = admit_all(RateWindow(rate), times)
    for i in range(len(admitted) - rate.count):
        assert admitted[i] + rate.window_s <= admitted[i + rate.count]


@PROPERTY
@given(rates, arrivals)
def test_the_window_is_full_exactly_when_a_brute_force_count_says(rate: Rate,
                                                                  times: list[float]) -> None:
    window = RateWindow(rate)
    admitted: list[float] = []
    for now_s in times:
        recent = [t for t in admitted if t + rate.window_s > now_s]
        assert window.full(now_s) is (len(recent) >= rate.count)
        if len(recent) < rate.count:
            window.record(now_s)
            admitted.append(now_s)


def test_check_rate_without_a_rate_never_suspends() -> None:
    assert check_rate(None, Limits(), 5.0) is None


def test_check_rate_suspends_for_the_pause_and_until_there_is_room() -> None:
    limits = Limits(rate=Rate(2, 1.0), rate_pause_s=10.0)
    window = RateWindow(Rate(2, 1.0))
    assert check_rate(window, limits, 100.0) is None
    window.record(100.0)
    assert check_rate(window, limits, 100.5) is None
    window.record(100.5)
    assert check_rate(window, limits, 100.6) == Suspend(110.6)

    slow = Limits(rate=Rate(2, 60.0), rate_pause_s=10.0)
    window = RateWindow(Rate(2, 60.0))
    window.record(0.0)
    window.record(1.0)
    assert check_rate(window, slow, 2.0) == Suspend(60.0)


@PROPERTY
@given(rates, arrivals, st.floats(0, 30, allow_nan=False))
def test_a_resumed_service_can_always_take_a_connection(rate: Rate, times: list[float],
                                                        pause_s: float) -> None:
    limits = Limits(rate=rate, rate_pause_s=pause_s)
    window = RateWindow(rate)
    for now_s in times:
        decision = check_rate(window, limits, now_s)
        if decision is None:
            window.record(now_s)
        else:
            assert decision.until_s >= now_s + pause_s
            assert check_rate(window, limits, decision.until_s) is None


# -- counters and decide ----------------------------------------------------------------------


def test_counters_fall_back_and_forget_idle_sources() -> None:
    counters = Counters()
    for source in ("10.0.0.1", "10.0.0.1", "10.0.0.2", None):
        counters.started(source)
    assert counters.children == 4
    assert counters.by_source == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert counters.from_source("10.0.0.1") == 2 and counters.from_source(None) == 0
    for source in ("10.0.0.1", "10.0.0.2", None, "10.0.0.1"):
        counters.ended(source)
    assert counters == Counters()
    counters.ended("10.0.0.9")
    assert counters == Counters()


@PROPERTY
@given(st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", "uid:0", None]), max_size=40),
       st.randoms(use_true_random=False))
def test_counters_match_what_is_running_in_any_order(sources: list[str | None],
                                                     rng: random.Random) -> None:
    counters = Counters()
    for source in sources:
        counters.started(source)
    running = list(sources)
    rng.shuffle(running)
    while running:
        source = running.pop()
        counters.ended(source)
        assert counters.children == len(running)
        for key in ("10.0.0.1", "10.0.0.2", "::1", "uid:0"):
            assert counters.from_source(key) == running.count(key)
    assert counters.by_source == {}


SOURCE_KEYS = [
    (ip("192.0.2.7"), "192.0.2.7"),
    (ip("::ffff:192.0.2.7"), "192.0.2.7"),
    (ip("2001:DB8::0001"), "2001:db8::1"),
    (unix(1000, 100), "uid:1000"),
    (unix(None, None), None),
]


@pytest.mark.parametrize(("peer", "key"), SOURCE_KEYS)
def test_source_keys(peer: Peer, key: str | None) -> None:
    assert source_key(peer) == key


def busy(children: int, by_source: dict[str, int]) -> Counters:
    return Counters(children=children, by_source=dict(by_source))


OPEN = AccessList()
ONLY_TEN = AccessList.parse(["10.0.0.0/8", "uid:0"], [])

DECISIONS = [
    # access, limits, counters, peer, all_children, max_children, decision
    (OPEN, Limits(), Counters(), ip("192.0.2.1"), 0, None, Accept()),
    (ONLY_TEN, Limits(), Counters(), ip("192.0.2.1"), 0, None, Refuse("access")),
    (ONLY_TEN, Limits(), Counters(), ip("::ffff:10.0.0.1"), 0, None, Accept()),
    (ONLY_TEN, Limits(), Counters(), unix(0, 0), 0, None, Accept()),
    (ONLY_TEN, Limits(), Counters(), unix(1000, 1000), 0, None, Refuse("access")),
    (ONLY_TEN, Limits(), Counters(), unix(None, None), 0, None, Refuse("access")),
    (OPEN, Limits(instances=2), busy(1, {}), ip("10.0.0.1"), 1, None, Accept()),
    (OPEN, Limits(instances=2), busy(2, {}), ip("10.0.0.1"), 2, None, Refuse("instances")),
    (OPEN, Limits(per_source=2), busy(5, {"10.0.0.1": 1}), ip("10.0.0.1"), 5, None, Accept()),
    (OPEN, Limits(per_source=2), busy(5, {"10.0.0.1": 2}), ip("10.0.0.1"), 5, None,
     Refuse("per_source")),
    (OPEN, Limits(per_source=2), busy(5, {"10.0.0.1": 2}), ip("::ffff:10.0.0.1"), 5, None,
     Refuse("per_source")),
    (OPEN, Limits(per_source=2), busy(5, {"10.0.0.1": 2}), ip("10.0.0.2"), 5, None, Accept()),
    (OPEN, Limits(per_source=1), busy(1, {"uid:1000": 1}), unix(1000, 1), 1, None,
     Refuse("per_source")),
    (OPEN, Limits(per_source=1), busy(1, {}), unix(None, None), 1, None, Accept()),
    (OPEN, Limits(), busy(3, {}), ip("10.0.0.1"), 9, 10, Accept()),
    (OPEN, Limits(), busy(3, {}), ip("10.0.0.1"), 10, 10, Refuse("max_children")),
    (OPEN, Limits(instances=0), Counters(), ip("10.0.0.1"), 0, None, Refuse("instances")),
    # the most specific reason is given when several apply
    (ONLY_TEN, Limits(instances=1, per_source=1), busy(1, {"192.0.2.1": 1}), ip("192.0.2.1"),
     50, 50, Refuse("access")),
    (OPEN, Limits(instances=1, per_source=1), busy(1, {"10.0.0.1": 1}), ip("10.0.0.1"), 50, 50,
     Refuse("per_source")),
    (OPEN, Limits(instances=1, per_source=1), busy(1, {"10.0.0.2": 1}), ip("10.0.0.1"), 50, 50,
     Refuse("instances")),
]


@pytest.mark.parametrize(
    ("access", "limits", "counters", "peer", "all_children", "max_children", "decision"),
    DECISIONS)
def test_decide(access: AccessList, limits: Limits, counters: Counters, peer: Peer,
                all_children: int, max_children: int | None,
                decision: Accept | Refuse) -> None:
    assert decide(access, limits, counters, peer, all_children, max_children) == decision


def test_a_refused_source_is_accepted_again_once_its_children_exit() -> None:
    limits = Limits(instances=3, per_source=2)
    counters = Counters()
    for _ in range(2):
        assert decide(OPEN, limits, counters, ip("10.0.0.1"), counters.children, None) == Accept()
        counters.started(source_key(ip("10.0.0.1")))
    assert decide(OPEN, limits, counters, ip("10.0.0.1"), 2, None) == Refuse("per_source")
    assert decide(OPEN, limits, counters, ip("10.0.0.2"), 2, None) == Accept()
    counters.started(source_key(ip("10.0.0.2")))
    assert decide(OPEN, limits, counters, ip("10.0.0.3"), 3, None) == Refuse("instances")
    counters.ended(source_key(ip("10.0.0.1")))
    assert decide(OPEN, limits, counters, ip("10.0.0.1"), 2, None) == Accept()


@PROPERTY
@given(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5),
       st.integers(0, 12), st.integers(0, 12) | st.none(), st.integers(0, 5) | st.none(),
       st.integers(0, 5) | st.none())
def test_decide_accepts_exactly_when_every_bound_has_room(
        mine: int, others: int, elsewhere: int, extra: int, all_extra: int,
        max_children: int | None, instances: int | None, per_source: int | None) -> None:
    counters = busy(mine + others + extra, {"10.0.0.1": mine, "10.0.0.2": others})
    all_children = counters.children + elsewhere + all_extra
    limits = Limits(instances=instances, per_source=per_source)
    decision = decide(OPEN, limits, counters, ip("10.0.0.1"), all_children, max_children)
    room = ((per_source is None or mine < per_source)
            and (instances is None or counters.children < instances)
            and (max_children is None or all_children < max_children))
    assert (decision == Accept()) is room
