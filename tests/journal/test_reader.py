"""The journal read read-only: alert history for `alert list`, `alert status` and `report` without a daemon.

Every journal here is a real one, written by `ebcd.journal.journal.Journal` as the daemon writes it
(alert docs, delivery transitions), on the shipped district. `build_journal` is shared with the CLI
tests (tests/cli/test_history.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ebcd.journal import journal as store
from ebcd.journal.journal import SCHEMA_VERSION, Journal
from ebcd.journal.reader import (
    JOURNAL_FILE,
    OPTIONAL_DELIVERY_COLUMNS,
    JournalReader,
    JournalUnavailable,
    journal_path,
)
from ebcd.tiers.district import District
from ebcd.tiers.rollup import Tally

ROOT = Path(__file__).resolve().parents[2]
ACCEPTED_AT = 1_764_160_000.0  # wall clock of the first alert
NOW = ACCEPTED_AT + 3600.0  # the readers' clock in these tests
CHENGGUAN = "53415231000000314010101"  # 城关镇: 4 own terminals, 24 villages
TAOXI = "53415231040000314010101"  # 桃溪镇: 103 terminals
XIAOTIAN = "53415231060000314010101"  # 晓天镇
CONTRACT_KEYS = {"id", "identifier", "state", "ebm_state", "level", "targets", "acked", "failed"}
CONTRACT_KEYS |= {"uncertain", "pending", "coverage", "towns"}
BUCKET = {"acknowledged": "acked", "refused": "failed", "expired": "failed", "cancelled": "failed"}
BUCKET |= {"uncertain": "uncertain"}
EBM = {"completed": 3, "partial": 4, "cancelled": 5, "dispatching": 2}


@dataclass
class Alert:
    """What a test alert is, for the assertions: its id, final state and deliveries."""

    id: str
    state: str
    deliveries: Mapping[str, tuple[str, str | None, int]]  # terminal -> (state, detail, attempts)
    left: set[str] = field(default_factory=set)  # terminals an update took out of its area
    refused: list[tuple[str, str]] = field(default_factory=list)  # every refusal, in order

    def buckets(self) -> dict[str, str]:
        return {t: BUCKET.get(s, "pending") for t, (s, _, _) in self.deliveries.items()}


@dataclass
class History:
    """A journal with one alert of each kind (ids as in the daemon: YYYYMMDD-NNNN), oldest first."""

    path: Path
    completed: Alert  # a town alert, everything acknowledged; saved with its state_doc
    legacy: Alert  # partial, revision 2, saved (as before state_doc existed) with counts only
    cancelled: Alert
    active: Alert  # still dispatching, 600 s left
    scheduled: Alert  # a scheduled test broadcast that two terminals missed

    @property
    def alerts(self) -> list[Alert]:
        return [self.completed, self.legacy, self.cancelled, self.active, self.scheduled]


def _request(
    text: str, *, test: bool = False, level: int = 2, identifier: str | None = None
) -> dict[str, Any]:
    return {
        "identifier": identifier,
        "sender": "cli" if identifier is None else "cma",
        "msg_type": "alert",
        "references": [],
        "level": level,
        "event_type": "10000" if not test else "11B03",
        "targets": [{"kind": "all", "code": None}],
        "text": text,
        "test": test,
        "ttl_s": 3600.0,
        "volume": 255,
        "origin": "district",
        "origin_room": None,
        "language": None,
    }


def _state_doc(
    district: District,
    alert: Alert,
    request: dict[str, Any],
    accepted_at: float,
    revision: int = 1,
    reason: str | None = None,
) -> dict[str, Any]:
    """The alert state as the daemon publishes it (Alert.state_doc)."""
    buckets = alert.buckets()
    t = district.tally(buckets)
    towns = {
        code: {"name": district.towns[code].name, **tally.as_dict()}
        for code, tally in sorted(district.town_tallies(buckets).items())
    }
    return {
        "id": alert.id,
        "identifier": request["identifier"],
        "sender": request["sender"],
        "ebmid": f"EBM-{alert.id}",
        "revision": revision,
        "state": alert.state,
        "ebm_state": EBM[alert.state],
        "level": request["level"],
        "event_type": request["event_type"],
        "test": request["test"],
        "text": request["text"],
        "targets": t.targets,
        "acked": t.acked,
        "failed": t.failed,
        "uncertain": t.uncertain,
        "pending": t.pending,
        "coverage": round(t.acked / t.targets, 4) if t.targets else 0.0,
        "towns": towns,
        "accepted_at": accepted_at,
        "ttl_remaining_s": 1234.5,  # as last published; a reader recomputes it
        "reason": reason,
    }


def _doc(
    alert: Alert,
    request: dict[str, Any],
    *,
    accepted_at: float,
    final: bool,
    state_doc: dict[str, Any] | None,
    revision: int = 1,
    source: str = "cli",
    reason: str | None = None,
) -> dict[str, Any]:
    """The journal's alert document (admission.alert_doc), with the state_doc when given."""
    counts = dict.fromkeys(("acked", "failed", "uncertain", "pending"), 0)
    for code, bucket in alert.buckets().items():
        if code not in alert.left:
            counts[bucket] += 1
    doc: dict[str, Any] = {
        "id": alert.id,
        "ebmid": f"EBM-{alert.id}",
        "revision": revision,
        "state": alert.state,
        "request": request,
        "accepted_at": accepted_at,
        "expires_at": accepted_at + request["ttl_s"],
        "final": final,
        "counts": counts,
        "last_seq": 7,
        "source": source,
        "actor": "duty" if source == "cli" else "test_broadcast[0]",
        "reason": reason,
    }
    if state_doc is not None:
        doc["state_doc"] = state_doc
    return doc


