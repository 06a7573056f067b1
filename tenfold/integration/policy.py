"""Autoscaling on interpreter utilization: a pure policy, context in, (desired replicas, state) out.

Every replica reports, through Serve's `record_autoscaling_stats` hook, the mean utilization of its
interpreters (busy time / wall time), its pending calls and its interpreter count. Serve averages each
figure over `look_back_period_s` and calls the policy; the bounds (min/max replicas) and the up/down
delays are applied around it by Serve, not re-implemented here.

This module imports only the standard library: Serve pickles the policy by value into its controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UTILIZATION = "tenfold_utilization"
QUEUE_DEPTH = "tenfold_queue_depth"
INTERPRETERS = "tenfold_interpreters"

DEFAULT_TARGET_UTILIZATION = 0.7


def desired_replicas(
    *,
    utilization: Mapping[Any, float],
    queue_depth: Mapping[Any, float],
    interpreters: Mapping[Any, float],
    queued_at_callers: float = 0.0,
    target_utilization: float = DEFAULT_TARGET_UTILIZATION,
) -> float | None:
    """Replicas needed so that mean interpreter utilization comes to `target_utilization`.

    The load of a replica is its interpreters' mean utilization plus the calls waiting for an
    interpreter, counted in interpreters (utilization saturates at 1, waiting work says how far past
    it the replica is). Requests still queued at callers (Serve's handles) are spread over all
    interpreters. Returns None when no replica has reported yet (the caller keeps its count).
    """
    if not 0.0 < target_utilization <= 1.0:
        raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
    replicas = [r for r in utilization if r in interpreters]
    if not replicas:
        return None
    total_interpreters = sum(max(1.0, interpreters[r]) for r in replicas)
    load = 0.0  # in replicas: a replica whose every interpreter is always busy counts 1
    for r in replicas:
        n = max(1.0, interpreters[r])
        waiting = max(0.0, queue_depth.get(r, 0.0) - n) / n
        load += min(1.0, max(0.0, utilization[r])) + waiting
    load += max(0.0, queued_at_callers) / total_interpreters * len(replicas)
    return load / target_utilization


def utilization_policy(ctx: Any, target_utilization: float = DEFAULT_TARGET_UTILIZATION) -> tuple[float, dict]:
    """A Serve autoscaling policy: `ctx` is a `ray.serve.config.AutoscalingContext`.

    Only replicas that are running and have reported count; with none, the current target stands.
    """
    state = dict(ctx.policy_state or {})
    metrics = ctx.aggregated_metrics or {}
    running = set(ctx.running_replicas)

    def _reported(name: str) -> dict:
        return {r: float(v) for r, v in (metrics.get(name) or {}).items() if r in running}

    desired = desired_replicas(
        utilization=_reported(UTILIZATION),
        queue_depth=_reported(QUEUE_DEPTH),
        interpreters=_reported(INTERPRETERS),
        queued_at_callers=float(ctx.total_queued_requests or 0.0),
        target_utilization=target_utilization,
    )
    if desired is None or ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, state
    # Serve rounds up and applies min/max replicas and the delays around this figure.
    state["tenfold_desired"] = desired
    return desired, state


class UtilizationPolicy:
    """What Serve instantiates (with `policy_kwargs`) to call `utilization_policy` with a target."""

    def __init__(self, target_utilization: float = DEFAULT_TARGET_UTILIZATION) -> None:
        if not 0.0 < target_utilization <= 1.0:
            raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
        self.target_utilization = target_utilization

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        return utilization_policy(ctx, self.target_utilization)
