"""The runner's write-ahead, read back as a restart or `alert status` with the daemon down would.

A real journal (SQLite in a temporary folder) under a runner whose transports record what they are
asked to send. What the journal holds right after `accept` returns is exactly what a kill -9 at
that moment leaves behind: these tests read it with the journal's read-only reader, before the
daemon's periodic document save has run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from ebcd.delivery.core import AlertSpec, Core, Policy
from ebcd.delivery.runner import Runner
from ebcd.delivery.state import AState
from ebcd.journal.journal import Journal
from ebcd.journal.reader import JournalReader
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest, CodeTarget
from ebcd.protocols.messages import AckStatus, Command, TerminalReport
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal


class Recorder:
    """A transport that keeps what it was asked to send, so a test sees that commands went out."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[tuple[str, list[str]]] = []

    def send(self, cmd: Command, terminals: Sequence[Terminal], *, first: bool) -> None:
        self.sent.append((cmd.alert_id, [t.code for t in terminals]))


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "journal.sqlite3")
    try:
        yield j
    finally:
        await j.close()


def _runner(district: District, journal: Journal) -> tuple[Runner, Recorder]:
    mqtt = Recorder("mqtt")
    runner = Runner(
        Core((t.code for t in district.terminals()), Policy()),
        district,
        transports={"mqtt": mqtt, "serial": Recorder("serial")},
        metrics=Metrics(),
        publish_state=lambda alert, doc: None,
        journal=lambda: journal,
    )
    return runner, mqtt


def _spec(alert_id: str, village: str) -> AlertSpec:
    request = AlertRequest(
        level=2, event_type="11B03", targets=[CodeTarget(kind="village", code=village)], text="暴雨橙色预警"
    )
    return AlertSpec(alert_id, "1" * 35, request, 1_764_160_000.0, "cli", "duty")


@pytest.mark.parametrize("hold", [False, True], ids=["dispatching", "held_for_review"])
async def test_right_after_accept_the_journal_shows_the_alert_with_every_target_pending(
    tmp_path: Path, district: District, journal: Journal, hold: bool
) -> None:
    village = next(v for v in district.villages() if v.link == "mqtt")
    runner, mqtt = _runner(district, journal)
    codes = [t.code for t in village.terminals]
    alert = await runner.accept(_spec("20261203-0001", village.code), codes, hold=hold)
    assert bool(mqtt.sent) is not hold  # held for review: nothing goes out yet

    with JournalReader(tmp_path / "journal.sqlite3", district) as reader:
        state = reader.alert_state(alert.id)
        report = reader.report(alert.id)
    assert state is not None
    assert report is not None
    expected = "pending_approval" if hold else "dispatching"
    assert (state["state"], state["targets"], state["pending"], state["acked"]) == (
        expected,
        len(codes),
        len(codes),
        0,
    )
    assert {p["terminal"] for p in report["problems"]} == set(codes)


async def test_the_next_document_save_replaces_the_intent_with_the_alert_as_it_stands(
    tmp_path: Path, district: District, journal: Journal
) -> None:
    village = next(v for v in district.villages() if v.link == "mqtt")
    runner, _ = _runner(district, journal)
    codes = [t.code for t in village.terminals]
    alert = await runner.accept(_spec("20261203-0002", village.code), codes, hold=True)
    docs = runner.take_docs()
    assert set(docs) == {alert.id}
    for alert_id, doc in docs.items():
        await journal.save_alert(alert_id, doc)
    await journal.flush()
    with JournalReader(tmp_path / "journal.sqlite3", district) as reader:
        state = reader.alert_state(alert.id)
    assert state is not None
    assert state["text"] == "暴雨橙色预警"
    assert (state["state"], state["targets"], state["pending"]) == (
        "pending_approval",
        len(codes),
        len(codes),
    )


class JournalPeek(Recorder):
    """A transport that reads the journal at the moment it is asked to send."""

    def __init__(self, name: str, path: Path, district: District) -> None:
        super().__init__(name)
        self.path, self.district = path, district
        self.seen: list[dict[str, tuple[str, str | None]]] = []

    def send(self, cmd: Command, terminals: Sequence[Terminal], *, first: bool) -> None:
        super().send(cmd, terminals, first=first)
        with JournalReader(self.path, self.district) as reader:
            rows = reader.deliveries(cmd.alert_id)
        self.seen.append({t.code: (rows[t.code].state, rows[t.code].detail) for t in terminals})


async def test_a_resend_is_journalled_with_who_asked_before_it_goes_out(
    tmp_path: Path, district: District, journal: Journal
) -> None:
    village = next(v for v in district.villages() if v.link == "mqtt" and len(v.terminals) >= 2)
    codes = [t.code for t in village.terminals]
    runner, _ = _runner(district, journal)
    peek = JournalPeek("mqtt", tmp_path / "journal.sqlite3", district)
    runner.transports["mqtt"] = peek
    alert = await runner.accept(_spec("20261203-0003", village.code), codes, hold=False)
    runner.on_report(TerminalReport(codes[0], alert.id, 1, AckStatus.DONE))
    for code in codes[1:]:
        runner.on_report(TerminalReport(code, alert.id, 1, AckStatus.REFUSED, "busy"))
    assert alert.state is AState.PARTIAL
    peek.sent.clear()
    peek.seen.clear()

    resent = await runner.resend(alert.id, ["refused"], "resent by duty")
    assert resent == codes[1:]
    assert peek.sent == [(alert.id, codes[1:])]  # never to the terminal that played it
    # what a kill -9 right before the send would have left: each one pending, with who asked
    assert peek.seen == [dict.fromkeys(codes[1:], ("pending", "resent by duty"))]
    with JournalReader(tmp_path / "journal.sqlite3", district) as reader:
        doc = reader.alert_doc(alert.id)
    assert doc is not None
    assert doc["state"] == "dispatching"  # the alert, too, was journalled as dispatching again