def _journal_transitions(journal: Journal, alert: Alert, at: float) -> None:
    """The transitions that lead each delivery of `alert` to its state, as the daemon journals them."""
    for code, (state, detail, attempts) in alert.deliveries.items():
        for n in range(attempts):
            journal.record_transition(alert.id, code, "sent", None, at + n, attempt=True)
            if n < attempts - 1:
                journal.record_transition(alert.id, code, "uncertain", "no acknowledgement", at + n + 0.5)
        if state == "refused":
            alert.refused.append((code, detail or ""))
        if state != "sent":
            journal.record_transition(alert.id, code, state, detail, at + attempts)


async def build_journal(path: Path, district: District) -> History:
    """A journal as the daemon leaves it: five alerts in different states, cleanly closed."""
    chengguan, taoxi, xiaotian = district.towns[CHENGGUAN], district.towns[TAOXI], district.towns[XIAOTIAN]
    villages = list(chengguan.villages.values())
    completed = Alert(
        "20261126-0001", "completed", {t.code: ("acknowledged", "done", 1) for t in taoxi.terminals()}
    )
    # legacy: the town room's own terminals and a village; a terminal of another village left in rev 2
    first, second = villages[0].terminals, villages[1].terminals
    legacy_deliveries: dict[str, tuple[str, str | None, int]] = {
        t.code: ("acknowledged", "done", 1) for t in chengguan.own_terminals
    }
    legacy_deliveries |= {t.code: ("acknowledged", "playing", 1) for t in first[3:]}
    legacy_deliveries |= {first[0].code: ("refused", "busy", 1), first[1].code: ("refused", "volume", 1)}
    legacy_deliveries[first[2].code] = ("uncertain", "no acknowledgement", 2)
    legacy_deliveries[second[0].code] = ("cancelled", "left the alert's area in revision 2", 1)
    legacy = Alert("20261126-0002", "partial", legacy_deliveries, left={second[0].code})
    x_terms = list(xiaotian.terminals())[:10]
    cancelled = Alert(
        "20261126-0003",
        "cancelled",
        {t.code: ("cancelled", "cancelled by duty", 1) for t in x_terms[:6]}
        | {t.code: ("cancelled", "cancelled by duty", 0) for t in x_terms[6:]},
    )
    active = Alert("20261127-0001", "dispatching", {t.code: ("sent", None, 1) for t in villages[2].terminals})
    scheduled_terms = list(xiaotian.villages.values())[-1].terminals
    scheduled = Alert(
        "20261127-0002",
        "partial",
        {t.code: ("acknowledged", "done", 1) for t in scheduled_terms[2:]}
        | {t.code: ("uncertain", "no acknowledgement", 3) for t in scheduled_terms[:2]},
    )

    plan: list[tuple[Alert, dict[str, Any], dict[str, Any]]] = [
        (completed, _request("桃溪镇防汛预警", identifier="cap-1"), {"final": True}),
        (legacy, _request("城关镇暴雨预警"), {"final": True, "revision": 2}),
        (cancelled, _request("晓天镇山洪预警"), {"final": True, "reason": "cancelled by duty"}),
        (active, _request("城关镇大风预警", level=3), {"final": False}),
        (scheduled, _request("例行测试", test=True, level=4), {"final": True, "source": "schedule"}),
    ]
    journal = await Journal.open(path)
    try:
        for n, (alert, request, kwargs) in enumerate(plan):
            accepted_at = ACCEPTED_AT + 600 * n
            if alert is active:
                request["ttl_s"] = NOW + 600.0 - accepted_at  # 600 s of its life left at NOW
            state_doc = None
            if alert is not legacy:
                state_doc = _state_doc(district, alert, request, accepted_at, reason=kwargs.get("reason"))
            doc = _doc(alert, request, accepted_at=accepted_at, state_doc=state_doc, **kwargs)
            await journal.save_alert(alert.id, doc)
            _journal_transitions(journal, alert, accepted_at)
            await journal.flush()
        await journal.mark_final(completed.id)  # saved last, created first: still listed last
    finally:
        await journal.close()
    return History(path, completed, legacy, cancelled, active, scheduled)


