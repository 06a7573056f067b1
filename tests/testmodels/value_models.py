"""Small Python-valued models (no torch.nn.Module at the top): packaged by the tests, so this module's source
goes into their archives while pydantic, numpy and torch stay extern."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field


class Keywords:
    """Scores each text by the weights of the words it contains: (texts: list[str], mode) -> dict[str, float]."""

    def __init__(self) -> None:
        self.vocabulary = {"serve": 0, "model": 1, "python": 2, "fast": 3}
        self.weights = torch.tensor([0.5, 1.0, 2.0, 4.0])

    def __call__(self, texts: list[str], mode: Literal["sum", "max"]) -> dict[str, float]:
        out = {}
        for text in texts:
            ids = [self.vocabulary[w] for w in text.lower().split() if w in self.vocabulary]
            scores = self.weights[ids] if ids else torch.zeros(1)
            out[text] = float(scores.sum() if mode == "sum" else scores.max())
        return out


def keywords() -> Keywords:
    return Keywords()


class Unhinted:
    """No type hints: its signature is inferred from the example values."""

    def __init__(self) -> None:
        self.scale = torch.tensor(2.0)

    def __call__(self, items, label, blob, table):  # noqa: ANN001, ANN204 - on purpose
        return {"label": label.upper(), "total": float(sum(items) * self.scale), "size": len(blob),
                "columns": sorted(table), "array": np.arange(3), "scalar": np.float32(0.5)}


class Settings(BaseModel):
    threshold: float
    labels: list[str]


class Thresholds:
    """(scores: tensor, settings: a pydantic model) -> the labels whose score passes the threshold."""

    def __call__(self, scores: torch.Tensor, settings: Settings) -> list[str]:
        return [label for label, s in zip(settings.labels, scores.tolist()) if s >= settings.threshold]


class Refusal(Exception):
    """Defined in this module: inside an archive, its class exists only where the archive is loaded."""


class Refuser:
    """Refuses a text it finds rude, with an exception of its own."""

    def __call__(self, text: str) -> str:
        if "rude" in text:
            raise Refusal(f"will not answer {text!r}")
        return text.upper()


class Point(BaseModel):
    x: float
    y: float = 0.0
    tag: Literal["a", "b"] | None = None


class Contract:
    """Inputs of every JSON kind, with constraints: what the OpenAPI contract tests send bodies to."""

    def __call__(self, flag: bool, count: Annotated[int, Field(ge=0, le=100)], ratio: float,
                 name: Annotated[str, Field(max_length=8)], tags: list[str], point: Point,
                 weights: dict[str, float]) -> dict[str, Any]:
        return {"flag": flag, "count": count, "tags": len(tags), "tag": point.tag, "weights": len(weights)}


def contract() -> Contract:
    return Contract()


CONTRACT_BY_NAME: dict[str, Any] = {"flag": True, "count": 3, "ratio": 0.5, "name": "n", "tags": ["a"],
                                    "point": {"x": 1.0}, "weights": {"a": 1.0}}
CONTRACT_EXAMPLE = (True, 3, 0.5, "n", ["a"], Point(x=1.0), {"a": 1.0})
