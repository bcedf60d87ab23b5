"""Capped exponential backoff with jitter: one rule for retries, reconnects and reopened ports."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """`initial_s * 2^(attempt-1)`, at most `max_s`, then +/- `jitter` (a fraction)."""

    initial_s: float = 1.0
    max_s: float = 30.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base: float = min(self.max_s, self.initial_s * 2.0 ** max(0, attempt - 1))
        return base * (1 + rng.uniform(-self.jitter, self.jitter))
