"""Functions the replacement tests run inside interpreters: a setup that leaves a mark, and what reads it."""

from __future__ import annotations

import sys
import time

marks: list[str] = []


def mark(value: str) -> None:
    marks.append(value)


def read_marks() -> list[str]:
    return list(marks)


def modules_id() -> int:
    return id(sys.modules)


def sleep_in_c(seconds: float) -> float:
    time.sleep(seconds)  # native code: an interrupt cannot land until it returns
    return seconds
