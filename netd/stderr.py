"""The stderr pipe of an exec service: its children write to it, each line is logged."""

from __future__ import annotations

import os

from netd.logs import Log
from netd.loop import EventLoop

LINE_MAX = 2048  # a longer line is logged in pieces of this size


class StderrPipe:
    """One pipe shared by a service's children (their fd 2); every complete line is
    logged as event=stderr as it arrives."""

    def __init__(self, loop: EventLoop, log: Log, service: str) -> None:
        self.loop = loop
        self.log = log
        self.service = service
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self.partial = b""
        loop.watch(self.read_fd, self._read)

    def _read(self, final: bool = False) -> None:
        try:
            data = os.read(self.read_fd, 65536)
        except BlockingIOError:
            data = b""
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if final or len(self.partial) > LINE_MAX:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            if line.strip():
                self.log.event("stderr", "warning", service=self.service,
                               msg=line[:LINE_MAX].decode("utf-8", "replace").rstrip("\r"))

    def drain(self) -> None:
        """Log what waits, the unfinished last line included (its writers are gone)."""
        self._read(final=True)

    def close(self) -> None:
        """Log what is left and close both ends."""
        self.drain()
        self.loop.unwatch(self.read_fd)
        os.close(self.read_fd)
        os.close(self.write_fd)
