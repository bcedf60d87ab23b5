"""The journal: round trips, group commit, durability across kill -9, failures, backpressure."""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import sys
import tempfile
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebcd.delivery.records import DeliveryRecord
from ebcd.delivery.records import Transition as CoreTransition
from ebcd.delivery.recovery import delivery_row
from ebcd.delivery.state import DEvent, DState
from ebcd.journal import journal as store
from ebcd.journal.journal import (
    SCHEMA_VERSION,
    THREAD_NAME,
    Delivery,
    Journal,
    JournalError,
    NullJournal,
    Transition,
)

ROOT = Path(__file__).resolve().parents[2]
TERMINALS = 769
WAIT_S = 60.0


def _terminal(n: int) -> str:
    return f"43415230000000314010{n:03d}"


def _journal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture(autouse=True)
async def _no_leftovers() -> AsyncIterator[None]:
    """Fail a test that leaves tasks or journal writer threads behind."""
    yield
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    assert not tasks, f"tasks left behind: {tasks}"
    assert not _journal_threads(), "a journal writer thread was left running"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
async def journal(db_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(db_path)
    yield j
    await j.close()


def _inject_failure(db_path: Path, table: str, column: str, value: str) -> None:
    """Make inserts into `table` whose `column` equals `value` fail, from a second connection."""
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            f"CREATE TRIGGER boom BEFORE INSERT ON {table} WHEN NEW.{column} = '{value}'"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    conn.close()


async def test_received_round_trip(journal: Journal) -> None:
    first = await journal.record_received("ebc/in/alert", b"\x00{raw}", 1700000000.5, source="mqtt")
    second = await journal.record_received("ebc/in/cap", b"<alert/>", 1700000001.0, source="mqtt")
    await journal.mark_received(first, outcome="accepted", detail="ok", alert_id="A1")
    await journal.mark_received(second, outcome="rejected", detail="schema: no sender", alert_id=None)
    newest, oldest = await journal.list_received()
    assert second > first
    assert oldest.row_id == first
    assert (oldest.topic, oldest.payload, oldest.source, oldest.received_at) == (
        "ebc/in/alert",
        b"\x00{raw}",
        "mqtt",
        1700000000.5,
    )
    assert (oldest.outcome, oldest.detail, oldest.alert_id) == ("accepted", "ok", "A1")
    assert (newest.outcome, newest.detail, newest.alert_id) == ("rejected", "schema: no sender", None)
    with pytest.raises(JournalError, match="no received message"):
        await journal.mark_received(999, outcome="accepted", detail="", alert_id=None)


async def test_alert_round_trip_upsert_and_final(journal: Journal) -> None:
    doc: dict[str, Any] = {"final": False, "revision": 1, "text": "暴雨红色预警", "ttl_s": 3600.0}
    await journal.save_alert("A1", doc)
    assert await journal.get_alert("A1") == doc
    assert await journal.get_alert("nope") is None
    await journal.save_alert("A1", {**doc, "revision": 2})
    await journal.save_alert("A2", {"final": True})
    assert await journal.list_alerts() == [{"final": True}, {**doc, "revision": 2}]
    assert await journal.list_alerts(limit=1) == [{"final": True}]
    assert await journal.mark_final("A1") is True
    assert await journal.get_alert("A1") == {**doc, "revision": 2, "final": True}
    assert await journal.mark_final("nope") is False
    assert await journal.load_active() == []


async def test_dedupe_keys(journal: Journal) -> None:
    assert await journal.dedupe_key_seen("cma@example.cn", "id-1") is None
    await journal.save_alert("A1", {"final": False}, dedupe_key=("cma@example.cn", "id-1"))
    await journal.save_alert("A2", {"final": False}, dedupe_key=("cma@example.cn", "id-1"))
    assert await journal.dedupe_key_seen("cma@example.cn", "id-1") == "A1"  # the first claim wins
    assert await journal.dedupe_key_seen("other", "id-1") is None


async def test_dedupe_survives_restart(db_path: Path) -> None:
    j = await Journal.open(db_path)
    await j.save_alert("A1", {"final": True}, dedupe_key=("s", "i"))
    await j.close()
    j = await Journal.open(db_path)
    try:
        assert await j.dedupe_key_seen("s", "i") == "A1"
    finally:
        await j.close()


async def test_transitions_current_state_and_history(journal: Journal) -> None:
    await journal.save_alert("A1", {"final": False})
    journal.record_transition("A1", "T1", "sending", None, 10.0, attempt=True)
    journal.record_transition("A1", "T1", "uncertain", "timeout", 20.0)
    journal.record_transition("A1", "T1", "sending", None, 30.0, attempt=True)
    journal.record_transition("A1", "T1", "acked", "0x15 ok", 31.0)
    journal.record_transition("A1", "T2", "sending", None, 10.5, attempt=True)
    await journal.flush()
    assert await journal.deliveries("A1") == {
        "T1": Delivery("acked", "0x15 ok", 31.0, 2),
        "T2": Delivery("sending", None, 10.5, 1),
    }
    assert await journal.history("A1") == [
        Transition("T1", "sending", None, 10.0, True),
        Transition("T1", "uncertain", "timeout", 20.0, False),
        Transition("T1", "sending", None, 30.0, True),
        Transition("T1", "acked", "0x15 ok", 31.0, False),
        Transition("T2", "sending", None, 10.5, True),
    ]
    assert await journal.deliveries("nope") == {}


async def test_reads_see_transitions_queued_before_them(journal: Journal) -> None:
    journal.record_transition("A1", "T1", "sent", None, 1.0)
    assert (await journal.deliveries("A1"))["T1"].state == "sent"


async def test_load_active_returns_non_final_alerts_with_latest_states(journal: Journal) -> None:
    await journal.save_alert("old", {"final": False, "n": 1})
    await journal.save_alert("done", {"final": True})
    await journal.save_alert("nokey", {"n": 3})  # no "final" key: not final
    journal.record_transition("old", "T1", "sending", None, 1.0, attempt=True)
    journal.record_transition("old", "T1", "acked", None, 2.0)
    journal.record_transition("done", "T1", "acked", None, 2.0)
    active = await journal.load_active()
    assert [a.alert_id for a in active] == ["old", "nokey"]
    assert active[0].doc == {"final": False, "n": 1}
    assert active[0].deliveries == {"T1": Delivery("acked", None, 2.0, 1)}
    assert active[1].deliveries == {}


async def test_audit_round_trip(journal: Journal) -> None:
    await journal.record_audit("root", "cancel", {"alert_id": "A1", "via": "control socket"})
    await journal.record_audit("duty", "send", {"alert_id": "A2"})
    newest, oldest = await journal.list_audit()
    assert (oldest.actor, oldest.action, oldest.detail) == (
        "root",
        "cancel",
        {"alert_id": "A1", "via": "control socket"},
    )
    assert (newest.actor, newest.action) == ("duty", "send")
    assert newest.at >= oldest.at > 0


async def test_fan_out_is_group_committed(db_path: Path) -> None:
    commits: list[tuple[float, int]] = []
    j = await Journal.open(db_path, on_commit=lambda latency_s, rows: commits.append((latency_s, rows)))
    try:
        await j.save_alert("A1", {"final": False})
        before = j.stats.transactions
        for n in range(TERMINALS):
            j.record_transition("A1", _terminal(n), "sending", None, float(n), attempt=True)
        assert j.queue_depth > 0
        await j.flush()
        assert 1 <= j.stats.transactions - before <= 5
        assert len(await j.deliveries("A1")) == TERMINALS
        assert j.stats.rows_written >= 2 * TERMINALS + 1
        assert len(commits) == j.stats.transactions
        assert sum(rows for _, rows in commits) == j.stats.rows_written
        assert j.stats.last_commit_latency_s == commits[-1][0] > 0
    finally:
        await j.close()


async def test_concurrent_writers(journal: Journal) -> None:
    async def writer(n: int) -> None:
        for k in range(10):
            row = await journal.record_received(f"t/{n}", b"x", float(k), source="mqtt")
            await journal.save_alert(f"A{n}-{k}", {"final": k % 2 == 0, "n": n})
            await journal.mark_received(row, outcome="accepted", detail="", alert_id=f"A{n}-{k}")
            journal.record_transition(f"A{n}-{k}", "T1", "sent", None, float(k))
            await journal.record_audit(f"u{n}", "send", {"k": k})

    async with asyncio.TaskGroup() as tg:
        for n in range(50):
            tg.create_task(writer(n), name=f"writer-{n}")
    await journal.flush()
    assert len(await journal.list_alerts(limit=1000)) == 500
    assert len(await journal.load_active()) == 250
    received = await journal.list_received(limit=1000)
    assert len(received) == 500
    assert all(r.outcome == "accepted" for r in received)
    assert len(await journal.list_audit(limit=1000)) == 500
    assert journal.stats.transactions < 2000  # 2000 awaited writes shared transactions


async def test_null_journal_keeps_nothing() -> None:
    j = await NullJournal.open(Path("/nonexistent/journal.sqlite3"))
    assert not j.enabled
    assert Journal.enabled
    first = await j.record_received("t", b"x", 1.0, source="mqtt")
    assert await j.record_received("t", b"x", 1.0, source="mqtt") != first
    await j.mark_received(first, outcome="accepted", detail="", alert_id="A1")
    await j.save_alert("A1", {"final": False}, dedupe_key=("s", "i"))
    for n in range(TERMINALS):
        j.record_transition("A1", _terminal(n), "sent", None, 1.0)
    await j.flush()
    await j.record_audit("root", "send", {})
    assert await j.get_alert("A1") is None
    assert await j.list_alerts() == []
    assert await j.load_active() == []
    assert await j.deliveries("A1") == {}
    assert await j.history("A1") == []
    assert await j.dedupe_key_seen("s", "i") is None
    assert await j.list_received() == []
    assert await j.list_audit() == []
    assert j.queue_depth == 0
    assert j.stats.transactions == 0
    await j.close()
    with pytest.raises(JournalError):
        await j.save_alert("A2", {})


async def test_failed_write_fails_only_its_caller(journal: Journal, db_path: Path) -> None:
    _inject_failure(db_path, "audit", "actor", "boom")
    results = await asyncio.gather(
        journal.save_alert("A1", {"final": False}),
        journal.record_audit("boom", "send", {}),
        journal.record_audit("root", "send", {}),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], JournalError)
    assert results[2] is None
    assert await journal.get_alert("A1") == {"final": False}
    assert [e.actor for e in await journal.list_audit()] == ["root"]
    assert journal.stats.failed_transactions >= 1


