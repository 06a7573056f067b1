"""Run by test_serve_cluster.py in its own process (a Cluster needs its own Ray): a 2-node cluster where a
replica on each node serves the same archive from the object store. Prints one JSON line of findings."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray import serve
from ray.cluster_utils import Cluster


def main(archive: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        from tenfold.integration import app_builder

        # One CPU per replica and one per node: each node hosts exactly one replica. No health pings
        # during the run, so that a replica's call count is its inferences (plus its one load).
        app = app_builder({"archive": archive, "interpreters": 1, "num_cpus": 1, "num_replicas": 2,
                           "health_check_period_s": 60})
        handle = serve.run(app, name="two-nodes", route_prefix="/")
        x, k = torch.arange(40, dtype=torch.float32).reshape(10, 4), torch.arange(10)

        def replicas() -> dict[int, dict]:
            """pid -> node and call count of every replica (asked until both have answered)."""
            nodes: dict[int, str] = {}
            calls: dict[int, int] = {}
            for _ in range(400):
                info = handle.manifest.remote().result(timeout_s=60)
                nodes[info["pid"]] = info["node_id"]
                stats = handle.stats.remote().result(timeout_s=60)
                calls[stats["pid"]] = stats["calls"]
                if len(nodes) == 2 and len(calls) == 2:
                    break
            return {pid: {"node_id": nodes.get(pid), "calls": calls.get(pid)} for pid in set(nodes) | set(calls)}

        def call(_: int) -> list:
            y, k2 = handle.remote(x, k).result(timeout_s=60)
            return [y.tolist(), k2.tolist()]

        before = replicas()
        with ThreadPoolExecutor(4) as callers:
            outputs = list(callers.map(call, range(40)))
        after = replicas()
        print(json.dumps({
            "head_node": ray.get_runtime_context().get_node_id(),
            "worker_node": worker.node_id,
            "replicas": [{"node_id": r["node_id"], "served": r["calls"] - before[pid]["calls"]}
                         for pid, r in after.items()],
            "distinct_outputs": len({json.dumps(o) for o in outputs}),
            "output": outputs[0],
        }))
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
