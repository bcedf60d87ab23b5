"""Retention: `Journal.prune` and `run_retention` on a real SQLite journal.

Raw payloads of judged messages older than the cutoff are cleared (the rows and verdicts stay);
unjudged and recent ones are kept. With alert retention, final alerts unchanged since the cutoff
go with their deliveries, transitions and dedupe claims; alerts that are not final stay, however
old. The journal's wall clock (`time.time` as `ebcd.journal.journal` sees it) is set by the tests,
so "old" is exact.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from ebcd.config import ConfigError, JournalConfig, load_config, shipped_config_path
from ebcd.journal import journal as store
from ebcd.journal.journal import Journal, JournalError, PruneResult
from ebcd.journal.retention import DAY_S, cutoffs, run_retention

T0 = 1_764_160_000.0  # wall clock at the start of each test
RAW_BEFORE = T0 + 10 * DAY_S  # the cutoff the tests prune with
WAIT_S = 10.0


class Wall:
    """The journal module's wall clock, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Wall:
    clock = Wall(T0)
    monkeypatch.setattr(store, "time", SimpleNamespace(time=clock.time))
    return clock


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
async def journal(db_path: Path, wall: Wall) -> AsyncIterator[Journal]:
    j = await Journal.open(db_path)
    yield j
    await j.close()


