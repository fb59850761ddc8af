"""``GET /metrics``: the server's statistics in Prometheus' text format, for the monitoring a
plant already runs (Prometheus, Grafana, an alert on failed requests).

The numbers are the ones ``/v1/stats`` answers, read at each scrape, so the two never disagree
and serving keeps one set of counters. Counters count since the server started; latencies are
quantiles over the recent window (a gauge per quantile), as ``/v1/stats`` gives them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST

COUNTERS = {
    "served": "Requests answered.",
    "failed": "Requests the cluster could not answer (HTTP 503).",
    "refused": "Requests refused because too many waited or one waited too long, or too many were in flight "
               "(HTTP 503).",
    "unauthorized": "Requests refused for a missing or wrong bearer token (HTTP 401).",
    "members_refused": "Registrations the leader refused: no or a wrong cluster key, or a name not in the cluster.",
    "control_forged": "Control values the leader ignored because they failed the check (forged or replayed).",
    "replans": "Plans changed because a device turned out slower or faster than believed.",
    "regroups": "Frames before which devices left or joined the group.",
    "learn_errors": "Failures while the stream learnt from a frame (serving went on).",
    "refused_slo": "Requests refused at once because their predicted answer was past the latency SLO (HTTP 503; "
                   "also counted in refused).",
    "unsatisfied": "Requests whose latency budget or accuracy target no operating point met.",
}
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"), ("1", "max"))


class StatsCollector:
    """A Prometheus collector over a server's ``stats()`` (either kind of server)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server.stats()
        for key, doc in COUNTERS.items():
            if key in s:
                yield CounterMetricFamily(f"edgeweave_{key}", doc, value=s[key])
        for key, label in (("by_point", "point"), ("by_exit", "exit")):
            if key in s:
                c = CounterMetricFamily(f"edgeweave_answers_{key}", f"Requests answered, by {label}.", labels=[label])
                for v, n in s[key].items():
                    c.add_metric([v], n)
                yield c
        lat = GaugeMetricFamily("edgeweave_latency_seconds", f"Inference latency over the last {s['window']} answers.",
                                labels=["quantile"])
        for q, k in QUANTILES if s["latency_s"] else ():
            lat.add_metric([q], s["latency_s"][k])
        yield lat
        yield GaugeMetricFamily("edgeweave_uptime_seconds", "Seconds since the server started.", value=s["uptime_s"])
        yield GaugeMetricFamily("edgeweave_devices", "Devices serving now.", value=len(s["devices"]))
        if s.get("speed_factors"):
            g = GaugeMetricFamily("edgeweave_speed_factor", "Each device's believed speed over its profile (1 = as "
                                  "profiled).", labels=["device"])
            for d, f in zip(s["devices"], s["speed_factors"]):
                g.add_metric([d], f)
            yield g
        if s.get("groups"):  # serve --slo-ms: groups of devices serving requests at once
            served = CounterMetricFamily("edgeweave_group_served", "Requests answered, by group.", labels=["group"])
            busy = GaugeMetricFamily("edgeweave_group_busy", "1 while the group computes a request.", labels=["group"])
            svc = GaugeMetricFamily("edgeweave_group_service_seconds", "The group's recent seconds per request.",
                                    labels=["group"])
            for g in s["groups"]:
                name = "+".join(g["devices"])
                served.add_metric([name], g["served"])
                busy.add_metric([name], float(g["busy"]))
                svc.add_metric([name], g["service_s"])
            yield from (served, busy, svc)
            yield GaugeMetricFamily("edgeweave_waiting", "Requests waiting for a free group.", value=s["waiting"])
        if s.get("predicted_s") is not None:
            yield GaugeMetricFamily("edgeweave_predicted_seconds", "The plan's predicted latency, calibrated on "
                                    "measured frames.", value=s["predicted_s"])
        if "load_factor" in s:
            yield GaugeMetricFamily("edgeweave_load_factor", "Measured latency over calibrated latency (>= 1); "
                                    "scales the operating points' latencies.", value=s["load_factor"])


def exposition(server: Any) -> Any:
    """A function returning the text to answer a scrape with."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(server))  # type: ignore[arg-type]
    return lambda: generate_latest(registry)
