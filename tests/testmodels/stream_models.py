"""A streaming model for the tests: its call is a generator of ticks, and it leaves a mark when it ends."""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Iterator

MARKS = os.path.join(tempfile.gettempdir(), "tenfold-test-streams")


def ended(token: int) -> str | None:
    """How the stream that carried `token` ended ("exhausted", "closed", or an exception's type name), or None
    while it runs (or before it started)."""
    try:
        with open(os.path.join(MARKS, str(token))) as f:
            return f.read()
    except FileNotFoundError:
        return None


class Ticks:
    """Yields 0, 1, 2... (`count` of them, or forever if negative), `period_s` apart; raises ValueError in place
    of tick `fail_at`. Its `finally` notes how it ended under `token`."""

    def __call__(self, count: int, period_s: float, fail_at: int, token: int) -> Iterator[int]:
        how = "exhausted"
        try:
            for i in range(count) if count >= 0 else itertools.count():
                if i == fail_at:
                    raise ValueError(f"tick {i} failed")
                if i:
                    # Short sleeps: an interrupt (TimeoutError) lands between two of them.
                    deadline = time.monotonic() + period_s
                    while time.monotonic() < deadline:
                        time.sleep(min(0.01, period_s))
                yield i
        except GeneratorExit:
            how = "closed"
            raise
        except BaseException as exc:
            how = type(exc).__name__
            raise
        finally:
            if token:
                os.makedirs(MARKS, exist_ok=True)
                with open(os.path.join(MARKS, str(token)), "w") as f:
                    f.write(how)


def ticks() -> Ticks:
    return Ticks()


EXAMPLE = (3, 0.0, -1, 0)
