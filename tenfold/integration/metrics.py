"""A replica's Prometheus metrics (Ray's metrics agent exports them; Serve adds deployment/replica tags)."""

from __future__ import annotations

from ray.serve import metrics

from tenfold.runtime import PoolStats

from ._server import LATENCY_BOUNDS_MS

_LATENCY_BOUNDARIES_MS = list(LATENCY_BOUNDS_MS)


class ReplicaMetrics:
    """Interpreter busy ratio, queue depth, request latency and errors of one replica."""

    def __init__(self) -> None:
        self.utilization = metrics.Gauge(
            "tenfold_interpreter_utilization",
            description="Mean busy ratio of this replica's live interpreters over the recent window.",
        )
        self.queue_depth = metrics.Gauge(
            "tenfold_queue_depth", description="Calls queued or running in this replica's interpreters."
        )
        self.interpreters = metrics.Gauge(
            "tenfold_interpreters_healthy", description="Interpreters of this replica still in service."
        )
        self.latency_ms = metrics.Histogram(
            "tenfold_request_latency_ms",
            description="Time from a request's arrival in the replica to its answer.",
            boundaries=_LATENCY_BOUNDARIES_MS,
            tag_keys=("protocol",),
        )
        self.errors = metrics.Counter(
            "tenfold_request_errors", description="Requests answered with an error.", tag_keys=("protocol", "status")
        )

        # The interpreters count their own requests on http_port; the host adds them up here every half second.
        self.http_port_requests = metrics.Counter(
            "tenfold_http_port_requests", description="Requests answered on http_port by the interpreters' servers."
        )
        self.http_port_latency = metrics.Counter(
            "tenfold_http_port_latency_ms",
            description="Requests answered on http_port, by latency bucket: `le` is the bucket's upper bound in ms "
            "(not cumulative).",
            tag_keys=("le",),
        )

    def observe_pool(self, stats: PoolStats) -> None:
        self.utilization.set(stats.utilization)
        self.queue_depth.set(stats.queue_depth)
        self.interpreters.set(stats.healthy)

    def observe_request(self, protocol: str, seconds: float, status: int) -> None:
        self.latency_ms.observe(seconds * 1000.0, tags={"protocol": protocol})
        if status >= 400:
            self.errors.inc(tags={"protocol": protocol, "status": str(status)})

    def observe_http_port(self, *, requests: int, statuses: dict[int, int], latency_buckets: list[int]) -> None:
        if requests:
            self.http_port_requests.inc(requests)
        for status, count in statuses.items():
            if count:
                self.errors.inc(count, tags={"protocol": "http_port", "status": str(status)})
        for bound, count in zip([*map(str, _LATENCY_BOUNDARIES_MS), "+Inf"], latency_buckets):
            if count:
                self.http_port_latency.inc(count, tags={"le": bound})
