"""A deployment that calls a tenfold deployment through its handle (imported by Serve's replicas)."""

from __future__ import annotations

from typing import Any

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
