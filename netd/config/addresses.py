"""Parse and resolve listen addresses: tcp://HOST:PORT, udp://..., unix:PATH, unix-dgram:PATH."""

from __future__ import annotations

import socket
from typing import cast

from netd.config.model import Address, Scheme

SCHEMES: tuple[Scheme, ...] = ("tcp", "udp", "unix", "unix-dgram")


class AddressError(ValueError):
    """A listen address that cannot be used; the message says why."""


def parse_address(spec: str) -> list[Address]:
    """Resolve one listen address to the sockets it needs (an empty host gives v4 and v6)."""
    if spec.startswith("unix:") or spec.startswith("unix-dgram:"):
        scheme, _, path = spec.partition(":")
        if not path:
            raise AddressError(f"'{spec}' has no socket path")
        if len(path.encode()) > 107:
            raise AddressError(f"socket path is longer than the kernel's 107-byte limit: {path}")
        return [Address(spec=spec, scheme=cast(Scheme, scheme), path=path)]
    scheme, sep, rest = spec.partition("://")
    if not sep or scheme not in ("tcp", "udp"):
        shown = scheme if sep else spec
        raise AddressError(f"unknown scheme '{shown}' (expected {', '.join(SCHEMES)}, "
                           "as in tcp://127.0.0.1:7 or unix:/run/netd/x.sock)")
    host, port_text = _split_host_port(rest, spec)
    port = _parse_port(port_text, scheme)
    numeric = _numeric(spec, cast(Scheme, scheme), host, port)
    if numeric is not None:
        return [numeric]
    socktype = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socktype, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise AddressError(f"cannot resolve host '{host}': {e.strerror}") from None
    addresses: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6) or isinstance(sockaddr[0], int):
            continue
        address = Address(spec=spec, scheme=cast(Scheme, scheme), family=family,
                          sockaddr=sockaddr)
        if address not in addresses:
            addresses.append(address)
    return addresses


def _numeric(spec: str, scheme: Scheme, host: str, port: int) -> Address | None:
    """The address of a host written as numbers, as getaddrinfo would give it, without
    asking the resolver (None for a name, or anything less plain)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            ip = socket.inet_ntop(family, socket.inet_pton(family, host))
        except OSError:
            continue
        sockaddr = (ip, port) if family == socket.AF_INET else (ip, port, 0, 0)
        return Address(spec=spec, scheme=scheme, family=family, sockaddr=sockaddr)
    return None


def _split_host_port(rest: str, spec: str) -> tuple[str, str]:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise AddressError(f"'{spec}': IPv6 address must look like [::1]:PORT")
        return host, tail[1:]
    host, colon, port = rest.rpartition(":")
    if not colon:
        raise AddressError(f"'{spec}' has no port (expected HOST:PORT)")
    if ":" in host:
        raise AddressError(f"'{spec}': put an IPv6 address in brackets, as in [::1]:7")
    return host, port


def _parse_port(text: str, scheme: str) -> int:
    if text.isdigit():
        port = int(text)
        if not 1 <= port <= 65535:
            raise AddressError(f"port {port} is out of range (1-65535)")
        return port
    if not text:
        raise AddressError("port is missing")
    try:
        return socket.getservbyname(text, scheme)
    except OSError:
        raise AddressError(f"unknown service name '{text}' for {scheme} "
                           "(not in /etc/services)") from None
