"""A replica's Prometheus metrics (Ray's metrics agent exports them; Serve adds deployment/replica tags)."""

from __future__ import annotations

from ray.serve import metrics

from tenfold.runtime import PoolStats

_LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


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

    def observe_pool(self, stats: PoolStats) -> None:
        self.utilization.set(stats.utilization)
        self.queue_depth.set(stats.queue_depth)
        self.interpreters.set(stats.healthy)

    def observe_request(self, protocol: str, seconds: float, status: int) -> None:
        self.latency_ms.observe(seconds * 1000.0, tags={"protocol": protocol})
        if status >= 400:
            self.errors.inc(tags={"protocol": protocol, "status": str(status)})
