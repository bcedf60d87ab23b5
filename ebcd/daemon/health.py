"""The journal's health, for the daemon's status topic: degraded while its writes fail.

`JournalHealth.check()`, called periodically by the daemon, compares the journal's counters
(`ebcd.journal.worker.JournalStats`) with those it saw last. A failed transaction or a lost
transition makes the journal degraded at once, and is counted in
`ebcd_journal_failures_total{what="transaction"}` (failed transactions) and
`{what="delivery"}` (delivery transitions that could not be journalled). It stays degraded until
`clear_after_s` have passed since the last failure seen *and* a transaction has committed since
then: quiet alone proves nothing (nothing may have been written), one success alone may be luck
between failures.

Counters that go backwards (the journal was opened again) are taken as a new start. The class
reads no clock but the one it is given and does no I/O: its tests drive it with a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import structlog

from ebcd.journal.worker import JournalStats
from ebcd.metrics import Metrics

log = structlog.get_logger(__name__)

CLEAR_AFTER_S: Final = 30.0
COMPONENT: Final = "journal"  # its name in the status topic's "degraded" list

OnChange = Callable[[bool, str | None], None]


class JournalHealth:
    """Whether the journal's writes are failing; `check()` it periodically.

    `journal_stats_provider` returns the journal's current `JournalStats` (for a daemon that
    holds its journal as `self.journal`: `lambda: self.journal.stats`); `clock` is monotonic, in
    seconds. `on_change(degraded, reason)` is called whenever `degraded` flips.
    """

    component: Final = COMPONENT

    def __init__(
        self,
        journal_stats_provider: Callable[[], JournalStats],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        clear_after_s: float = CLEAR_AFTER_S,
        on_change: OnChange | None = None,
    ) -> None:
        self._stats = journal_stats_provider
        self._metrics = metrics
        self._clock = clock
        self.clear_after_s = clear_after_s
        self._on_change = on_change
        self.degraded = False
        self.reason: str | None = None  # why it is degraded; None while it is not
        self._failed = self._lost = self._transactions = 0  # the counters as last seen
        self._last_failure_at = 0.0
        self._transactions_at_failure = 0  # stats.transactions when the last failure was seen
        self._failed_since = self._lost_since = 0  # failures since it became degraded

    def check(self) -> bool:
        """Read the journal's counters, count new failures; True while the journal is degraded."""
        stats, now = self._stats(), self._clock()
        if (
            stats.failed_transactions < self._failed
            or stats.lost_transitions < self._lost
            or stats.transactions < self._transactions
        ):  # a journal opened again counts from zero
            self._failed = self._lost = self._transactions_at_failure = 0
        self._transactions = stats.transactions
        failed = stats.failed_transactions - self._failed
        lost = stats.lost_transitions - self._lost
        self._failed, self._lost = stats.failed_transactions, stats.lost_transitions
        if failed:
            self._metrics.journal_failures.labels("transaction").inc(failed)
        if lost:
            self._metrics.journal_failures.labels("delivery").inc(lost)
        if failed or lost:
            self._last_failure_at = now
            self._transactions_at_failure = stats.transactions
            if not self.degraded:
                self._failed_since = self._lost_since = 0
            self._failed_since += failed
            self._lost_since += lost
            self.reason = _reason(self._failed_since, self._lost_since)
            if not self.degraded:
                self._flip(True, failed=failed, lost=lost)
        elif (
            self.degraded
            and now - self._last_failure_at >= self.clear_after_s
            and stats.transactions > self._transactions_at_failure
        ):
            self.reason = None
            self._flip(False, failed=self._failed_since, lost=self._lost_since)
        return self.degraded

    def _flip(self, degraded: bool, *, failed: int, lost: int) -> None:
        self.degraded = degraded
        if degraded:
            log.warning(
                "journal.degraded", reason=self.reason, failed_transactions=failed, lost_transitions=lost
            )
        else:
            log.info("journal.recovered", failed_transactions=failed, lost_transitions=lost)
        if self._on_change is not None:
            self._on_change(degraded, self.reason)


def _reason(failed: int, lost: int) -> str:
    parts = []
    if failed:
        parts.append(f"{failed} journal transaction{'s' if failed != 1 else ''} failed")
    if lost:
        parts.append(f"{lost} delivery transition{'s' if lost != 1 else ''} could not be journalled")
    return "; ".join(parts)
