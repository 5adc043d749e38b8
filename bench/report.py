"""The report's arithmetic and tables: medians over rounds, paired ratios, Markdown.

Pure functions of the measured results (no process, no socket), so that
tests/test_bench.py can check them in a few milliseconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from servers import Skipped, Target

CONCURRENCY = (1, 16, 128)
UDP_WINDOWS = (1, 16)
ROLES = ("supervisor", "spawner", "worker")


def markdown(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def median_of(values: Iterable[float]) -> float | None:
    """The median, None when there is no value."""
    values = list(values)
    return statistics.median(values) if values else None


def median(target: Target, conc: int, key: str) -> float:
    """The median over rounds of one figure of a target at one concurrency (0 if none)."""
    found = median_of(r[key] for r in target.results.get(conc, []) if key in r)
    return 0.0 if found is None else found


def total(target: Target, key: str, concs: Iterable[int] | None = None) -> int:
    """The sum over rounds (and over `concs`, else all) of one count of a target."""
    keys = target.results if concs is None else concs
    return int(sum(r.get(key, 0) for conc in keys for r in target.results.get(conc, [])))


def paired_ratio(mine: Target, peer: Target, conc: int, key: str = "rate") -> float | None:
    """Median over rounds of mine/peer, each pair measured seconds apart."""
    pairs = zip(mine.results.get(conc, []), peer.results.get(conc, []), strict=False)
    return median_of(m[key] / p[key] for m, p in pairs if p.get(key, 0) > 0 and key in m)


def ratio_text(value: float | None) -> str:
    """A ratio as the report prints it: 1.23x, or n/a."""
    return "n/a" if value is None else f"{value:.2f}x"


def at_least(value: float | None, want: float, text: str) -> tuple[str, str]:
    """(measured, verdict) for a figure that must reach `want`; `text` formats a value."""
    if value is None:
        return "n/a", "not measured"
    shown = text.format(value)
    return shown, "met" if value >= want else f"missed by {text.format(want - value)}"


def at_most(value: float | None, limit: float, text: str, strict: bool = False) -> tuple[str, str]:
    """(measured, verdict) for a figure that must stay at or under `limit` (under, if
    `strict`); `text` formats a value."""
    if value is None:
        return "n/a", "not measured"
    shown = text.format(value)
    ok = value < limit if strict else value <= limit
    return shown, "met" if ok else f"missed by {text.format(value - limit)}"


def load_table(table: str, targets: list[Target], skipped: list[Skipped]) -> list[str]:
    """Rates, latencies and errors of every server of one table (medians of the rounds)."""
    if table in ("exec", "echo"):
        concs: tuple[int, ...] = CONCURRENCY
        head = (["server"] + [f"c={c}" for c in concs] + [f"p50/p99 ms c={c}" for c in concs]
                + ["errors c=" + "/".join(map(str, concs))])
    elif table == "udp":
        concs = UDP_WINDOWS
        head = (["server"] + [f"window {w}" for w in concs]
                + [f"p50/p99 ms w={w}" for w in concs] + ["lost"])
    else:
        concs = (1,)
        head = ["server", "MB/s", "seconds", "errors"]
    rows = []
    for t in targets:
        if table == "bulk":
            rows.append([t.label, f"{median(t, 1, 'mb_s'):,.0f}",
                         f"{median(t, 1, 'elapsed_s'):.2f}", str(total(t, "errors"))])
            continue
        cells = [t.label] + [f"{median(t, c, 'rate'):,.0f}" for c in concs]
        cells += [f"{median(t, c, 'p50_ms'):.2f} / {median(t, c, 'p99_ms'):.2f}" for c in concs]
        if table == "udp":
            sent = total(t, "done") + total(t, "timeouts")
            cells.append(f"{100 * total(t, 'timeouts') / max(sent, 1):.1f}%")
        else:
            cells.append(" / ".join(str(errors(t, c)) for c in concs))
        rows.append(cells)
    rows += [[s.label] + ["n/a"] * (len(head) - 2) + [s.why] for s in skipped]
    return markdown(head, rows)


def errors(target: Target, conc: int) -> int:
    """Failed connections at one concurrency, all rounds: errors and 5 s timeouts."""
    return total(target, "errors", [conc]) + total(target, "timeouts", [conc])


def ratio_table(table: str, targets: list[Target]) -> list[str]:
    """netd / peer for every netd service and every peer of a table (not the ceiling)."""
    mine = [t for t in targets if t.is_netd]
    peers = [t for t in targets if not t.is_netd and not t.ceiling]
    if not mine or not peers:
        return []
    concs = (1,) if table == "bulk" else UDP_WINDOWS if table == "udp" else CONCURRENCY
    key = "mb_s" if table == "bulk" else "rate"
    head = ["netd / peer"] + (["ratio"] if table == "bulk" else
                              [f"{'w' if table == 'udp' else 'c'}={c}" for c in concs])
    rows = [[f"{m.label} / {p.label}"] + [ratio_text(paired_ratio(m, p, c, key)) for c in concs]
            for m in mine for p in peers]
    return markdown(head, rows)


def per_op_us(target: Target, conc: int, key: str) -> float | None:
    """Median over rounds of `key` (CPU seconds) per operation done, in µs."""
    return median_of(1e6 * r[key] / r["done"] for r in target.results.get(conc, [])
                     if key in r and r.get("done", 0) > 0)


def us(value: float | None) -> str:
    """A CPU time per operation as the report prints it."""
    return "n/a" if value is None else f"{value:,.1f}"


def cpu_table(targets: list[Target]) -> list[str]:
    """CPU of each of netd's processes per connection (per datagram for UDP), at c=16."""
    rows = []
    for t in targets:
        runs = [r for r in t.results.get(16, []) if "supervisor_cpu_s" in r]
        if not runs:
            continue
        cells = [f"{t.label} ({'UDP w' if t.table == 'udp' else t.table + ' c'}=16)",
                 f"{median(t, 16, 'rate'):,.0f}"]
        for role in ROLES:
            count = max(int(r.get(f"{role}s", 0)) for r in runs)
            spent = us(per_op_us(t, 16, f"{role}_cpu_s"))
            cells.append(spent if role == "supervisor" else f"{spent} ({count})")
        cells.append(us(per_op_us(t, 16, "serving_cpu_s")))
        rows.append(cells)
    if not rows:
        return []
    return markdown(["service", "per s", "supervisor µs", "spawners µs (n)", "workers µs (n)",
                     "of which the process(es) holding its socket µs"], rows)


