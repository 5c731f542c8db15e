"""Exponential backoff, the one rule every retry loop follows (a database that is down, a sink that refuses
events, an image that failed transiently): delays double from ``first`` up to ``cap``."""

from __future__ import annotations


def nth_delay(attempt: int, first: float, cap: float) -> float:
    """The delay before retry number ``attempt`` (1-based): first, 2·first, 4·first, ... at most ``cap``."""
    return min(cap, first * 2 ** max(0, attempt - 1))


class Backoff:
    """Successive delays of one retry loop: ``next()`` after each failure, ``reset()`` after a success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap = first, cap
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return nth_delay(self.failures, self.first, self.cap)

    def reset(self) -> None:
        self.failures = 0
