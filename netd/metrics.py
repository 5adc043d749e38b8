"""The supervisor's metrics in Prometheus' text format (prometheus_client).

A custom collector reads the supervisor's state (the view `netd status --json` gives:
what the spawners reported in their batches, the children running, the reloads, the
log lines dropped) at each scrape, as it is: a scrape waits for no spawner, and
nothing is counted per connection for metrics.
The supervisor imports this module only when the config names a metrics address:
prometheus_client weighs several MB that a supervisor without metrics does not carry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

# Why a spawner turns a connection away (netd.policy's decisions, the pool of
# daemon.max_children, a bad PROXY header): each is shown, 0 until it happens, so
# that rate() works from the first refusal on.
REFUSE_REASONS = ("access", "instances", "per_source", "max_children", "proxy")
STATES = ("listening", "busy", "suspended", "draining", "disabled")

Status = Callable[[], dict[str, Any]]


class StatusCollector(Collector):
    """The metric families of one supervisor, made from `status()` at each scrape."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        """Every family, from the status as it is now."""
        status = self.status()
        daemon = status["daemon"]
        services = [s for s in status["services"] if s["state"] != "disabled"]
        yield InfoMetricFamily("netd", "The running netd: its version and config file.",
                               value={"version": daemon["version"], "config": daemon["config"]})
        states = GaugeMetricFamily("netd_services", "Services configured, by state.",
                                   labels=["state"])
        for state in STATES:
            states.add_metric([state], sum(s["state"] == state for s in status["services"]))
        yield states
        yield from _per_service(services)
        dropped = CounterMetricFamily(
            "netd_log_dropped_total", "Log lines dropped because the log target (syslog, "
            "the journal) could not take them, by the process that dropped them.",
            labels=["process"])
        for process, lines in sorted(daemon["log_dropped"].items()):
            dropped.add_metric([process], lines)
        yield dropped
        reloads = CounterMetricFamily("netd_reloads_total",
                                      "Reloads of the config, by result (ok, error).",
                                      labels=["result"])
        for result in ("ok", "error"):
            reloads.add_metric([result], daemon["reloads"][result])
        yield reloads
        last = daemon["last_reload"]
        yield GaugeMetricFamily(
            "netd_config_last_reload_successful",
            "1 when the last reload applied (or none was asked for), 0 when it was refused "
            "and an older config stays in force.", value=1 if last is None or last["ok"] else 0)


def _per_service(services: list[dict[str, Any]]) -> Iterator[Metric]:
    accepted = CounterMetricFamily("netd_connections_accepted_total",
                                   "Connections accepted and served (by a child or inline).",
                                   labels=["service"])
    refused = CounterMetricFamily("netd_connections_refused_total",
                                  "Connections (and UDP datagrams) turned away, by reason.",
                                  labels=["service", "reason"])
    children = GaugeMetricFamily("netd_children", "Children running (workers, for a "
                                 "service in workers mode).", labels=["service"])
    failures = CounterMetricFamily("netd_spawn_failures_total",
                                   "Children that could not be started (fork or exec failed).",
                                   labels=["service"])
    for service in services:
        name = service["name"]
        accepted.add_metric([name], service["accepted"])
        by_reason: dict[str, int] = service["refused_by"]
        for reason in REFUSE_REASONS + tuple(sorted(set(by_reason) - set(REFUSE_REASONS))):
            refused.add_metric([name, reason], by_reason.get(reason, 0))
        children.add_metric([name], service["children"])
        failures.add_metric([name], service["failed"])
    yield from (accepted, refused, children, failures)


class Metrics:
    """The page a scrape gets: netd's families and the supervisor's process_* ones."""

    def __init__(self, status: Status) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(status))
        ProcessCollector(registry=self.registry)  # CPU, memory, fds, start time

    def render(self) -> tuple[bytes, str]:
        """The page and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
