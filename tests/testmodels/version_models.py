"""Two versions of one small model, for updates without a restart: each answers which version it is, after
holding the call as long as asked (announcing that it started, see `reliability_models.started`)."""

from __future__ import annotations

import os
import time

import torch

from testmodels.reliability_models import STARTED_DIR

#: Each version's weights: 1 MiB, mapped from its archive (what an update must release).
ROWS, COLS = 256, 1024


class Versioned:
    """(hold_s: float, token: int) -> {"version": int, "weight": float}, after sleeping hold_s seconds."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.weights = torch.full((ROWS, COLS), float(version))

    def __call__(self, hold_s: float, token: int) -> dict[str, float]:
        if token:
            os.makedirs(STARTED_DIR, exist_ok=True)
            open(os.path.join(STARTED_DIR, str(token)), "w").close()
        time.sleep(hold_s)
        return {"version": self.version, "weight": float(self.weights[-1, -1])}


def version1() -> Versioned:
    return Versioned(1)


def version2() -> Versioned:
    return Versioned(2)
