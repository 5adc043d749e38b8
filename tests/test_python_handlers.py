"""python: module:function handlers (tests/handlers/svc_handlers.py) in a real netd."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from conftest import Netd, SyslogSink, connect, distinct_ports, recv_all


@pytest.fixture
def handlers_netd(start_netd: Callable[..., Netd], sink: SyslogSink) -> tuple[Netd, dict[str, int]]:
    """One netd with the three test handlers, each on its own port."""
    ports = dict(zip(("peer", "boom", "exit3"), distinct_ports(3), strict=True))
    netd = start_netd(f"""
        services:
          peer:
            listen: tcp://127.0.0.1:{ports["peer"]}
            python: svc_handlers:peer_info
          boom:
            listen: tcp://127.0.0.1:{ports["boom"]}
            python: svc_handlers:boom_or_echo
          exit3:
            listen: tcp://127.0.0.1:{ports["exit3"]}
            python: svc_handlers:exit_three
        """)
    return netd, ports


def test_handler_gets_connection_and_peer(handlers_netd: tuple[Netd, dict[str, int]],
                                          sink: SyslogSink) -> None:
    """handle(conn, peer) runs in a child: it writes to the client and knows who it is."""
    netd, ports = handlers_netd
    with connect(ports["peer"]) as s:
        client_port = s.getsockname()[1]
        text = recv_all(s).decode()
    match = re.fullmatch(r"peer=(.*) pid=(\d+)\n", text)
    assert match, text
    assert "127.0.0.1" in match[1] and str(client_port) in match[1], text
    accept = sink.wait_for(event="accept", service="peer", peer=f"127.0.0.1:{client_port}")
    assert accept["pid"] == match[2]
    assert match[2] != str(netd.proc.pid), "the handler ran inside the supervisor"
    assert sink.wait_for(event="exit", pid=accept["pid"])["status"] == "0"


def test_handler_exception_is_logged_and_contained(handlers_netd: tuple[Netd, dict[str, int]],
                                                   sink: SyslogSink) -> None:
    """A raising handler: event=error with its traceback, the connection closed, a non-zero
    exit; a connection already open and the next one are served, the supervisor lives on."""
    netd, ports = handlers_netd
    with connect(ports["boom"]) as before:
        before.sendall(b"early ")
        with connect(ports["boom"]) as s:
            s.sendall(b"boom\n")
            assert recv_all(s) == b""
            boom_peer = f"127.0.0.1:{s.getsockname()[1]}"
        pid = sink.wait_for(event="accept", service="boom", peer=boom_peer)["pid"]
        error = sink.wait_for(event="error", service="boom")
        assert "ValueError" in error["msg"] and "kaboom-7431" in error["msg"], error
        assert "Traceback" in error["traceback"], error
        assert "ValueError: kaboom-7431 from the handler" in error["traceback"], error
        assert "boom_or_echo" in error["traceback"], error
        assert sink.wait_for(event="exit", pid=pid)["status"] not in ("0", None)
        before.sendall(b"bird\n")
        assert recv_all(before) == b"early bird\n"
    with connect(ports["boom"]) as s:
        s.sendall(b"after\n")
        assert recv_all(s) == b"after\n"
    with connect(ports["peer"]) as s:
        assert recv_all(s).startswith(b"peer=")
    assert netd.proc.poll() is None
    assert len(sink.find(event="error")) == 1


def test_handler_os_exit_status(handlers_netd: tuple[Netd, dict[str, int]],
                                sink: SyslogSink) -> None:
    """A handler that calls os._exit(3) ends its child with status 3, logged as such."""
    netd, ports = handlers_netd
    with connect(ports["exit3"]) as s:
        assert recv_all(s) == b"bye\n"
        peer = f"127.0.0.1:{s.getsockname()[1]}"
    pid = sink.wait_for(event="accept", service="exit3", peer=peer)["pid"]
    exit_ = sink.wait_for(event="exit", pid=pid)
    assert exit_["service"] == "exit3"
    assert exit_["status"] == "3"
    assert "signal" not in exit_
    assert netd.proc.poll() is None
