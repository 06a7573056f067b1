"""A Ray cluster of real nodes on this machine, for the tests that need what `ray.cluster_utils.Cluster` cannot
give: nodes that do not share a filesystem view. Each node is its own `ray start --block`; a worker node runs in a
mount namespace of its own (`unshare --mount`), where a tmpfs covers directories of the head's filesystem, so
that its raylet and workers cannot see what is there, as on another machine.

The test process stays out of this cluster (it may be connected to the session's Ray): it drives it with the
`serve` CLI, HTTP, and short Python subprocesses that connect to it (`query`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from support import free_port, subprocess_env, wait_for

BIN = Path(sys.executable).parent


@dataclass
class Node:
    """One `ray start --block` process and what identifies its node."""

    name: str
    process: subprocess.Popen[bytes]
    resource: str  # a custom resource only this node has (1 unit): how tests find and target it
    log: Path
    node_id: str = ""

    def raylet_pid(self) -> int:
        import psutil

        found = [p.pid for p in psutil.Process(self.process.pid).children(recursive=True) if p.name() == "raylet"]
        assert len(found) == 1, f"{self.name}: raylets {found}; log: {self.log.read_text()[-2000:]}"
        return found[0]


@dataclass
class RealCluster:
    """A head (with Serve's dashboard API, for `serve deploy`) and worker nodes that can be hidden from paths."""

    root: Path
    env: dict[str, str]
    gcs_port: int = 0
    dashboard_port: int = 0
    http_port: int = 0
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start_head(self, num_cpus: float) -> Node:
        self.gcs_port, self.dashboard_port, self.http_port = free_port(), free_port(), free_port()
        return self._start("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                    f"--temp-dir={self.root / 'ray'}"], num_cpus, {}, hide=[])

    def add_node(self, name: str, num_cpus: float, resources: dict[str, float] | None = None,
                 hide: list[Path] | None = None) -> Node:
        """A worker node; `hide` are directories its processes see empty (a tmpfs over each)."""
        return self._start(name, [f"--address={self.address}"], num_cpus, resources or {}, hide=hide or [])

    def _start(self, name: str, args: list[str], num_cpus: float, resources: dict[str, float],
               hide: list[Path]) -> Node:
        resource = f"tenfold-test-node-{name}"
        cmd = [str(BIN / "ray"), "start", *args, f"--num-cpus={num_cpus:g}", "--node-ip-address=127.0.0.1",
               f"--dashboard-agent-listen-port={free_port()}", f"--resources={json.dumps({**resources, resource: 1})}",
               "--block"]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs tenfold-hidden {d}" for d in hide)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd]
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, process, resource, log)
        self.nodes.append(node)
        node.node_id = wait_for(lambda: self._node_with(resource), 120, f"node {name} to join")
        return node

    def _node_with(self, resource: str) -> str | None:
        for node in self.query_nodes():
            if node["alive"] and resource in node["resources"]:
                return str(node["node_id"])
        return None

    def query(self, code: str, timeout: float = 120) -> Any:
        """Run `code` in a Python connected to this cluster; it assigns `result`, which comes back (JSON)."""
        script = textwrap.dedent("""
            import json, ray
            ray.init(address=ADDRESS, logging_level="ERROR", log_to_driver=False)
            result = None
        """).replace("ADDRESS", repr(self.address))
        script += textwrap.dedent(code) + "\nprint('RESULT ' + json.dumps(result))\n"
        done = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert done.returncode == 0 and lines, (done.stdout[-2000:], done.stderr[-3000:])
        return json.loads(lines[-1].removeprefix("RESULT "))

    def query_nodes(self) -> list[dict[str, Any]]:
        """Every node: id, alive, resources, and its object store's bytes in use (asked of its raylet)."""
        return self.query("""
            from ray._private.internal_api import node_stats
            result = []
            for n in ray.nodes():
                used = None
                if n["Alive"]:
                    try:  # a node just lost may still count as alive for a few seconds
                        stats = node_stats(n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False)
                        used = stats.store_stats.object_store_bytes_used
                    except Exception:
                        pass
                result.append({"node_id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"],
                               "object_store_bytes": used})
        """)

    def store_bytes(self) -> dict[str, int]:
        """node id -> bytes in use in its object store, for every node alive."""
        return {n["node_id"]: n["object_store_bytes"] for n in self.query_nodes()
                if n["alive"] and n["object_store_bytes"] is not None}

    def serve(self, *args: str, timeout: float = 300) -> str:
        """The `serve` CLI against this cluster; its output (it must succeed)."""
        done = subprocess.run([str(BIN / "serve"), *args, "--address", self.dashboard], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout

    def applications(self) -> dict[str, Any]:
        """Serve's details of every application, from the dashboard's REST API (what `serve status` reads; asked
        directly, so that polling it costs no process)."""
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        r = requests.get(f"{self.dashboard}/api/serve/applications/", timeout=30,
                         headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return r.json().get("applications") or {}

    def running(self, app: str, replicas: int) -> bool:
        """Whether `app` is RUNNING with exactly `replicas` replicas RUNNING, and none other starting or stopping."""
        found = self.applications().get(app)
        if found is None or found["status"] != "RUNNING":
            return False
        return all([r["state"] for r in d["replicas"]] == ["RUNNING"] * replicas for d in found["deployments"].values())

    def shutdown(self) -> None:
        import psutil

        for node in reversed(self.nodes):
            try:
                root = psutil.Process(node.process.pid)
                procs = [*root.children(recursive=True), root]
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=30)
        self.nodes.clear()


def start_cluster() -> RealCluster:
    """A RealCluster rooted in a fresh short directory (Unix socket paths are short), not yet started."""
    root = Path(tempfile.mkdtemp(prefix="tf-rc-", dir="/tmp"))
    # Token authentication, as a local Ray 2.60 sets up; replicas spread by Serve, not kept near the proxy.
    env = subprocess_env(RAY_AUTH_MODE="token", RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return RealCluster(root, env)


def remove(cluster: RealCluster) -> None:
    cluster.shutdown()
    shutil.rmtree(cluster.root, ignore_errors=True)


def unshare_works() -> bool:
    """Whether this process may make mount namespaces with a tmpfs (root, or the right capabilities)."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs x /mnt && umount /mnt"], capture_output=True)
    return probe.returncode == 0


def wait_until(predicate: Any, timeout_s: float, what: str) -> float:
    """Seconds until `predicate()` held (polled every half second)."""
    started = time.monotonic()
    wait_for(predicate, timeout_s, what, interval_s=0.5)
    return time.monotonic() - started
