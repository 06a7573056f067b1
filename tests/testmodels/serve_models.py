"""Small models the serving tests package with tenfold.packaging.save (this module's source goes into
the archive). `Probe`'s first value selects a behaviour, so that one deployment covers every path."""

from __future__ import annotations

import time

import torch

RAISE = -1000.0  # x[0, 0] == RAISE: the model raises ValueError("probe refuses ...")
SLEEP = 9999.0  # x[0, 0] == SLEEP: the model sleeps x[0, 1] seconds
SPIN = 7777.0  # x[0, 0] == SPIN: the model holds its interpreter's GIL for x[0, 1] milliseconds


class Probe(torch.nn.Module):
    """(x: float32[?, 4], k: int64[?]) -> (linear(x): float32[?, 3], 2 * k: int64[?])."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(3, 4, generator=g))
            self.linear.bias.copy_(torch.randn(3, generator=g))

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flag = float(x[0, 0]) if x.shape[0] else 0.0
        if flag == RAISE:
            raise ValueError(f"probe refuses {RAISE:g}")
        if flag == SLEEP:
            time.sleep(float(x[0, 1]))
        if flag == SPIN:
            deadline = time.perf_counter() + float(x[0, 1]) / 1000.0
            n = 0
            while time.perf_counter() < deadline:
                n += 1
        return self.linear(x), k * 2


def probe() -> Probe:
    return Probe()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(2, 4), torch.arange(2)


#: Heavy's weight: 16 MiB, enough to tell its copies apart from everything else in an object store.
HEAVY_ROWS, HEAVY_COLS = 1024, 4096


class Heavy(torch.nn.Module):
    """(x: float32[?, 4]) -> x @ table[:4, :3]: float32[?, 3], with a 16 MiB table drawn from `seed`."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(HEAVY_ROWS, HEAVY_COLS, generator=g), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.table[:4, :3]


def heavy_inputs() -> tuple[torch.Tensor]:
    return (torch.ones(2, 4),)


def heavy1() -> Heavy:
    return Heavy(1)


def heavy2() -> Heavy:
    return Heavy(2)
