"""netd.loop: watched sockets with their callbacks, and timers in one heap, on real
socket pairs and the real clock (no assertion on how long anything takes)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from netd.loop import COMPACT_SLACK, MIN_INTERVAL_S, EventLoop


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    events = EventLoop()
    yield events
    events.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_watched_socket_calls_its_callback_until_unwatched(
        loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    calls: list[str] = []
    loop.watch(reader, lambda: calls.append("first"))
    writer.send(b"x")
    loop.run_once(1.0)
    assert calls == ["first"]
    loop.watch(reader, lambda: calls.append("second"))  # watching again replaces it
    loop.run_once(1.0)
    assert calls == ["first", "second"]  # still readable: called again
    loop.unwatch(reader)
    assert not loop.watching(reader)
    loop.run_once(0.05)
    assert calls == ["first", "second"]
    loop.unwatch(reader)  # unwatching twice is fine


def test_only_what_is_ready_runs(loop: EventLoop) -> None:
    """1,000 idle sockets watched and one ready: one callback runs."""
    pairs = [socket.socketpair() for _ in range(1000)]
    try:
        calls: list[int] = []
        for i, (reader, _) in enumerate(pairs):
            loop.watch(reader, lambda i=i: calls.append(i))
        pairs[617][1].send(b"x")
        loop.run_once(1.0)
        assert calls == [617]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_callback_that_unwatches_another_ready_one_stops_it(
        loop: EventLoop) -> None:
    first, second = socket.socketpair(), socket.socketpair()
    try:
        calls: list[str] = []

        def on_first() -> None:
            calls.append("first")
            loop.unwatch(second[0])

        def on_second() -> None:
            calls.append("second")
            loop.unwatch(first[0])

        loop.watch(first[0], on_first)
        loop.watch(second[0], on_second)
        first[1].send(b"x")
        second[1].send(b"x")
        loop.run_once(1.0)
        assert calls in (["first"], ["second"])  # whichever came first; never both
    finally:
        for a, b in (first, second):
            a.close()
            b.close()


def test_timers_run_in_due_order_and_cancelled_ones_never(loop: EventLoop) -> None:
    calls: list[str] = []
    now = time.monotonic()
    loop.at(now + 0.03, lambda: calls.append("c"))
    loop.at(now + 0.01, lambda: calls.append("a"))
    b = loop.at(now + 0.02, lambda: calls.append("b"))
    loop.after(0.02, lambda: calls.append("b2"))
    loop.cancel(b)
    while loop.next_due_s() is not None:
        loop.run_once()
    assert calls == ["a", "b2", "c"]
    loop.cancel(b)  # cancelling again, or a timer that ran, is fine
    loop.cancel(None)


def test_run_once_sleeps_until_the_next_timer(loop: EventLoop) -> None:
    """With nothing watched, run_once returns once the timer is due (and not before)."""
    calls: list[float] = []
    due = time.monotonic() + 0.05
    loop.at(due, lambda: calls.append(time.monotonic()))
    loop.run_once()
    assert calls and calls[0] >= due


def test_every_repeats_until_cancelled_from_its_own_callback(loop: EventLoop) -> None:
    calls: list[int] = []

    def tick() -> None:
        calls.append(len(calls))
        if len(calls) == 3:
            loop.cancel(timer)

    timer = loop.every(0.01, tick)
    for _ in range(10):
        if loop.next_due_s() is None:
            break
        loop.run_once()
    assert calls == [0, 1, 2]
    assert loop.next_due_s() is None


def test_every_has_a_floor_so_the_loop_can_sleep(loop: EventLoop) -> None:
    """A period of 0 would run the callback on every pass without ever sleeping."""
    timer = loop.every(0.0, lambda: None)
    assert timer.interval_s == MIN_INTERVAL_S
    due = loop.next_due_s()
    assert due is not None and due > time.monotonic() - 1


def test_cancelled_timers_do_not_pile_up(loop: EventLoop) -> None:
    """Arming and cancelling a timer per connection keeps the heap the size of what is
    pending, not of everything ever armed."""
    keep = loop.after(60, lambda: None)
    for _ in range(10_000):
        loop.cancel(loop.after(60, lambda: None))
    assert len(loop._timers) <= 2 * COMPACT_SLACK + 2
    assert loop.next_due_s() == keep.when_s


def test_nothing_due_means_no_timeout(loop: EventLoop) -> None:
    assert loop.next_due_s() is None
