"""`tenfold bench update`: the time to serve a new version of a model, updated in place (a deploy that changes
only the deployment's user_config) against a replica restart (a deploy that changes the application's args),
with requests sent all along.

Two applications of the same model (examples.minilm_embedder by default), each 1 replica x 2 interpreters, on
one local Ray of 2 CPUs. Their configs are applied as `serve deploy` applies a config (the controller's
`deploy_apps`, which the dashboard's REST API calls). Rounds alternate between two versions of the archive (the
same model packaged under two names, so two digests) and interleave the two ways (in place, restart; restart,
in place...). A restart starts the new replica before it stops the old one (max_surge_percent: 100), so that
it too loses no request. An update's time runs from the deploy's return to the first answer from a replica that
serves the new digest; a client sends one request after another to the application being updated, and every one
that fails is counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import common

CPUS = 2
WAYS = ("in place", "restart")
_APPS = {"in place": "inplace", "restart": "restart"}
_POLL_S = 0.05


def _versions(model: str) -> list[Path]:
    """Two archives of `model` that differ only in their manifest's name: two versions, two digests."""
    import importlib

    from tenfold.packaging import save

    first = common.example_archive(model, Path("build"))
    second = first.with_name(f"{first.stem}-v2.pt")
    if not second.is_file() or second.stat().st_mtime < first.stat().st_mtime:
        module = importlib.import_module(f"examples.{model}")
        print(f"packaging examples.{model} again as its second version -> {second}", flush=True)
        save(module.build, second, example_inputs=module.example_inputs(), name=f"{model}-v2",
             dynamic=getattr(module, "DYNAMIC", None))
    return [first, second]


def _config(archives: dict[str, Path], in_place: Path, restart: Path, digests: dict[Path, str]) -> dict[str, Any]:
    # 0.5 CPU each: room on 2 CPUs for the restart's new replica beside both.
    base = {"interpreters": 2, "num_cpus": 0.5, "request_timeout_s": 60}
    return {"applications": [
        {"name": "inplace", "route_prefix": "/inplace", "import_path": "tenfold.integration:app_builder",
         "args": {**base, "archive": str(archives["first"]), "name": "inplace"},
         "deployments": [{"name": "inplace", "user_config": {"archive": str(in_place), "sha256": digests[in_place]}}]},
        {"name": "restart", "route_prefix": "/restart", "import_path": "tenfold.integration:app_builder",
         "args": {**base, "archive": str(restart), "sha256": digests[restart], "name": "restart"},
         # The strongest restart: the new replica starts before the old one stops (Serve's default stops it first).
         "deployments": [{"name": "restart", "max_surge_percent": 100}]},
    ]}


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


class _Client(threading.Thread):
    """One request after another to `url`: the answers and the failures."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            request = urllib.request.Request(self.url, self.body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    r.read()
                self.ok += 1
            except (urllib.error.URLError, OSError) as exc:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(repr(exc)[:300])
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopping.set()
        self.join(90)


def _wait_served(base: str, app: str, digest: str, body: bytes, timeout_s: float = 300) -> float:
    """When (perf_counter) a replica of `app` that serves `digest` first answered a request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _get(f"{base}/{app}/-/manifest")
        if found is not None and found.get("sha256") == digest:
            request = urllib.request.Request(f"{base}/{app}/", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    r.read()
                return time.perf_counter()
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(_POLL_S)
    raise TimeoutError(f"{app} did not serve {digest[:12]}... within {timeout_s:g} s")


def run(args: argparse.Namespace) -> int:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from tenfold.packaging import archive_sha256

    first, second = _versions(args.model)
    digests = {p: archive_sha256(p) for p in (first, second)}
    body = common.example_body(first)
    archives = {"first": first}
    samples: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
    with common.local_serve(CPUS) as base:
        client = _get_global_client()
        current = {"in place": first, "restart": first}

        def apply() -> None:
            config = _config(archives, current["in place"], current["restart"], digests)
            client.deploy_apps(ServeDeploySchema.model_validate(config))

        apply()
        for way in WAYS:
            _wait_served(base, _APPS[way], digests[first], body)
        for i in range(args.rounds):
            for way in WAYS if i % 2 == 0 else reversed(WAYS):
                target = second if current[way] == first else first
                load = _Client(f"{base}/{_APPS[way]}/", body)
                load.start()
                time.sleep(1.0)  # the client's requests flow before the update
                current[way] = target
                t0 = time.perf_counter()
                apply()
                served = _wait_served(base, _APPS[way], digests[target], body) - t0
                time.sleep(1.0)
                load.stop()
                pid = (_get(f"{base}/{_APPS[way]}/-/manifest") or {}).get("pid")
                samples[way].append({"seconds": served, "requests": load.ok + load.failed, "failed": load.failed,
                                     "errors": load.errors, "pid": pid})
                print(f"round {i + 1}/{args.rounds} {way}: the new version served {served:.2f} s after the deploy; "
                      f"{load.failed} of {load.ok + load.failed} requests failed", flush=True)
        client.delete_apps(list(_APPS.values()))
    report = {"model": args.model, "rounds": args.rounds, "ways": {w: _summary(s) for w, s in samples.items()},
              "samples": samples}
    report["in_place_over_restart"] = (report["ways"]["in place"]["seconds_p50"] /
                                       report["ways"]["restart"]["seconds_p50"])
    print(table(report))
    print(f"in place / restart: {report['in_place_over_restart']:.2f}x the time")

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        for y, way in enumerate(WAYS):
            xs = [s["seconds"] for s in samples[way]]
            ax.scatter(xs, [y] * len(xs), s=40)
            ax.barh(y, report["ways"][way]["seconds_p50"], height=0.5, alpha=0.4)
        ax.set_yticks(range(len(WAYS)), [f"{w} (user_config)" if w == "in place" else f"{w} (args)" for w in WAYS])
        ax.set_xlabel("seconds from the deploy to the new version's first answer")
        ax.set_title(f"{args.model}: a new version, {args.rounds} updates each way", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)

    json_path, png_path = common.write_report(args.out, "update", report, plot)
    print(f"wrote {json_path} and {png_path}")
    return 1 if any(s["failed"] for way in samples.values() for s in way) else 0


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [s["seconds"] for s in samples]
    return {"updates": len(samples), "seconds_p50": statistics.median(seconds), "seconds_max": max(seconds),
            "requests": sum(s["requests"] for s in samples), "failed": sum(s["failed"] for s in samples),
            "same_process": len({s["pid"] for s in samples}) == 1}


def table(report: dict[str, Any]) -> str:
    rows = [[w, r["updates"], f"{r['seconds_p50']:.2f}", f"{r['seconds_max']:.2f}", r["requests"], r["failed"],
             "yes" if r["same_process"] else "no"] for w, r in report["ways"].items()]
    return common.markdown_table(["update", "updates", "to the new version p50 s", "max s", "requests meanwhile",
                                  "failed", "same process"], rows)
