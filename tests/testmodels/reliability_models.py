"""Models the reliability tests package with tenfold.packaging.save (this module's source goes into the
archive). Each serves `Healthy`'s answer unless its first value is its trigger, which makes it fail in
one way: a pure-Python loop that never ends, a sleep in native code, or a segfault of its process; `Leaky`
always answers, and keeps 1 KiB at every call."""

from __future__ import annotations

import os
import tempfile
import time

import torch

HANG = 4242.0  # Hang: x[0, 0] == HANG loops in Python forever; a token in x[0, 2] is announced first
SLEEP = 9999.0  # NativeSleep: x[0, 0] == SLEEP sleeps x[0, 1] seconds inside time.sleep (native code);
#                a token in x[0, 2] is announced first (see `started`)
CRASH = 6666.0  # Crash: x[0, 0] == CRASH dereferences NULL (the process dies of SIGSEGV)


#: Where a sleeping call announces that it started: a file named by its token (the replicas share this machine).
STARTED_DIR = os.path.join(tempfile.gettempdir(), "tenfold-test-calls-started")


def started(token: int) -> bool:
    """Whether the call that carried `token` (x[0, 2], a whole number below 2**24) has started (to sleep or hang)."""
    return os.path.exists(os.path.join(STARTED_DIR, str(token)))


def _announce(x: torch.Tensor) -> None:
    token = int(x[0, 2])
    if token:
        os.makedirs(STARTED_DIR, exist_ok=True)
        open(os.path.join(STARTED_DIR, str(token)), "w").close()


def _sleep(x: torch.Tensor) -> None:
    _announce(x)
    time.sleep(float(x[0, 1]))  # the interpreter's eval loop does not run: no interrupt lands


class Healthy(torch.nn.Module):
    """(x: float32[?, 4]) -> linear(x): float32[?, 3], with fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.linear = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(3, 4, generator=g))
            self.linear.bias.copy_(torch.randn(3, generator=g))

    def trigger(self, x: torch.Tensor) -> float:
        return float(x[0, 0]) if x.shape[0] else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Hang(Healthy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trigger(x) == HANG:
            _announce(x)
            n = 0
            while True:  # only an exception raised inside the interpreter ends this
                n += 1
        return self.linear(x)


class NativeSleep(Healthy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trigger(x) == SLEEP:
            _sleep(x)
        return self.linear(x)


class Crash(Healthy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trigger(x) == CRASH:
            import ctypes

            ctypes.string_at(0)  # SIGSEGV in native code: the whole replica process dies
        if self.trigger(x) == SLEEP:
            _sleep(x)
        return self.linear(x)


#: What Leaky keeps for good, one entry per call (in each interpreter, its own), and its size.
_KEPT: list[bytes] = []
LEAK_BYTES = 1024


class Leaky(Healthy):
    """Healthy's answer, keeping 1 KiB for good at every call: the leak a soak must catch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _KEPT.append(b"\x01" * LEAK_BYTES)  # a new object each call (a literal size would make it one constant)
        return self.linear(x)


MODELS = {"healthy": Healthy, "hang": Hang, "native_sleep": NativeSleep, "crash": Crash}


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.zeros(2, 4),)


def expected(x: list[list[float]]) -> list[list[float]]:
    """What every one of these models answers for `x` when no trigger is set."""
    with torch.no_grad():
        return Healthy()(torch.tensor(x, dtype=torch.float32)).tolist()
