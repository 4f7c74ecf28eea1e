"""The simulator's virtual clock: the engine reads it for every timestamp, the executor advances it."""

from __future__ import annotations


class VirtualClock:
    """Seconds since the simulation started; only moves forward."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        if t > self.now:
            self.now = t
