"""Run by test_durability.py in its own process (a Cluster needs its own Ray): the node holding an archive's
object-store copy is removed, and the replica that replaces the lost one fetches the archive again from its
source. Prints one JSON line of findings."""

from __future__ import annotations

import json
import sys
import time

import ray
import torch
from ray import serve
from ray.cluster_utils import Cluster


def main(archive: str, endpoint_url: str, sha256: str) -> None:
    # The head takes no replica: the first one runs on `first_node`, the only node with a CPU.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    first_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        from tenfold.integration import app_builder

        app = app_builder({"archive": archive, "endpoint_url": endpoint_url, "sha256": sha256, "interpreters": 1,
                           "num_cpus": 1, "name": "moving", "health_check_period_s": 1.0})
        handle = serve.run(app, name="moving", route_prefix="/")
        first = handle.manifest.remote().result(timeout_s=60)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        removed = time.monotonic()
        cluster.remove_node(first_node)  # the replica and the object it put in that node's store go with it
        deadline = time.monotonic() + 240
        after = None
        while time.monotonic() < deadline:
            try:
                after = handle.manifest.remote().result(timeout_s=30)
                if after["node_id"] != first["node_id"]:
                    break
            except Exception:  # noqa: BLE001 - the replica is being replaced
                time.sleep(1.0)
        output = handle.remote(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).result(timeout_s=60)
        recovery_s = time.monotonic() - removed
        print(json.dumps({
            "recovery_s": recovery_s,
            "removed_node": first_node.node_id,
            "first": {"node": first["node_id"], "archive_from": first["archive_from"]},
            "after": {"node": after and after["node_id"], "archive_from": after and after["archive_from"]},
            "output": output.tolist(),
        }))
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
