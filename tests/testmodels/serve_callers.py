"""Code Ray runs on behalf of the serving tests (imported by Serve's replicas and Ray's workers): a
deployment that calls a tenfold deployment through its handle, and a deployer that exits once done."""

from __future__ import annotations

import os
from typing import Any

import ray
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Caller:
    """Forwards `(x, k)` lists to the model behind `model` and answers its first output as lists."""

    def __init__(self, model: Any) -> None:
        self.model = model

    async def __call__(self, x: list, k: list) -> list:
        import torch

        y, k2 = await self.model.remote(torch.tensor(x, dtype=torch.float32), torch.tensor(k))
        return [y.tolist(), k2.tolist()]


@ray.remote(num_cpus=0, max_calls=1)  # max_calls=1: the worker process exits once the task is done
def deploy_and_exit(archive: str, name: str) -> int:
    """Deploy `archive` as application `name` at /`name`, and return this process's pid."""
    from tenfold.integration import app_builder

    serve.run(app_builder({"archive": archive, "name": name, "interpreters": 1, "num_cpus": 0.25}), name=name,
              route_prefix=f"/{name}")
    return os.getpid()
