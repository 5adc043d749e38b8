"""The event loop every long-lived netd process runs: file objects watched with their
callbacks, and timers in one heap.

A callback is bound when its file object is registered (as OpenBSD's inetd binds
each socket's handler once), so nothing switches on the kind of a ready object later;
pausing a socket is `unwatch`. Timers are one-shot (`after`, `at`) or periodic
(`every`). `run_once` waits until a watched object is ready or the next timer is due,
then runs exactly those callbacks: its work is proportional to what is ready or due,
never to how many objects are watched. With nothing due it sleeps without a timeout.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

Callback = Callable[[], object]
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
# Cancelled timers stay in the heap until popped, unless they outnumber the live ones
# by this much: then the heap is rebuilt, so its size follows what is pending.
COMPACT_SLACK = 64
MIN_INTERVAL_S = 0.01  # a shorter period would keep the loop from ever sleeping


class Timer:
    """A callback due at `when_s` (monotonic seconds), repeating every `interval_s`
    when that is set; `cancel()` it through the loop that made it."""

    __slots__ = ("when_s", "seq", "callback", "interval_s", "cancelled")

    def __init__(self, when_s: float, seq: int, callback: Callback,
                 interval_s: float | None) -> None:
        self.when_s = when_s
        self.seq = seq
        self.callback = callback
        self.interval_s = interval_s
        self.cancelled = False

    def __lt__(self, other: Timer) -> bool:
        return (self.when_s, self.seq) < (other.when_s, other.seq)


class EventLoop:
    """Watched file objects and timers; `run_once()` serves one wake-up."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._watched: dict[int, Callback] = {}  # each registered fd's callback
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._cancelled = 0

    # -- file objects -------------------------------------------------------------

    def watch(self, fileobj: Any, callback: Callback, events: int = READ) -> None:
        """Call `callback()` whenever `fileobj` is ready for `events` (READ, WRITE or
        both); watching it again replaces its callback and events."""
        fd = _fd(fileobj)
        if fd in self._watched:
            self._selector.modify(fileobj, events)
        else:
            # Known to be new: selectors' own test (modify, then KeyError) formats the
            # object into the error message, which for a socket costs two syscalls.
            self._selector.register(fileobj, events)
        self._watched[fd] = callback

    def unwatch(self, fileobj: Any) -> None:
        """Stop watching `fileobj` (nothing happens when it was not watched)."""
        fd = _fd(fileobj)
        if fd < 0 or fd in self._watched:
            self._watched.pop(fd, None)
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass

    def watching(self, fileobj: Any) -> bool:
        """Whether `fileobj` is watched now."""
        return _fd(fileobj) in self._watched

    # -- signals ----------------------------------------------------------------------

    def on_signals(self, signals: tuple[int, ...],
                   callback: Callable[[set[int]], object]) -> None:
        """Call `callback(received)` on the loop with the signals received. Their
        handlers do nothing: Python writes each number to a wake-up socket this loop
        watches, so no work is ever done inside a signal handler, and a signal that
        comes before the loop runs waits there."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.detach(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, _note_signal)

        def read() -> None:
            try:
                received = set(wake_r.recv(256))
            except BlockingIOError:
                return
            callback(received)

        self.watch(wake_r, read)

    # -- timers -----------------------------------------------------------------

    def at(self, when_s: float, callback: Callback) -> Timer:
        """Call `callback()` once at monotonic time `when_s`."""
        timer = Timer(when_s, next(self._seq), callback, None)
        heapq.heappush(self._timers, timer)
        return timer

    def after(self, delay_s: float, callback: Callback) -> Timer:
        """Call `callback()` once, `delay_s` seconds from now."""
        return self.at(time.monotonic() + delay_s, callback)

    def every(self, interval_s: float, callback: Callback) -> Timer:
        """Call `callback()` every `interval_s` seconds (at least MIN_INTERVAL_S), the
        first time one interval from now."""
        interval_s = max(interval_s, MIN_INTERVAL_S)
        timer = Timer(time.monotonic() + interval_s, next(self._seq), callback, interval_s)
        heapq.heappush(self._timers, timer)
        return timer

    def cancel(self, timer: Timer | None) -> None:
        """Forget `timer` (None, or one already run or cancelled, is fine)."""
        if timer is None or timer.cancelled:
            return
        timer.cancelled = True
        self._cancelled += 1
        if self._cancelled > len(self._timers) // 2 + COMPACT_SLACK:
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def next_due_s(self) -> float | None:
        """When the earliest pending timer is due (None with no timer)."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
            self._cancelled -= 1
        return self._timers[0].when_s if self._timers else None

    # -- running ----------------------------------------------------------------

    def run_once(self, max_wait_s: float | None = None) -> None:
        """Wait for what is ready or due (at most `max_wait_s`), then run its callbacks."""
        due_s = self.next_due_s()
        timeout_s = max_wait_s
        if due_s is not None:
            left_s = max(0.0, due_s - time.monotonic())
            timeout_s = left_s if timeout_s is None else min(timeout_s, left_s)
        for key, _ in self._selector.select(timeout_s):
            # A callback earlier in this batch may have unwatched this object, or
            # watched it again with another callback.
            callback = self._watched.get(key.fd)
            if callback is not None:
                callback()
        self._run_due(time.monotonic())

    def _run_due(self, now_s: float) -> None:
        repeating: list[Timer] = []
        while self._timers and self._timers[0].when_s <= now_s:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                self._cancelled -= 1
                continue
            if timer.interval_s is not None:
                # Due again one interval from now, not from when it was due: a loop held
                # up for a while runs no burst of catch-up calls.
                timer.when_s = now_s + timer.interval_s
                repeating.append(timer)
            else:
                timer.cancelled = True  # it ran: a later cancel() is a no-op
            timer.callback()
        for timer in repeating:
            if not timer.cancelled:
                timer.seq = next(self._seq)
                heapq.heappush(self._timers, timer)

    def close(self) -> None:
        """Release the selector (watched file objects are not closed)."""
        self._selector.close()


def _note_signal(signum: int, frame: object) -> None:
    """The signal's number reaches the loop through the wake-up socket; nothing to do here."""


def _fd(fileobj: Any) -> int:
    """The file descriptor of `fileobj` (-1 for a closed socket)."""
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