async def test_lost_transition_fails_the_next_flush(journal: Journal, db_path: Path) -> None:
    _inject_failure(db_path, "transitions", "state", "boom")
    journal.record_transition("A1", "T1", "sent", None, 1.0)
    journal.record_transition("A1", "T2", "boom", None, 1.0)
    journal.record_transition("A1", "T3", "sent", None, 1.0)
    with pytest.raises(JournalError, match="1 transitions could not be journalled"):
        await journal.flush()
    await journal.flush()  # the loss is reported once
    assert sorted(await journal.deliveries("A1")) == ["T1", "T3"]
    assert journal.stats.lost_transitions == 1


async def test_one_bad_row_of_a_burst_loses_that_row_only(journal: Journal, db_path: Path) -> None:
    good = _delivery_rows(["T1", "T3"])
    _inject_failure(db_path, "transitions", "state", "boom")
    bad = {**good[0], "terminal": "T2", "state": "boom"}
    journal.record_deliveries([good[0], bad, good[1]])  # one queue op for the three rows
    with pytest.raises(JournalError, match="1 transitions could not be journalled"):
        await journal.flush()
    assert sorted(await journal.deliveries("A1")) == ["T1", "T3"]
    assert journal.stats.lost_transitions == 1


def _delivery_rows(terminals: list[str]) -> list[dict[str, Any]]:
    def sent(t: str) -> DeliveryRecord:
        return DeliveryRecord("A1", t, 1, DState.SENT, None, False, False, False, 1, 0, None, False)

    return [delivery_row(CoreTransition(DState.PENDING, DEvent.SEND, sent(t), 1.0), 1.0) for t in terminals]


