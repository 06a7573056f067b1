"""The cost model: two Linear(5000, 5000) layers and a small head, 200 MB of float32 weights that every call
reads. What one process per core costs in memory is this model's weights, plus torch, plus a whole Ray
worker, N times over; the serve benchmark measures it against one replica of N interpreters.

    tenfold package examples.wide_mlp:build -o wide_mlp.pt
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 5000


class WideMLP(nn.Module):
    def __init__(self, width: int = WIDTH, classes: int = 10) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [batch, 5000] -> class scores [batch, 10]"""
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


def build(seed: int = 0) -> WideMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WideMLP().eval()


def example_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor]:
    return (torch.randn(batch, WIDTH, generator=torch.Generator().manual_seed(seed)),)
