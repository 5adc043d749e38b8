"""The benchmark's pure parts: its command line, medians, paired ratios, verdicts and tables.

Nothing is started and nothing measured (the bench is a script, never a test): this only
imports bench/run.py and feeds its report functions made-up results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run  # noqa: E402
from scale import Reload, ReloadFigures, reload_rows  # noqa: E402
from servers import Server, Skipped  # noqa: E402


def rounds(server: Server, table: str, label: str, rates: dict[int, list[float]],
           **extra: object) -> report.Target:
    """A target whose rounds made these rates (and no error)."""
    target = server.add(table, label, 1, **extra)
    target.results = {c: [{"rate": r, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0, "timeouts": 0,
                           "done": 1000, "supervisor_cpu_s": 0.001 * r / 1000}
                          for r in rs] for c, rs in rates.items()}
    return target


def test_parser_takes_quick_runs_and_json() -> None:
    args = run.parser().parse_args(["--quick", "--runs", "2", "--json", "out.json"])
    assert (args.quick, args.runs, args.json) == (True, 2, Path("out.json"))
    assert run.parser().parse_args([]).quick is False
    with pytest.raises(SystemExit):
        run.parser().parse_args(["--netd-log", "stderr"])


def test_median_is_over_rounds_and_zero_without_any() -> None:
    server = Server("s", [])
    target = rounds(server, "exec", "t", {16: [300.0, 100.0, 200.0]})
    assert report.median(target, 16, "rate") == 200.0
    assert report.median(target, 128, "rate") == 0.0
    assert report.median_of([]) is None


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    server = Server("s", [])
    mine = rounds(server, "exec", "netd", {16: [100.0, 300.0, 200.0]}, is_netd=True)
    peer = rounds(server, "exec", "peer", {16: [100.0, 100.0, 400.0]})
    # Per round: 1.0, 3.0, 0.5; the ratio of the medians would be 2.0.
    assert report.paired_ratio(mine, peer, 16) == 1.0
    assert report.paired_ratio(mine, peer, 128) is None
    assert report.ratio_text(None) == "n/a"
    assert report.ratio_text(1.234) == "1.23x"


def test_verdicts_say_by_how_much_a_target_is_missed() -> None:
    assert report.at_least(1.3, 1.2, "{:.2f}x") == ("1.30x", "met")
    assert report.at_least(0.9, 1.2, "{:.2f}x") == ("0.90x", "missed by 0.30x")
    assert report.at_most(50.0, 50, "{:.1f} ms") == ("50.0 ms", "met")
    assert report.at_most(25.0, 25, "{:.1f} MB", strict=True) == ("25.0 MB", "missed by 0.0 MB")
    assert report.at_most(None, 25, "{:.1f} MB") == ("n/a", "not measured")


def test_load_table_has_a_row_per_server_and_per_skipped_one() -> None:
    server = Server("s", [])
    mine = rounds(server, "exec", "netd", {c: [1000.0] for c in report.CONCURRENCY},
                  is_netd=True)
    peer = rounds(server, "exec", "tcpserver", {c: [500.0] for c in report.CONCURRENCY})
    lines = report.load_table("exec", [mine, peer], [Skipped("exec", "socat", "not found")])
    assert lines[0].startswith("| server | c=1 | c=16 | c=128 |")
    assert lines[2] == ("| netd | 1,000 | 1,000 | 1,000 | 1.00 / 2.00 | 1.00 / 2.00 | "
                        "1.00 / 2.00 | 0 / 0 / 0 |")
    assert lines[4].startswith("| socat | n/a") and lines[4].endswith("| not found |")
    ratios = report.ratio_table("exec", [mine, peer])
    assert ratios[2] == "| netd / tcpserver | 2.00x | 2.00x | 2.00x |"


def test_reload_rows_give_each_reload_its_longest_wait() -> None:
    figures = ReloadFigures(["nobody", "daemon"], ended_s=20.0)
    figures.reloads = [Reload("netd reload", 1.5, "netd reloaded (changed edited)", 10.0),
                       Reload("SIGHUP", 0.5, "ok (changed edited)", 15.0)]
    figures.waits = {"probe-same": [(5.0, 0.004), (11.0, 0.060), (16.0, 0.010)]}
    figures.failures = {"probe-same": []}
    assert figures.longest_ms == pytest.approx(60.0)
    rows = dict(reload_rows(figures))
    assert rows["probe-same: longest wait before the first reload (1 connections)"] == "4.0 ms"
    reload_2 = next(v for k, v in rows.items() if k.startswith("reload 2 (SIGHUP)"))
    assert reload_2 == "0.50 s; probe-same 10.0 ms; ok (changed edited)"
