"""The stderr pipe of an exec service: its children write to it, each line is logged.

A spawner reads the pipe while it holds the write end for the children it starts. The
supervisor made the pipe and keeps a copy of the read end: once that spawner has died,
it reads on from the children left, so that a child of a dead spawner keeps a stderr
that works instead of dying of SIGPIPE at its next line.
"""

from __future__ import annotations

import os

from netd.logs import Log
from netd.loop import EventLoop

LINE_MAX = 2048  # a longer line is logged in pieces of this size


def stderr_pipe() -> tuple[int, int]:
    """A new pipe for a service's children's stderr: (read end, write end)."""
    return os.pipe2(os.O_CLOEXEC)


class StderrReader:
    """The read end of a service's stderr pipe: every complete line is logged as
    event=stderr as it arrives; closed once no writer is left."""

    def __init__(self, loop: EventLoop, log: Log, service: str, read_fd: int) -> None:
        self.loop = loop
        self.log = log
        self.service = service
        self.read_fd = read_fd
        os.set_blocking(read_fd, False)
        self.partial = b""
        loop.watch(read_fd, self._read)

    def _read(self, final: bool = False) -> None:
        try:
            data: bytes | None = os.read(self.read_fd, 65536)
        except BlockingIOError:
            data = None
        ended = data == b""  # every write end is closed
        lines = (self.partial + (data or b"")).split(b"\n")
        self.partial = lines.pop()
        if final or ended or len(self.partial) > LINE_MAX:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            if line.strip():
                self.log.event("stderr", "warning", service=self.service,
                               msg=line[:LINE_MAX].decode("utf-8", "replace").rstrip("\r"))
        if ended:
            self.close()

    def drain(self) -> None:
        """Log what waits, the unfinished last line included (its writers are gone)."""
        self._read(final=True)

    def close(self) -> None:
        """Stop reading and close the read end."""
        self.loop.unwatch(self.read_fd)
        os.close(self.read_fd)


class StderrPipe(StderrReader):
    """The pipe as a spawner holds it: the read end, and the write end it gives each
    child as its fd 2."""

    def __init__(self, loop: EventLoop, log: Log, service: str, read_fd: int,
                 write_fd: int) -> None:
        super().__init__(loop, log, service, read_fd)
        self.write_fd = write_fd

    def close(self) -> None:
        """Stop reading and close both ends."""
        super().close()
        os.close(self.write_fd)