def udp_scale_table(one: Target, many: Target) -> list[str]:
    """CPU per UDP datagram of the supervisor and of the spawner that answers, with 1 and
    with many services, and the ratio many/1 (median of per-round ratios)."""
    rows = []
    for t in (one, many):
        for w in UDP_WINDOWS:
            rows.append([t.label, str(w), f"{median(t, w, 'rate'):,.0f}",
                         us(per_op_us(t, w, "supervisor_cpu_s")),
                         us(per_op_us(t, w, "serving_cpu_s")),
                         us(per_op_us(t, w, "netd_cpu_s"))])
    for w in UDP_WINDOWS:
        rows.append([f"ratio {many.label} / {one.label}", str(w),
                     ratio_text(paired_ratio(many, one, w)),
                     ratio_text(paired_cpu_ratio(many, one, w, "supervisor_cpu_s")),
                     ratio_text(paired_cpu_ratio(many, one, w, "serving_cpu_s")),
                     ratio_text(paired_cpu_ratio(many, one, w, "netd_cpu_s"))])
    return markdown(["config", "window", "datagrams/s", "supervisor µs / datagram",
                     "answering spawner µs / datagram", "all netd processes µs / datagram"],
                    rows)


def paired_cpu_ratio(mine: Target, peer: Target, conc: int, key: str) -> float | None:
    """Median over rounds of mine's CPU per operation / peer's, each pair seconds apart."""
    def per_op(r: dict[str, float]) -> float | None:
        return r[key] / r["done"] if key in r and r.get("done", 0) > 0 else None

    ratios = []
    for m, p in zip(mine.results.get(conc, []), peer.results.get(conc, []), strict=False):
        a, b = per_op(m), per_op(p)
        if a is not None and b:
            ratios.append(a / b)
    return median_of(ratios)