def _rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the journal from a second connection, as a checker would."""
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def _message(journal: Journal, payload: bytes, at: float, verdict: str | None) -> int:
    row_id = await journal.record_received("ebc/v1/x/alerts/in", payload, at, source="mqtt")
    if verdict is not None:
        await journal.mark_received(row_id, outcome=verdict, detail=f"{verdict} detail", alert_id="A")
    return row_id


async def _alert(journal: Journal, alert_id: str, *, final: bool, terminals: int, claim: str | None) -> None:
    """An alert as the daemon journals it: its doc, a delivery per terminal with two transitions."""
    key = ("city-ews", claim) if claim else None
    await journal.save_alert(alert_id, {"id": alert_id, "final": final}, dedupe_key=key)
    for n in range(terminals):
        code = f"6341523{n:016d}"
        journal.record_transition(alert_id, code, "sent", None, T0, attempt=True)
        journal.record_transition(alert_id, code, "acknowledged", "done", T0 + 1)
    await journal.flush()


# -- raw payloads ------------------------------------------------------------------------------
async def test_prune_clears_exactly_the_old_judged_payloads(journal: Journal, db_path: Path) -> None:
    old_accepted = await _message(journal, b"A" * 5000, T0, "accepted")
    old_refused = await _message(journal, b"<alert>" + b"B" * 3000, T0 + DAY_S, "schema")
    old_unjudged = await _message(journal, b"C" * 700, T0 + 2 * DAY_S, None)  # a crash came first
    at_cutoff = await _message(journal, b"D" * 100, RAW_BEFORE, "accepted")  # not older than it
    recent = await _message(journal, b"E" * 200, RAW_BEFORE + DAY_S, "duplicate")

    result = await journal.prune(RAW_BEFORE, None)

    assert result == PruneResult(payloads=2, bytes_freed=5000 + 3007)
    assert result.rows == 2
    rows = {
        row_id: (payload, outcome, detail, alert_id, at)
        for row_id, payload, outcome, detail, alert_id, at in _rows(
            db_path, "SELECT id, payload, outcome, detail, alert_id, received_at FROM received"
        )
    }
    assert rows[old_accepted] == (b"", "accepted", "accepted detail", "A", T0)  # the verdict stays
    assert rows[old_refused] == (b"", "schema", "schema detail", "A", T0 + DAY_S)
    assert rows[old_unjudged] == (b"C" * 700, None, None, None, T0 + 2 * DAY_S)
    assert rows[at_cutoff][0] == b"D" * 100
    assert rows[recent][0] == b"E" * 200
    assert [r.row_id for r in await journal.unjudged()] == [old_unjudged]
    assert (await journal.unjudged())[0].payload == b"C" * 700  # still there to be judged
    assert await journal.prune(RAW_BEFORE, None) == PruneResult()  # nothing left to prune


async def test_payloads_are_pruned_in_short_transactions(
    journal: Journal, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "PRUNE_BATCH_ROWS", 2)
    for n in range(7):
        await _message(journal, b"x" * (n + 1), T0 + n, "accepted" if n != 3 else None)
    before = journal.stats.transactions

    result = await journal.prune(RAW_BEFORE, None)

    assert (result.payloads, result.bytes_freed) == (6, 28 - 4)
    assert journal.stats.transactions - before == 3  # 6 payloads, 2 per transaction
    assert _rows(db_path, "SELECT id FROM received WHERE length(payload) > 0") == [(4,)]


async def test_a_message_judged_after_the_count_loses_its_payload_only_once_judged(
    journal: Journal, db_path: Path
) -> None:
    row_id = await _message(journal, b"late", T0, None)
    assert await journal.prune(RAW_BEFORE, None) == PruneResult()
    await journal.mark_received(row_id, outcome="accepted", detail="recovered", alert_id=None)
    assert await journal.prune(RAW_BEFORE, None) == PruneResult(payloads=1, bytes_freed=4)


# -- alerts --------------------------------------------------------------------------------------
async def test_alert_retention_deletes_old_final_alerts_and_keeps_active_ones(
    journal: Journal, db_path: Path, wall: Wall
) -> None:
    await _alert(journal, "20261126-0001", final=True, terminals=3, claim="cap-1")  # old, ended
    await _alert(journal, "20261126-0002", final=False, terminals=2, claim="cap-2")  # old, not final
    await _alert(journal, "20261126-0003", final=False, terminals=1, claim=None)
    await journal.mark_final("20261126-0003")  # ended too, long ago
    await journal.record_audit("duty", "send", {"id": "20261126-0001"})
    wall.now = T0 + 20 * DAY_S
    await _alert(journal, "20261216-0001", final=True, terminals=2, claim="cap-3")  # ended recently
    doc_bytes = sum(
        n for (n,) in _rows(db_path, "SELECT length(doc) FROM alerts WHERE alert_id LIKE '20261126-000_'")
    )

    result = await journal.prune(RAW_BEFORE, RAW_BEFORE)

    assert (result.alerts, result.deliveries, result.transitions, result.dedupe) == (2, 4, 8, 1)
    assert result.payloads == 0
    assert result.bytes_freed > doc_bytes  # the documents and the delivery rows' text
    for gone in ("20261126-0001", "20261126-0003"):
        assert await journal.get_alert(gone) is None
        assert await journal.deliveries(gone) == {}
        assert await journal.history(gone) == []
    assert await journal.dedupe_key_seen("city-ews", "cap-1") is None
    active = await journal.load_active()  # the alert that is not final keeps everything
    assert [(a.alert_id, len(a.deliveries)) for a in active] == [("20261126-0002", 2)]
    assert len(await journal.history("20261126-0002")) == 4
    assert await journal.dedupe_key_seen("city-ews", "cap-2") == "20261126-0002"
    assert len(await journal.deliveries("20261216-0001")) == 2  # ended, but not long enough ago
    assert await journal.dedupe_key_seen("city-ews", "cap-3") == "20261216-0001"
    assert len(await journal.list_audit()) == 1  # the audit is never pruned
    assert await journal.prune(RAW_BEFORE, RAW_BEFORE) == PruneResult()
    assert await journal.integrity_check() == ["ok"]


async def test_ended_alerts_are_kept_forever_without_alert_retention(journal: Journal) -> None:
    await _alert(journal, "20261126-0001", final=True, terminals=2, claim="cap-1")
    await _message(journal, b"{}", T0, "accepted")

    result = await journal.prune(T0 + 1000 * DAY_S, None)

    assert result == PruneResult(payloads=1, bytes_freed=2)
    assert await journal.get_alert("20261126-0001") is not None
    assert len(await journal.history("20261126-0001")) == 4
    assert await journal.dedupe_key_seen("city-ews", "cap-1") == "20261126-0001"


async def test_an_old_alert_that_is_updated_again_is_kept(journal: Journal, wall: Wall) -> None:
    await _alert(journal, "20261126-0001", final=True, terminals=1, claim=None)
    wall.now = RAW_BEFORE + 1  # saved again after the cutoff (a late state, a cancel)
    await journal.save_alert("20261126-0001", {"id": "20261126-0001", "final": True})

    assert await journal.prune(RAW_BEFORE, RAW_BEFORE) == PruneResult()
    assert await journal.get_alert("20261126-0001") is not None


async def test_alerts_are_deleted_a_few_per_transaction(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "PRUNE_BATCH_ALERTS", 2)
    for n in range(5):
        await _alert(journal, f"20261126-{n + 1:04d}", final=True, terminals=2, claim=f"cap-{n}")
    await _alert(journal, "20261126-0009", final=False, terminals=2, claim=None)

    result = await journal.prune(RAW_BEFORE, RAW_BEFORE)

    assert (result.alerts, result.deliveries, result.transitions, result.dedupe) == (5, 10, 20, 5)
    assert [a["id"] for a in await journal.list_alerts()] == ["20261126-0009"]
    assert await journal.dedupe_claims() == []


# -- the loop ------------------------------------------------------------------------------------
@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


async def test_run_retention_prunes_at_start_then_every_interval(
    journal: Journal, logs: list[MutableMapping[str, Any]]
) -> None:
    config = JournalConfig(raw_retention_days=10, alert_retention_days=10, retention_interval_s=0.01)
    await _message(journal, b"old", T0, "accepted")
    await _alert(journal, "20261126-0001", final=True, terminals=1, claim=None)
    passes: asyncio.Queue[PruneResult] = asyncio.Queue()
    task = asyncio.create_task(
        run_retention(journal, config, on_pruned=passes.put_nowait, clock=lambda: T0 + 11 * DAY_S)
    )
    try:
        first = await asyncio.wait_for(passes.get(), WAIT_S)
        assert (first.payloads, first.alerts, first.deliveries, first.transitions) == (1, 1, 1, 2)
        second = await asyncio.wait_for(passes.get(), WAIT_S)
        assert second == PruneResult()  # a pass that pruned nothing
        await _message(journal, b"older", T0 - DAY_S, "unknown_event")
        while (later := await asyncio.wait_for(passes.get(), WAIT_S)) == PruneResult():
            pass
        assert later == PruneResult(payloads=1, bytes_freed=5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    pruned = [e for e in logs if e["event"] == "journal.pruned"]
    assert len(pruned) == 2  # one line per pass that pruned anything
    assert pruned[0]["payloads"] == 1
    assert pruned[0]["alerts"] == 1
    assert pruned[0]["raw_before"] == T0 + DAY_S


async def test_a_failed_pass_is_logged_and_the_next_one_prunes(
    db_path: Path, wall: Wall, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 50)
    journal = await Journal.open(db_path)
    other = sqlite3.connect(db_path, isolation_level=None)
    passes: asyncio.Queue[PruneResult] = asyncio.Queue()
    failed = asyncio.Event()
    prune = journal.prune

    async def watched(raw_before: float, alerts_before: float | None) -> PruneResult:
        try:
            return await prune(raw_before, alerts_before)
        except JournalError:
            failed.set()
            raise

    monkeypatch.setattr(journal, "prune", watched)
    task: asyncio.Task[None] | None = None
    try:
        await _message(journal, b"old", T0, "accepted")
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the first pass fails
        config = JournalConfig(raw_retention_days=1, retention_interval_s=0.05)
        task = asyncio.create_task(run_retention(journal, config, on_pruned=passes.put_nowait))
        await asyncio.wait_for(failed.wait(), WAIT_S)
        other.execute("ROLLBACK")
        assert await asyncio.wait_for(passes.get(), WAIT_S) == PruneResult(payloads=1, bytes_freed=3)
        assert passes.empty()  # the failed pass reported nothing
        assert [e["error"] for e in logs if e["event"] == "journal.prune_failed"] == [
            "journal: database is locked"
        ]
    finally:
        if task is not None:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        other.close()
        await journal.close()


async def test_a_null_journal_has_nothing_to_prune() -> None:
    journal = await store.NullJournal.open()
    assert await journal.prune(T0, T0) == PruneResult()
    await asyncio.wait_for(run_retention(journal, JournalConfig()), WAIT_S)  # returns at once
    await journal.close()


# -- configuration -------------------------------------------------------------------------------
def test_the_defaults_keep_payloads_30_days_and_alerts_forever() -> None:
    config = load_config(shipped_config_path()).journal
    assert config == JournalConfig()
    assert (config.raw_retention_days, config.alert_retention_days, config.retention_interval_s) == (
        30.0,
        None,
        3600.0,
    )
    assert cutoffs(config, T0) == (T0 - 30 * DAY_S, None)
    assert cutoffs(JournalConfig(alert_retention_days=365), T0) == (T0 - 30 * DAY_S, T0 - 365 * DAY_S)


def test_the_journal_section_is_validated(tmp_path: Path) -> None:
    shipped = shipped_config_path().read_text(encoding="utf-8")
    path = tmp_path / "ebcd.toml"
    path.write_text(shipped + "\n[journal]\nraw_retention_days = 7\nalert_retention_days = 365\n")
    assert load_config(path).journal == JournalConfig(raw_retention_days=7, alert_retention_days=365)
    path.write_text(shipped + "\n[journal]\nraw_retention_day = 7\n")
    with pytest.raises(ConfigError, match=r"\[journal\.raw_retention_day\] Extra inputs are not permitted"):
        load_config(path)
    with pytest.raises(ValidationError):
        JournalConfig(raw_retention_days=0)
