"""Python yardsticks for the benchmark: socketserver echo servers and a UDP echo loop.

    python bench/pyservers.py forking|threading|udp PORT

Each listens on 127.0.0.1:PORT and runs until SIGTERM. `forking` and `threading` are
the standard library's ForkingTCPServer and ThreadingTCPServer with an echo handler
(echo until EOF); `udp` is a plain one-process recvfrom/sendto loop, the yardstick for
netd's in-supervisor UDP builtins.
"""

from __future__ import annotations

import signal
import socket
import socketserver
import sys


class EchoHandler(socketserver.BaseRequestHandler):
    """Send back everything received until the client closes its side."""

    def handle(self) -> None:
        conn: socket.socket = self.request
        while data := conn.recv(65536):
            conn.sendall(data)


class ForkingEcho(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024
    max_children = 200  # as tcpserver -c 200: the default of 40 would be the limit


class ThreadingEcho(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024
    daemon_threads = True
    block_on_close = False


def udp_echo(port: int) -> None:
    """Answer each datagram with itself, one process, blocking recvfrom/sendto."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, peer = recvfrom(65536)
        sendto(data, peer)


def main() -> int:
    """Run the server named on the command line until SIGTERM."""
    if len(sys.argv) != 3 or sys.argv[1] not in ("forking", "threading", "udp"):
        print(__doc__, file=sys.stderr)
        return 64
    kind, port = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if kind == "udp":
        udp_echo(port)
        return 0
    server_class = ForkingEcho if kind == "forking" else ThreadingEcho
    with server_class(("127.0.0.1", port), EchoHandler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
