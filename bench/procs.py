"""What /proc says about a running server: memory, CPU, wake-ups, helpers, sockets held."""

from __future__ import annotations

import os
from pathlib import Path


def proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    """/proc/PID/status (or one thread's) as a dict of stripped values; {} once it is gone."""
    path = Path(f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status")
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def rss_mb(pid: int) -> float | None:
    """VmRSS of pid in MB (2**20 bytes), None once it has gone."""
    value = proc_status(pid).get("VmRSS")
    return int(value.split()[0]) / 1024 if value else None


def wakeups(pid: int) -> int:
    """Context switches of every thread of pid: each one is a wake-up."""
    total = 0
    for task in _tasks(pid):
        status = proc_status(pid, task)
        total += int(status.get("voluntary_ctxt_switches", "0"))
        total += int(status.get("nonvoluntary_ctxt_switches", "0"))
    return total


def cpu_ticks(pid: int) -> int:
    """utime + stime of pid in clock ticks (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def cpu_s(pid: int) -> float:
    """CPU time of every thread of pid, in seconds, to the nanosecond (schedstat's run
    time; clock ticks, 10 ms each, would hide a cost of a few µs per connection)."""
    total, found = 0, False
    for task in _tasks(pid):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
            found = True
        except (OSError, IndexError, ValueError):
            continue
    if not found:
        return cpu_ticks(pid) / os.sysconf("SC_CLK_TCK")
    return total / 1e9


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def helpers(pid: int) -> list[int]:
    """Long-lived children of pid running its program (netd's spawners and workers), not
    the programs they exec (their children, or with another name)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    name = proc_status(pid).get("Name", "")
    return [int(c) for c in children if proc_status(int(c)).get("Name", "") == name]


def socket_inodes(port: int, proto: str) -> set[str]:
    """Inodes of the sockets bound to 127.0.0.1:port (listening, for tcp)."""
    local = f"0100007F:{port:04X}"
    found = set()
    try:
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) > 9 and fields[1] == local and (proto != "tcp" or fields[3] == "0A"):
            found.add(fields[9])
    return found


def holds(pid: int, inodes: set[str]) -> bool:
    """Whether pid has an fd on one of these socket inodes."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


class CpuSplit:
    """CPU time of a supervisor and of each of its helpers over one load run."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = {p: cpu_s(p) for p in (pid, *helpers(pid))}

    def stop(self) -> dict[int, float]:
        """Seconds of CPU per process since start, for those alive throughout (a helper
        that ended or started meanwhile is left out)."""
        alive = {self.pid, *helpers(self.pid)}
        return {p: cpu_s(p) - t0 for p, t0 in self.start.items() if p in alive}
