"""Small models that one application serves together, by name. Each answers, for every text it is given, its
own name, the number of texts in the call (so that a test sees requests joined into one call) and the process
it ran in (so that a test sees which replica answered)."""

from __future__ import annotations

import os
import time

import torch

#: Each model's weights: 1 MiB, mapped from its archive (what unloading a model must release).
ROWS, COLS = 256, 1024
#: A text "hold:S" makes the call take S seconds.
HOLD = "hold:"


class Tagger:
    """(texts: list[str]) -> list[dict]: {"model", "text", "batch", "pid"} for each text."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.weights = torch.full((ROWS, COLS), float(seed))

    def __call__(self, texts: list[str]) -> list[dict[str, str | int]]:
        for text in texts:
            if text.startswith(HOLD):
                time.sleep(float(text[len(HOLD):]))
        return [{"model": self.name, "text": text, "batch": len(texts), "pid": os.getpid()} for text in texts]


def alpha() -> Tagger:
    return Tagger("alpha", 1)


def beta() -> Tagger:
    return Tagger("beta", 2)


def gamma() -> Tagger:
    return Tagger("gamma", 3)


def example_inputs() -> tuple[list[str]]:
    return (["a", "b"],)


def alpha2() -> Tagger:
    """alpha's next version."""
    return Tagger("alpha-2", 4)


def gamma2() -> Tagger:
    """gamma's next version."""
    return Tagger("gamma-2", 5)
