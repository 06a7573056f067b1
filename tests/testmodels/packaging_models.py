"""Small models for the packaging tests (importable as a top-level module, so it is interned by default)."""

from __future__ import annotations

import torch
from torch import nn


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.l2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.bn(self.l1(x))))


class TwoInputs(nn.Module):
    """Two inputs of different dtypes, dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(tokens).mean(1) * scale
        return {"logits": self.proj(h), "hidden": h}


class AlwaysWrites(Small):
    """Counts its calls in a buffer: writes into its weights at every inference."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return super().forward(x)


class WritesOnLargeInput(Small):
    """Writes into a weight only for some inputs: invisible when packaging, caught at inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 100).any()):
            self.l1.bias.add_(1.0)
        return super().forward(x)


class Big(nn.Module):
    """`mb` megabytes of float32 weights; forward reads all of them."""

    def __init__(self, mb: int) -> None:
        super().__init__()
        n = mb * (1 << 20) // 4 // 1024
        self.weight = nn.Parameter(torch.empty(n, 1024).uniform_(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.sum()


def small(seed: int = 0) -> Small:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = Small()
        m.bn.running_mean.uniform_(-0.5, 0.5)
        return m.eval()


def grad_enabled_and_sum(model: nn.Module, x: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """Run inside an interpreter by ReplicatedModel.apply: is autograd off, and the model's output summed."""
    return torch.is_grad_enabled(), model(x).sum(dim=1)


def fails_on_purpose(model: nn.Module, message: str) -> None:
    raise KeyError(message)


def run_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def weight_addresses(model: nn.Module) -> list[tuple[int, int]]:
    """(data_ptr, nbytes) of every parameter and buffer of `model` (where its weights live)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors]
