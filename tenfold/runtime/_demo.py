"""A small demonstration model for the runtime: a Python-heavy MLP (one Python step per layer)."""

from __future__ import annotations

import time


def load_mlp(layers: int = 8, width: int = 64) -> None:
    """Build the demo model in this interpreter (kept in a module global)."""
    import torch

    torch.manual_seed(0)
    global _model, _x
    _model = torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())])
    _model.eval()
    _x = torch.randn(4, width)


def run_mlp(seconds: float) -> int:
    """Run inferences for `seconds`; return how many were done."""
    import torch

    n, end = 0, time.perf_counter() + seconds
    with torch.inference_mode():
        while time.perf_counter() < end:
            for _ in range(50):
                _model(_x)
            n += 50
    return n