async def test_a_locked_database_fails_the_batch_then_recovers(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 50)
    j = await Journal.open(db_path)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        results = await asyncio.gather(
            *(j.save_alert(f"A{n}", {"final": False}) for n in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, JournalError) for r in results)
        other.execute("ROLLBACK")
        await j.save_alert("B", {"final": False})
        assert [a.alert_id for a in await j.load_active()] == ["B"]
    finally:
        other.close()
        await j.close()


async def test_close_makes_queued_transitions_durable_and_is_idempotent(db_path: Path) -> None:
    j = await Journal.open(db_path)
    for n in range(TERMINALS):
        j.record_transition("A1", _terminal(n), "sent", None, 1.0)
    await j.close()
    await j.close()
    with pytest.raises(JournalError, match="closed"):
        j.record_transition("A1", "T1", "sent", None, 1.0)
    with pytest.raises(JournalError, match="closed"):
        await j.get_alert("A1")
    assert not (db_path.parent / (db_path.name + "-wal")).exists() or (
        (db_path.parent / (db_path.name + "-wal")).stat().st_size == 0
    )
    j = await Journal.open(db_path)
    try:
        assert len(await j.deliveries("A1")) == TERMINALS
    finally:
        await j.close()


async def test_wal_mode_and_schema_version(journal: Journal, db_path: Path) -> None:
    assert journal.synchronous == "FULL"
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    assert await journal.integrity_check() == ["ok"]


async def test_newer_schema_is_refused(db_path: Path) -> None:
    j = await Journal.open(db_path)
    await j.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_version (version, at) VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(JournalError, match="newer"):
        await Journal.open(db_path)


