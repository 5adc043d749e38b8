"""A bound socket of a service, and whether it is served right now.

The supervisor binds (or adopts) listeners and keeps them across reloads; the processes
that serve them (spawners, workers) inherit them. A spawner stops and restarts taking
connections from one only through `pause(reason)` and `resume(reason)`: a listener is
watched exactly while it is attached to a loop and no reason to pause it remains (a
rate suspension, a resource shortage, a wait-mode child holding it).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from netd.config.model import Address
from netd.loop import Callback, EventLoop
from netd.sockets import remove_unix


@dataclass(eq=False)
class Listener:
    """One bound socket: `local` is its address as logs show it."""

    address: Address
    sock: socket.socket
    local: str
    adopted: bool = False
    paused: set[str] = field(default_factory=set)
    _loop: EventLoop | None = None
    _on_ready: Callback | None = None

    @property
    def wildcard(self) -> bool:
        """True when bound to every address (a connection's local address varies)."""
        sockaddr = self.address.sockaddr
        return sockaddr is not None and sockaddr[0] in ("0.0.0.0", "::")

    @property
    def fixed_local(self) -> tuple[str, int] | None:
        """The (ip, port) every connection comes in on, when that is known in advance."""
        sockaddr = self.address.sockaddr
        if sockaddr is None or self.wildcard:
            return None
        return (sockaddr[0], sockaddr[1])

    def serve(self, loop: EventLoop, on_ready: Callback) -> None:
        """Call `on_ready()` on `loop` whenever a connection (or datagram) waits."""
        self._loop, self._on_ready = loop, on_ready
        if not self.paused:
            loop.watch(self.sock, on_ready)

    def pause(self, reason: str) -> None:
        """Stop taking connections (they wait in the kernel's queue) until resumed."""
        self.paused.add(reason)
        if self._loop is not None:
            self._loop.unwatch(self.sock)

    def resume(self, reason: str) -> None:
        """Lift one reason to pause; serve again once none is left."""
        self.paused.discard(reason)
        if not self.paused and self._loop is not None and self._on_ready is not None:
            self._loop.watch(self.sock, self._on_ready)

    def detach(self) -> None:
        """Stop serving it on any loop (the socket stays open)."""
        if self._loop is not None:
            self._loop.unwatch(self.sock)
        self._loop = self._on_ready = None

    def close(self) -> None:
        """Close the socket; the supervisor's close also removes a unix socket file it made."""
        self.detach()
        self.sock.close()

    def remove_file(self) -> None:
        """Remove the unix socket file netd bound (never one systemd passed)."""
        if not self.adopted:
            remove_unix(self.address)
