"""Becoming a daemon: detaching with a truthful start-up report.

`netd start` forks a daemon through python-daemon's DaemonContext and waits on a pipe
until the daemon says it is ready (or why it is not), so it never reports "started"
for a daemon that then dies.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import daemon


def start_detached(serve: Callable[[int], int], keep_fds: list[int]) -> int:
    """Run serve(report_fd) in a detached daemon; return what `netd start` exits with.

    serve writes one line to report_fd: "ready PID" once every listener is bound, or
    "error CODE MESSAGE". The launcher prints it and exits 0 or CODE; a daemon that
    dies without a word makes the launcher say so and exit 1.
    """
    read_fd, report_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        context = daemon.DaemonContext(
            detach_process=True,        # also when started by PID 1 or from a socket
            umask=0o022,                # python-daemon's default 0 would make files world-writable
            working_directory="/",
            files_preserve=[report_fd, *keep_fds],
            signal_map={},              # the supervisor installs its own handlers
        )
        code = 1
        try:
            with context:
                code = serve(report_fd)
        finally:
            os._exit(code)
    os.close(report_fd)
    os.waitpid(pid, 0)  # the intermediate process exits as soon as the daemon forks
    with os.fdopen(read_fd, "rb") as report:
        line = report.readline().decode(errors="replace").strip()
    word, _, rest = line.partition(" ")
    if word == "ready":
        print(f"netd started (pid {rest})")
        return 0
    if word == "error":
        code_text, _, message = rest.partition(" ")
        print(f"netd: {message}", file=sys.stderr)
        return int(code_text) if code_text.isdigit() else 1
    print("netd: the daemon exited during start-up without saying why (see the log)",
          file=sys.stderr)
    return 1
