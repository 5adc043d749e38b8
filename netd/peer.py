"""Who is on the other end of a connection, and the one builder of the fields that
accept and refuse lines carry about it (used by spawners and workers alike)."""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple


def describe(sockaddr: object, family: int) -> str:
    """A socket address as logs show it: IP:PORT, [IPv6]:PORT, or a unix path."""
    if isinstance(sockaddr, tuple) and (family == socket.AF_INET6 or ":" in str(sockaddr[0])):
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    if isinstance(sockaddr, tuple):
        return f"{sockaddr[0]}:{sockaddr[1]}"
    if isinstance(sockaddr, bytes):
        return sockaddr.decode(errors="replace")
    return str(sockaddr)


class Peer(NamedTuple):
    """The client of one connection (or datagram) and the address it came in on.

    IP peers have `remote` and `local` as (ip, port); unix peers have `local_path` and,
    for stream connections, the client's pid, uid and gid (SO_PEERCRED). A tuple: one
    is made per connection, and a tuple is the cheapest immutable record to make.
    """

    proto: str
    family: int = socket.AF_INET
    remote: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    local_path: str | None = None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def of(cls, conn: socket.socket, proto: str, remote: object,
           local: tuple[str, int] | None = None) -> Peer:
        """The peer of an accepted (or wait-mode) socket; `local` saves a getsockname()
        when the listener's own address is already the connection's."""
        family = conn.family
        if family == socket.AF_UNIX:
            local_path = conn.getsockname() or None
            if proto == "unix" and remote is not None:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                pid, uid, gid = struct.unpack("3i", creds)
                return cls(proto, family, local_path=local_path, pid=pid, uid=uid, gid=gid)
            return cls(proto, family, local_path=local_path)
        if local is None:
            name = conn.getsockname()
            local = (name[0], name[1])
        ip_remote = (str(remote[0]), int(remote[1])) if isinstance(remote, tuple) else None
        return cls(proto, family, remote=ip_remote, local=local)

    @classmethod
    def from_ip(cls, ip: str, port: int = 0, proto: str = "tcp") -> Peer:
        """An IP client known by its address alone (a PROXY header's, a datagram's)."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        return cls(proto, family, remote=(ip, port))

    @classmethod
    def from_creds(cls, uid: int | None, gid: int | None, proto: str = "unix") -> Peer:
        """A unix-socket client known by its credentials (None when the kernel gave none)."""
        return cls(proto, socket.AF_UNIX, uid=uid, gid=gid)

    def ucspi_env(self) -> dict[str, str]:
        """The UCSPI variables (tcpserver, ucspi-unix) describing this peer."""
        if self.family == socket.AF_UNIX:
            env = {"PROTO": "UNIX"}
            if self.local_path:
                env["UNIXLOCALPATH"] = self.local_path
            if self.pid is not None:
                env.update(UNIXREMOTEPID=str(self.pid), UNIXREMOTEEUID=str(self.uid),
                           UNIXREMOTEEGID=str(self.gid))
            return env
        prefix = "TCP" if self.proto == "tcp" else "UDP"
        env = {"PROTO": prefix}
        for side, address in (("LOCAL", self.local), ("REMOTE", self.remote)):
            if address is not None:
                env[f"{prefix}{side}IP"], env[f"{prefix}{side}PORT"] = address[0], str(address[1])
        return env

    def who(self) -> dict[str, object]:
        """The fields naming the client: peer=IP:PORT, or peer_pid/uid/gid for unix."""
        if self.remote is not None:
            return {"peer": describe(self.remote, self.family)}
        return {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid}


def accept_fields(service: str, peer: Peer, local: str, pid: int,
                  mode: str | None = None) -> dict[str, object]:
    """The fields of an event=accept line, in their documented order."""
    if mode == "wait":  # the child got the listening socket: no client is known yet
        return {"service": service, "proto": peer.proto, "local": local, "pid": pid,
                "mode": mode}
    if peer.remote is not None:
        return {"service": service, "proto": peer.proto, **peer.who(), "local": local,
                "pid": pid, "mode": mode}
    return {"service": service, "proto": peer.proto, "local": local, **peer.who(), "pid": pid,
            "mode": mode}


def refuse_fields(service: str, peer: Peer, reason: str, **detail: object) -> dict[str, object]:
    """The fields of an event=refuse line, in their documented order."""
    who = peer.who()
    who.pop("peer_pid", None)
    return {"service": service, **who, "reason": reason, **detail}