def make_journal(state_dir: Path, district: District) -> History:
    """`build_journal` at the daemon's place in `state_dir`, from synchronous code."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(build_journal(journal_path(state_dir), district))


def files_of(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file in `directory`: its sha256 and mtime (ns)."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """`directory` read-only (0555; for root, which ignores modes, also `chattr +i`), or skip."""
    directory.chmod(0o555)
    chattr = shutil.which("chattr")
    immutable = False
    try:
        if os.geteuid() == 0 and chattr is not None:
            immutable = (
                subprocess.run([chattr, "+i", str(directory)], capture_output=True, check=False).returncode
                == 0
            )
        probe = directory / ".probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"cannot make {directory} read-only here (root, and chattr +i failed)")
        yield
    finally:
        if immutable and chattr is not None:
            subprocess.run([chattr, "-i", str(directory)], check=True)
        directory.chmod(0o755)


@pytest.fixture
def history(tmp_path: Path, district: District) -> History:
    return make_journal(tmp_path / "state", district)


@pytest.fixture
def reader(history: History, district: District) -> Iterator[JournalReader]:
    with JournalReader(history.path, district, clock=lambda: NOW) as r:
        yield r


def _village_rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["code"]: v for town in report["towns"] for v in town["villages"]}


# -- listing and states ------------------------------------------------------------------------
def test_the_journal_is_where_the_daemon_keeps_it(tmp_path: Path) -> None:
    assert journal_path(tmp_path) == tmp_path / JOURNAL_FILE == tmp_path / "journal.sqlite3"


def test_list_alerts_holds_every_alert_in_any_state_newest_first(
    reader: JournalReader, history: History
) -> None:
    alerts = reader.list_alerts()
    assert [a["id"] for a in alerts] == [a.id for a in reversed(history.alerts)]
    assert [a["state"] for a in alerts] == ["partial", "dispatching", "cancelled", "partial", "completed"]
    for state in alerts:
        assert set(state) >= CONTRACT_KEYS
        assert state["source"] == "journal"


def test_alert_state_is_the_saved_state_doc_with_the_time_to_live_from_now(
    reader: JournalReader, history: History
) -> None:
    state = reader.alert_state(history.active.id)
    assert state is not None
    assert state["state"] == "dispatching"
    assert state["ttl_remaining_s"] == 600.0
    n = len(history.active.deliveries)
    assert (state["targets"], state["pending"], state["acked"]) == (n, n, 0)
    done = reader.alert_state(history.completed.id)
    assert done is not None
    assert done["ttl_remaining_s"] == 0.0  # long expired
    assert (done["state"], done["identifier"], done["coverage"], done["ebm_state"]) == (
        "completed",
        "cap-1",
        1.0,
        3,
    )
    assert list(done["towns"]) == [TAOXI]
    assert done["towns"][TAOXI]["acked"] == done["towns"][TAOXI]["targets"] == 103


def test_an_alert_saved_without_a_state_doc_gets_one_from_its_counts_request_and_deliveries(
    reader: JournalReader, history: History, district: District
) -> None:
    state = reader.alert_state(history.legacy.id)
    assert state is not None
    assert set(state) >= CONTRACT_KEYS
    targets = len(history.legacy.deliveries) - 1  # without the terminal that left the area
    assert (state["state"], state["ebm_state"], state["revision"]) == ("partial", 4, 2)
    assert (state["targets"], state["failed"], state["uncertain"], state["pending"]) == (targets, 2, 1, 0)
    assert state["acked"] == targets - 3
    assert state["coverage"] == round((targets - 3) / targets, 4)
    assert (state["level"], state["text"], state["identifier"], state["test"]) == (
        2,
        "城关镇暴雨预警",
        None,
        False,
    )
    assert list(state["towns"]) == [CHENGGUAN]
    town = state["towns"][CHENGGUAN]
    assert (town["name"], town["targets"], town["acked"]) == ("城关镇", targets, targets - 3)
    assert state["source"] == "journal"


def test_an_unknown_alert_is_none(reader: JournalReader) -> None:
    assert reader.alert_state("20991231-9999") is None
    assert reader.report("20991231-9999") is None
    assert reader.alert_doc("20991231-9999") is None


def test_a_legacy_state_without_a_district_has_no_towns(history: History) -> None:
    with JournalReader(history.path) as r:
        state = r.alert_state(history.legacy.id)
        with pytest.raises(ValueError, match="district"):
            r.report(history.legacy.id)
    assert state is not None
    assert state["towns"] == {}
    assert state["targets"] == len(history.legacy.deliveries) - 1


# -- reports -----------------------------------------------------------------------------------
def test_report_has_the_towns_villages_and_the_town_rooms_own_row(
    reader: JournalReader, history: History, district: District
) -> None:
    report = reader.report(history.legacy.id)
    assert report is not None
    assert set(report) == {"state", "towns", "problems", "history", "buckets", "refusals", "source"}
    assert report["source"] == "journal"
    assert report["state"]["id"] == history.legacy.id
    [town] = report["towns"]
    chengguan = district.towns[CHENGGUAN]
    villages = list(chengguan.villages.values())
    assert (town["code"], town["name"]) == (CHENGGUAN, "城关镇")
    rows = _village_rows(report)
    assert list(rows) == [CHENGGUAN, villages[0].code]  # the terminal that left is in no row
    own = rows[CHENGGUAN]
    assert (own["name"], own["targets"], own["acked"], own["coverage"]) == ("城关镇（镇直属）", 4, 4, 1.0)
    first = rows[villages[0].code]
    n = len(villages[0].terminals)
    assert (first["name"], first["targets"], first["acked"]) == (villages[0].name, n, n - 3)
    assert (first["failed"], first["uncertain"], first["pending"]) == (2, 1, 0)
    assert town["targets"] == own["targets"] + first["targets"]
    assert {k: town[k] for k in ("targets", "acked", "failed", "uncertain", "pending", "coverage")} == {
        k: own[k] + first[k]
        if k != "coverage"
        else round((own["acked"] + first["acked"]) / town["targets"], 4)
        for k in ("targets", "acked", "failed", "uncertain", "pending", "coverage")
    }


def test_report_problems_are_the_terminals_without_acknowledgement(
    reader: JournalReader, history: History, district: District
) -> None:
    report = reader.report(history.legacy.id)
    assert report is not None
    terminals = district.villages().__next__().terminals  # 城关镇's first village
    problems = report["problems"]
    assert [p["terminal"] for p in problems] == [t.code for t in terminals[:3]]  # in ledger order
    assert problems[0] == {
        "terminal": terminals[0].code,
        "name": terminals[0].name,
        "state": "refused",
        "cause": "busy",
        "attempts": 1,
        "liveness": "unknown",
        "room": terminals[0].room,
    }
    assert (problems[2]["state"], problems[2]["cause"], problems[2]["attempts"]) == (
        "uncertain",
        "no acknowledgement",
        2,
    )
    assert report["refusals"] == [{"terminal": t, "cause": c} for t, c in history.legacy.refused]


def test_report_of_a_cancelled_alert_lists_every_terminal_it_stopped(
    reader: JournalReader, history: History
) -> None:
    report = reader.report(history.cancelled.id)
    assert report is not None
    assert report["state"]["state"] == "cancelled"
    assert report["state"]["reason"] == "cancelled by duty"
    assert {p["terminal"] for p in report["problems"]} == set(history.cancelled.deliveries)
    assert all(p["state"] == "cancelled" and p["cause"] == "cancelled by duty" for p in report["problems"])
    assert "refusals" not in report
    assert "test" not in report
    [town] = report["towns"]
    assert (town["code"], town["targets"], town["acked"], town["coverage"]) == (XIAOTIAN, 10, 0, 0.0)
    assert town["failed"] + town.get("cancelled", 0) == 10  # stopped: cancelled, where the tiers count it


def test_report_of_a_scheduled_test_names_the_terminals_that_missed_it(
    reader: JournalReader, history: History
) -> None:
    report = reader.report(history.scheduled.id)
    assert report is not None
    missed = sorted(t for t, (s, _, _) in history.scheduled.deliveries.items() if s != "acknowledged")
    targets = len(history.scheduled.deliveries)
    assert report["test"] == {"missed": missed, "acked": targets - 2, "targets": targets}
    assert [p["attempts"] for p in report["problems"]] == [3, 3]


def test_report_of_a_completed_alert_has_no_problems(reader: JournalReader, history: History) -> None:
    report = reader.report(history.completed.id)
    assert report is not None
    assert report["problems"] == []
    [town] = report["towns"]
    assert (town["targets"], town["acked"], town["coverage"]) == (103, 103, 1.0)
    assert all(v["coverage"] == 1.0 for v in town["villages"])
    assert sum(v["targets"] for v in town["villages"]) == 103


# -- schema versions ---------------------------------------------------------------------------
def _schema_1_journal(path: Path, district: District) -> list[str]:
    """A journal as ebcd wrote it before schema 2 (deliveries without the new columns); its terminals."""
    terminals = [t.code for t in next(iter(district.villages())).terminals[:4]]
    request = _request("旧版日志")
    doc = {"id": "20251001-0001", "state": "partial", "final": True, "revision": 2, "request": request}
    doc |= {"counts": {"acked": 2, "failed": 1, "uncertain": 0, "pending": 0}, "expires_at": ACCEPTED_AT}
    rows = [
        (terminals[0], "acknowledged", "done", 1),
        (terminals[1], "acknowledged", "playing", 1),
        (terminals[2], "expired", "time to live over", 4),
        (terminals[3], "cancelled", "left the alert's area in revision 2", 1),
    ]
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in store._MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, at REAL NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute(
            "INSERT INTO alerts VALUES (?, ?, 1, ?, ?)",
            (doc["id"], json.dumps(doc), ACCEPTED_AT, ACCEPTED_AT),
        )
        conn.executemany(
            "INSERT INTO deliveries VALUES (?, ?, ?, ?, ?, ?)",
            [(doc["id"], t, state, detail, ACCEPTED_AT, n) for t, state, detail, n in rows],
        )
    return terminals


def test_a_schema_1_journal_is_read_without_the_columns_of_schema_2(
    tmp_path: Path, district: District
) -> None:
    path = tmp_path / JOURNAL_FILE
    terminals = _schema_1_journal(path, district)
    with JournalReader(path, district, clock=lambda: NOW) as r:
        assert r.delivery_columns == ()
        d = r.deliveries("20251001-0001")[terminals[0]]
        assert (d.state, d.detail, d.attempts, d.acked, d.revision, d.left_area) == (
            "acknowledged",
            "done",
            1,
            None,
            None,
            None,
        )
        state = r.alert_state("20251001-0001")
        report = r.report("20251001-0001")
    assert state is not None
    assert (state["targets"], state["acked"], state["failed"], state["coverage"]) == (3, 2, 1, 0.6667)
    assert report is not None
    assert [(p["terminal"], p["state"], p["attempts"]) for p in report["problems"]] == [
        (terminals[2], "expired", 4)
    ]  # the terminal that left the area in revision 2 is no problem of this alert
    assert sum(v["targets"] for v in report["towns"][0]["villages"]) == 3


def test_schema_2_columns_are_read_and_count(history: History, district: District) -> None:
    assert SCHEMA_VERSION >= 2
    with JournalReader(history.path, district) as r:
        assert r.delivery_columns == OPTIONAL_DELIVERY_COLUMNS
    # the delivery core's full rows: a cancel keeps the acknowledged ones acked; an update's leavers
    acked = list(history.cancelled.deliveries)[:6]
    left = list(history.legacy.deliveries)[-2]  # a terminal of the village, acknowledged in revision 1
    with contextlib.closing(sqlite3.connect(history.path)) as conn, conn:
        conn.executemany(
            "UPDATE deliveries SET acked = 1, progress = 'done', finished = 1"
            " WHERE alert_id = ? AND terminal = ?",
            [(history.cancelled.id, t) for t in acked],
        )
        conn.execute(
            "UPDATE deliveries SET left_area = 1, state = 'cancelled' WHERE alert_id = ? AND terminal = ?",
            (history.legacy.id, left),
        )
    with JournalReader(history.path, district) as r:
        d = r.deliveries(history.cancelled.id)[acked[0]]
        assert (d.state, d.acked, d.revision, d.progress, d.finished, d.left_area, d.bucket) == (
            "cancelled",
            True,
            1,
            "done",
            True,
            False,
            "acked",
        )
        report = r.report(history.cancelled.id)
        legacy = r.report(history.legacy.id)
    assert report is not None
    assert {p["terminal"] for p in report["problems"]} == set(history.cancelled.deliveries) - set(acked)
    assert report["towns"][0]["acked"] == 6
    assert legacy is not None
    assert left not in {p["terminal"] for p in legacy["problems"]}
    assert sum(v["targets"] for v in legacy["towns"][0]["villages"]) == len(history.legacy.deliveries) - 2


# -- read-only, and safe beside the daemon ----------------------------------------------------------
def test_a_missing_journal_is_an_error_naming_the_path_and_nothing_is_created(tmp_path: Path) -> None:
    path = tmp_path / "state" / JOURNAL_FILE
    with pytest.raises(JournalUnavailable, match="no journal at") as caught:
        JournalReader(path)
    assert str(path) in str(caught.value)
    assert caught.value.path == path
    assert not path.parent.exists()
    (tmp_path / "state").mkdir()
    with pytest.raises(JournalUnavailable):
        JournalReader(path)
    assert list((tmp_path / "state").iterdir()) == []


def test_a_file_that_is_not_a_journal_is_an_error_naming_it(tmp_path: Path) -> None:
    junk = tmp_path / JOURNAL_FILE
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalUnavailable, match=str(junk)):
        JournalReader(junk)
    other = tmp_path / "other.sqlite3"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(JournalUnavailable, match="not an ebcd journal"):
        JournalReader(other)


def test_reading_changes_no_file_of_the_journal(history: History, district: District) -> None:
    before = files_of(history.path.parent)
    assert list(before) == [JOURNAL_FILE]  # a cleanly closed journal: no WAL
    with JournalReader(history.path, district) as r:
        r.list_alerts()
        for alert in history.alerts:
            assert r.report(alert.id) is not None
    assert files_of(history.path.parent) == before


def test_the_reader_writes_nothing_even_if_asked(reader: JournalReader) -> None:
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only|query_only"):
        reader._conn.execute("DELETE FROM alerts")


def test_the_reader_works_on_a_journal_in_a_read_only_directory(history: History, district: District) -> None:
    before = files_of(history.path.parent)
    with read_only(history.path.parent), JournalReader(history.path, district) as r:
        assert r.immutable  # cleanly closed: no WAL to read, and none created
        assert len(r.list_alerts()) == len(history.alerts)
        report = r.report(history.legacy.id)
    assert report is not None
    assert len(report["problems"]) == 3
    assert files_of(history.path.parent) == before


async def test_the_reader_reads_beside_a_running_daemon(history: History, district: District) -> None:
    journal = await Journal.open(history.path)  # the daemon, writing
    try:
        with JournalReader(history.path, district) as r:
            assert not r.immutable  # a WAL is there: read through it, with the writer
            assert len(r.list_alerts()) == len(history.alerts)
            doc = {"id": "20261128-0001", "state": "dispatching", "final": False, "request": _request("新")}
            await journal.save_alert("20261128-0001", doc)  # the writer is not blocked by the reader
            journal.record_transition(
                "20261128-0001", district.terminals().__next__().code, "sent", None, NOW
            )
            await journal.flush()
            alerts = r.list_alerts()  # each call is a fresh snapshot: it sees the new commit
            assert alerts[0]["id"] == "20261128-0001"
            assert (alerts[0]["targets"], alerts[0]["pending"]) == (1, 1)  # no counts saved: from deliveries
    finally:
        await journal.close()


KILLED_DAEMON = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from ebcd.journal.journal import Journal

    async def main() -> None:
        j = await Journal.open(Path(sys.argv[1]))
        counts = {"acked": 1, "failed": 0, "uncertain": 0, "pending": 0}
        doc = {"id": "20261128-0002", "state": "dispatching", "final": False, "counts": counts}
        await j.save_alert("20261128-0002", doc)
        j.record_transition("20261128-0002", sys.argv[2], "acknowledged", "done", 1.0)
        await j.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no checkpoint, the WAL stays behind

    asyncio.run(main())
    """
)


