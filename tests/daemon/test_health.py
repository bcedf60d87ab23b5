"""`JournalHealth`: degraded from the first failed journal write until quiet and a success since.

First the rules, on counters set by hand and a fake clock; then on a real SQLite journal whose
writes are made to fail for real: its WAL made immutable (`chattr +i`, as root: a disk I/O error
on the next commit) and another connection holding the write lock (busy).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ebcd.daemon.health import CLEAR_AFTER_S, COMPONENT, JournalHealth
from ebcd.journal import journal as store
from ebcd.journal.journal import Journal, JournalError, JournalStats
from ebcd.metrics import Metrics


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _failures(metrics: Metrics, what: str) -> float:
    value = metrics.registry.get_sample_value("ebcd_journal_failures_total", {"what": what})
    assert value is not None, f"no series ebcd_journal_failures_total{{what={what!r}}}"
    return value


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


# -- the rules -----------------------------------------------------------------------------------
def test_the_failure_counters_exist_from_the_start(metrics: Metrics) -> None:
    assert _failures(metrics, "transaction") == 0.0
    assert _failures(metrics, "delivery") == 0.0


def test_healthy_while_transactions_commit(clock: Clock, metrics: Metrics) -> None:
    stats = JournalStats()
    health = JournalHealth(lambda: stats, metrics, clock)
    assert health.check() is False
    stats.transactions += 5
    clock.now += 100
    assert health.check() is False
    assert (health.degraded, health.reason) == (False, None)
    assert health.component == COMPONENT == "journal"


def test_degraded_from_the_first_failure_until_quiet_and_a_success(clock: Clock, metrics: Metrics) -> None:
    stats = JournalStats(transactions=3)
    changes: list[tuple[bool, str | None]] = []
    health = JournalHealth(lambda: stats, metrics, clock, on_change=lambda d, r: changes.append((d, r)))
    health.check()

    stats.failed_transactions += 2
    assert health.check() is True
    assert health.reason == "2 journal transactions failed"
    assert _failures(metrics, "transaction") == 2.0

    stats.transactions += 1  # a success, but too soon after the failure
    clock.now += CLEAR_AFTER_S - 1
    assert health.check() is True
    clock.now += 1  # quiet long enough, and a success since the failure
    assert health.check() is False
    assert health.reason is None
    assert changes == [(True, "2 journal transactions failed"), (False, None)]
    assert _failures(metrics, "transaction") == 2.0  # counted once


def test_quiet_alone_does_not_clear_it(clock: Clock, metrics: Metrics) -> None:
    stats = JournalStats()
    health = JournalHealth(lambda: stats, metrics, clock, clear_after_s=10)
    stats.failed_transactions = 1
    assert health.check() is True
    clock.now += 3600  # nothing written at all: nothing proves the journal works again
    assert health.check() is True
    stats.transactions = 1
    assert health.check() is False


def test_a_new_failure_starts_the_wait_again(clock: Clock, metrics: Metrics) -> None:
    stats = JournalStats()
    health = JournalHealth(lambda: stats, metrics, clock)
    stats.failed_transactions = 1
    health.check()
    clock.now += 20
    stats.failed_transactions, stats.transactions = 2, 1
    assert health.check() is True
    assert health.reason == "2 journal transactions failed"
    clock.now += 20  # 40 s since the first failure, 20 since the last
    stats.transactions = 2
    assert health.check() is True
    clock.now += 10
    assert health.check() is False
    assert _failures(metrics, "transaction") == 2.0


def test_lost_transitions_degrade_it_and_count_as_deliveries(clock: Clock, metrics: Metrics) -> None:
    stats = JournalStats()
    health = JournalHealth(lambda: stats, metrics, clock)
    stats.lost_transitions = 3
    assert health.check() is True
    assert health.reason == "3 delivery transitions could not be journalled"
    stats.failed_transactions = 1
    health.check()
    assert health.reason == "1 journal transaction failed; 3 delivery transitions could not be journalled"
    assert _failures(metrics, "delivery") == 3.0
    assert _failures(metrics, "transaction") == 1.0


def test_a_journal_opened_again_counts_from_zero(clock: Clock, metrics: Metrics) -> None:
    holder = [JournalStats(transactions=10, failed_transactions=4)]
    health = JournalHealth(lambda: holder[0], metrics, clock)
    assert health.check() is True  # failures since the journal opened count
    holder[0] = JournalStats()  # a new journal: its counters start again
    clock.now += CLEAR_AFTER_S
    assert health.check() is True  # no success in the new journal yet
    holder[0].transactions = 1
    assert health.check() is False
    holder[0].failed_transactions = 1
    assert health.check() is True
    assert _failures(metrics, "transaction") == 5.0


# -- a real journal that fails ---------------------------------------------------------------------
@pytest.fixture
async def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Journal]:
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 50)
    j = await Journal.open(tmp_path / "state" / "journal.sqlite3")
    yield j
    await j.close()


def _chattr(flag: str, path: Path) -> subprocess.CompletedProcess[str]:
    chattr = shutil.which("chattr")
    assert chattr is not None
    return subprocess.run([chattr, flag, str(path)], capture_output=True, text=True, check=False)


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files the test makes immutable (`chattr +i`, see `_make_immutable`), mutable again after it."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and e2fsprogs")
    paths: list[Path] = []
    yield paths
    for path in paths:
        assert _chattr("-i", path).returncode == 0


def _make_immutable(path: Path, registry: list[Path]) -> None:
    done = _chattr("+i", path)
    if done.returncode != 0:
        pytest.skip(f"chattr +i {path}: {done.stderr.strip()} (the file system does not support it)")
    registry.append(path)


async def test_a_disk_that_refuses_writes_degrades_the_journal_until_it_recovers(
    journal: Journal, immutable: list[Path], clock: Clock, metrics: Metrics
) -> None:
    health = JournalHealth(lambda: journal.stats, metrics, clock)
    await journal.save_alert("A0", {"final": False})
    assert health.check() is False
    wal = journal.path.with_name(journal.path.name + "-wal")
    _make_immutable(wal, immutable)

    with pytest.raises(JournalError, match="disk I/O error"):
        await journal.save_alert("A1", {"final": False})

    assert journal.stats.failed_transactions == 1
    assert health.check() is True
    assert health.reason == "1 journal transaction failed"
    assert _failures(metrics, "transaction") == 1.0

    assert _chattr("-i", wal).returncode == 0  # the disk is back
    immutable.remove(wal)
    await journal.save_alert("A2", {"final": False})
    assert health.check() is True  # a success, but the failure is too recent
    clock.now += CLEAR_AFTER_S
    assert health.check() is False
    assert [a.alert_id for a in await journal.load_active()] == ["A0", "A2"]


async def test_a_locked_database_degrades_the_journal_until_it_recovers(
    journal: Journal, clock: Clock, metrics: Metrics
) -> None:
    health = JournalHealth(lambda: journal.stats, metrics, clock)
    other = sqlite3.connect(journal.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        results = await asyncio.gather(
            *(journal.save_alert(f"A{n}", {"final": False}) for n in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, JournalError) for r in results)
        journal.record_transition("A0", "T1", "sent", None, 1.0)
        with pytest.raises(JournalError):
            await journal.flush()
        other.execute("ROLLBACK")
    finally:
        other.close()

    assert health.check() is True
    stats = journal.stats
    assert stats.failed_transactions >= 2
    assert stats.lost_transitions == 1
    assert _failures(metrics, "transaction") == stats.failed_transactions
    assert _failures(metrics, "delivery") == 1.0

    clock.now += CLEAR_AFTER_S
    assert health.check() is True  # quiet, but nothing has committed since
    await journal.save_alert("B", {"final": False})
    assert health.check() is False
    assert health.reason is None
