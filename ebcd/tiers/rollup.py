"""Counting deliveries per tier: the figures of the alert state and the coverage report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Tally:
    """How an alert stands among a set of terminals."""

    targets: int = 0
    acked: int = 0
    failed: int = 0
    uncertain: int = 0
    pending: int = 0
    cancelled: int = 0

    def add(self, bucket: str, n: int = 1) -> None:
        """Count `n` terminals whose delivery is in `bucket` (acked/failed/uncertain/pending/cancelled)."""
        self.targets += n
        if bucket == "acked":
            self.acked += n
        elif bucket == "failed":
            self.failed += n
        elif bucket == "uncertain":
            self.uncertain += n
        elif bucket == "cancelled":
            self.cancelled += n
        else:
            self.pending += n

    @property
    def coverage(self) -> float:
        """Acknowledged share of the targets, 1.0 for an empty set."""
        return round(self.acked / self.targets, 4) if self.targets else 1.0

    def as_dict(self) -> dict[str, int | float]:
        """The JSON shape used in alert states and reports."""
        return {
            "targets": self.targets,
            "acked": self.acked,
            "failed": self.failed,
            "uncertain": self.uncertain,
            "pending": self.pending,
            "cancelled": self.cancelled,
            "coverage": self.coverage,
        }