async def test_unopenable_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="cannot open"):
        await Journal.open(tmp_path)  # a directory
    with pytest.raises(JournalError, match="synchronous"):
        await Journal.open(tmp_path / "j.sqlite3", synchronous="OFF")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "doc",
    [{"final": "no"}, {"final": False, "ttl": math.inf}, {"final": False, "when": object()}],
)
async def test_bad_documents_are_refused(journal: Journal, doc: dict[str, Any]) -> None:
    with pytest.raises(JournalError):
        await journal.save_alert("A1", doc)
    assert await journal.get_alert("A1") is None


async def test_backpressure_blocks_producers_and_drops_nothing(db_path: Path) -> None:
    j = await Journal.open(db_path, max_queue_ops=8)
    try:
        await asyncio.gather(*(j.save_alert(f"A{n}", {"final": False}) for n in range(300)))
        assert len(await j.list_alerts(limit=1000)) == 300
        assert j.stats.backpressure_wait_s > 0
    finally:
        await j.close()


async def test_a_cancelled_caller_does_not_withdraw_its_write(journal: Journal) -> None:
    task = asyncio.create_task(journal.save_alert("A1", {"final": False}), name="save")
    await asyncio.sleep(0)  # let it enqueue
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await journal.get_alert("A1") == {"final": False}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=30, deadline=None)
@given(doc=st.dictionaries(st.text().filter(lambda k: k != "final"), json_values, max_size=6))
def test_any_json_document_round_trips(doc: dict[str, Any]) -> None:
    async def round_trip(path: Path) -> None:
        j = await Journal.open(path)
        try:
            await j.save_alert("A1", doc)
            assert await j.get_alert("A1") == doc
            assert await j.mark_final("A1")
            assert await j.get_alert("A1") == {**doc, "final": True}
        finally:
            await j.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(round_trip(Path(tmp) / "journal.sqlite3"))


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import structlog
    from ebcd.journal.journal import Journal

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the channel

    async def main() -> None:
        j = await Journal.open(Path(sys.argv[1]))
        row = await j.record_received("ebc/in/alert", b"raw", 1.5, source="mqtt")
        await j.mark_received(row, outcome="accepted", detail="ok", alert_id="A1")
        await j.save_alert("A1", {"final": False, "text": "flood"}, dedupe_key=("cma", "id-1"))
        await j.save_alert("A0", {"final": True})
        for n in range(769):
            j.record_transition("A1", f"T{n:03d}", "sending", None, float(n), attempt=True)
        for n in range(0, 769, 2):
            j.record_transition("A1", f"T{n:03d}", "acked", "ok", 1000.0 + n)
        await j.flush()
        print("durable", flush=True)
        i = 0
        while True:  # keep writing until killed, so the kill lands mid-transaction
            for n in range(769):
                j.record_transition(f"B{i}", f"T{n:03d}", "sending", None, float(n))
            await j.save_alert(f"B{i}", {"final": False, "i": i})
            print(f"saved B{i}", flush=True)
            i += 1

    asyncio.run(main())
    """
)


async def test_awaited_writes_survive_kill_9(tmp_path: Path, db_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(db_path), stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while len([line for line in lines if line.startswith("saved")]) < 10:
            line = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
            assert line, f"the child ended early after {lines}"
            lines.append(line.decode().strip())
        assert lines.index("durable") < min(i for i, line in enumerate(lines) if line.startswith("saved"))
    finally:
        proc.kill()  # SIGKILL
        rest = await asyncio.wait_for(proc.stdout.read(), WAIT_S)
        assert await proc.wait() == -9
    lines += rest.decode().splitlines()
    acknowledged = [line.removeprefix("saved ") for line in lines if line.startswith("saved")]

    j = await Journal.open(db_path)
    try:
        assert await j.integrity_check() == ["ok"]
        assert await j.get_alert("A1") == {"final": False, "text": "flood"}
        assert await j.dedupe_key_seen("cma", "id-1") == "A1"
        (received,) = await j.list_received()
        assert (received.payload, received.outcome, received.alert_id) == (b"raw", "accepted", "A1")
        active = {a.alert_id: a for a in await j.load_active()}
        assert "A0" not in active
        deliveries = active["A1"].deliveries
        assert len(deliveries) == TERMINALS
        assert deliveries["T000"] == Delivery("acked", "ok", 1000.0, 1)
        assert deliveries["T001"] == Delivery("sending", None, 1.0, 1)
        assert len(await j.history("A1")) == TERMINALS + (TERMINALS + 1) // 2
        for alert_id in acknowledged:  # every write the child saw acknowledged is there
            assert alert_id in active
            assert len(active[alert_id].deliveries) == TERMINALS
    finally:
        await j.close()