def test_the_reader_reads_what_a_killed_daemon_left_in_the_wal_from_a_read_only_directory(
    history: History, district: District, tmp_path: Path
) -> None:
    terminal = district.terminals().__next__()
    done = subprocess.run(
        [sys.executable, "-c", KILLED_DAEMON, str(history.path), terminal.code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr.decode()
    assert (history.path.parent / f"{JOURNAL_FILE}-wal").exists()
    before = files_of(history.path.parent)
    with read_only(history.path.parent), JournalReader(history.path, district) as r:
        assert not r.immutable  # read through the WAL the killed writer left
        state = r.alert_state("20261128-0002")
        report = r.report("20261128-0002")
    assert state is not None
    assert (state["state"], state["targets"], state["acked"]) == ("dispatching", 1, 1)
    assert report is not None
    assert report["towns"][0]["code"] == terminal.town
    after = files_of(history.path.parent)
    assert set(after) == set(before)  # no file created
    shm = f"{JOURNAL_FILE}-shm"  # the WAL index is shared memory: a reader may update it
    assert {k: v for k, v in after.items() if k != shm} == {k: v for k, v in before.items() if k != shm}


def test_tallies_use_the_tier_roll_up(history: History, district: District) -> None:
    with JournalReader(history.path, district) as r:
        report = r.report(history.legacy.id)
    assert report is not None
    buckets = {t: b for t, b in history.legacy.buckets().items() if t not in history.legacy.left}
    expected = district.towns[CHENGGUAN].tally(buckets)
    assert isinstance(expected, Tally)
    assert {k: report["towns"][0][k] for k in expected.as_dict()} == expected.as_dict()
