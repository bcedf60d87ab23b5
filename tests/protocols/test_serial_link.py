"""SerialBusMaster end to end over a real pty pair (and TCP) against the simulated multi-drop bus."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ebcd.protocols.messages import (
    AckStatus,
    Liveness,
    PlayCommand,
    StopCommand,
    TerminalPresence,
    TerminalReport,
)
from ebcd.protocols.serial.bus import (
    MAX_RESULTS_PER_POLL_ROUND,
    POLL_INTERVAL_S,
    BusClosedError,
    SerialBusMaster,
)
from ebcd.protocols.serial.frame import (
    BroadcastStart,
    Frame,
    Heartbeat,
    LocalProtocolError,
    Query,
    command_body,
    encode_frame,
)
from ebcd.security.bench import bench_signer
from ebcd.security.replay import quantize_command, sign_command
from simulators.serial_bus import BusFaults, SerialBusSimulator

SOURCE = "43415230000000314010301"
TERMINALS = {f"634152310100103140104{i:02d}": i for i in range(1, 9)}
CODES = list(TERMINALS)
FAST_BAUD = 115200
WAIT_S = 20.0
REMAINING_ROUNDING_S = 1.0  # a terminal says its remaining play time in whole seconds, rounded up
SLACK_S = 1.0  # the exchanges themselves, on a loaded machine


def play(alert_id: str = "alert-1", revision: int = 1, seq: int = 1, ttl_s: float = 600.0) -> PlayCommand:
    return PlayCommand(
        alert_id=alert_id, ebmid=SOURCE + "202406010001", revision=revision, seq=seq, level=1,
        event_type="11B03", text="暴雨红色预警，请立即转移", ttl_s=ttl_s,
    )  # fmt: skip


class Collector:
    """Collects what the master reports and lets a test wait for a condition without sleeping."""

    def __init__(self) -> None:
        self.reports: list[TerminalReport] = []
        self.presences: list[TerminalPresence] = []
        self._changed = asyncio.Event()

    def on_report(self, report: TerminalReport) -> None:
        self.reports.append(report)
        self._changed.set()

    def on_presence(self, presence: TerminalPresence) -> None:
        self.presences.append(presence)
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def statuses(self, alert_id: str = "alert-1") -> dict[str, AckStatus]:
        return {r.terminal: r.status for r in self.reports if r.alert_id == alert_id}


@contextlib.asynccontextmanager
async def running(master: SerialBusMaster) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(master.run(), name="bus-master")
    try:
        yield task
    finally:
        if task.done():
            task.result()  # surface a crash of the owner task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def bus(
    *,
    baud: int = FAST_BAUD,
    faults: BusFaults | None = None,
    play_time_s: float = 0.0,
    tcp: bool = False,
    record_frames: bool = False,
    verifying: bool = False,
    says_remaining: bool = True,
    **master_options: Any,
) -> AsyncIterator[tuple[SerialBusSimulator, SerialBusMaster, Collector]]:
    async with SerialBusSimulator(
        TERMINALS,
        baudrate=baud,
        faults=faults,
        play_time_s=play_time_s,
        seed=20240601,
        record_frames=record_frames,
        verifier=bench_signer("ed25519").verifier() if verifying else None,
        says_remaining=says_remaining,
    ) as sim:
        url = await (sim.start_tcp() if tcp else sim.start_pty())
        collector = Collector()
        options: dict[str, Any] = {"poll_interval_s": None, "response_timeout_s": 0.2} | master_options
        master = SerialBusMaster(
            url, source=SOURCE, terminals=TERMINALS, on_report=collector.on_report,
            on_presence=collector.on_presence, baudrate=baud, **options,
        )  # fmt: skip
        async with running(master):
            yield sim, master, collector


def plays_per_terminal(sim: SerialBusSimulator) -> dict[str, int]:
    return {code: len(t.plays) for code, t in sim.terminals.items()}


async def test_play_reaches_every_terminal_of_eight() -> None:
    async with bus() as (sim, master, collector):
        outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
    assert outcome.reports == dict.fromkeys(CODES, AckStatus.DONE)
    assert outcome.unanswered == outcome.unknown == ()
    assert collector.statuses() == dict.fromkeys(CODES, AckStatus.DONE)
    assert plays_per_terminal(sim) == dict.fromkeys(CODES, 1)
    assert {p.text for p in sim.plays} == {"暴雨红色预警，请立即转移"}
    assert master.counters.frames_sent == 1 + 8  # one command to all, one query each
    assert master.counters.timeouts == master.counters.dropped == 0
    assert [p.state for p in collector.presences] == [Liveness.ONLINE] * 8


async def test_dead_terminal_never_reports_and_goes_offline() -> None:
    dead = CODES[3]
    async with bus(faults=BusFaults(dead=frozenset({dead}))) as (sim, master, collector):
        outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
    assert outcome.unanswered == (dead,)
    assert set(outcome.reports) == set(CODES) - {dead}
    assert dead not in collector.statuses()
    assert len(collector.statuses()) == 7
    assert sim.terminals[dead].plays == []
    assert master.counters.timeouts == 3  # ATTEMPTS_PER_EXCHANGE
    assert master.counters.retries == 2
    offline = [p for p in collector.presences if p.state is Liveness.OFFLINE]
    assert [p.terminal for p in offline] == [dead]


async def test_ten_percent_corruption_gets_through_by_retries() -> None:
    faults = BusFaults(corrupt_rate=0.10)
    async with bus(faults=faults, response_timeout_s=0.1, attempts=8) as (sim, master, collector):
        for n in range(1, 4):
            outcome = await asyncio.wait_for(master.dispatch(play(f"alert-{n}", seq=n), CODES), WAIT_S)
            assert outcome.unanswered == ()
    for n in range(1, 4):
        assert set(collector.statuses(f"alert-{n}")) == set(CODES)
    assert plays_per_terminal(sim) == dict.fromkeys(CODES, 3)  # resends never replay
    counters = master.counters
    assert counters.retries > 0
    assert counters.crc_errors + counters.timeouts > 0


async def test_resent_broadcast_start_does_not_play_twice() -> None:
    async with bus() as (sim, master, collector):
        first = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        again = await asyncio.wait_for(master.dispatch(play(seq=2), CODES), WAIT_S)
        update = await asyncio.wait_for(master.dispatch(play(revision=2, seq=3), CODES[:2]), WAIT_S)
    assert first.reports == again.reports == dict.fromkeys(CODES, AckStatus.DONE)
    assert update.reports == dict.fromkeys(CODES[:2], AckStatus.DONE)
    assert len(collector.reports) == 8 + 8 + 2  # re-sent commands are acknowledged again
    expected = dict.fromkeys(CODES, 1) | dict.fromkeys(CODES[:2], 2)  # an update is a new play
    assert plays_per_terminal(sim) == expected


async def test_echo_of_the_master_is_suppressed() -> None:
    async with bus(faults=BusFaults(echo=True), echo_suppression=True) as (_, master, collector):
        outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
    assert outcome.reports == dict.fromkeys(CODES, AckStatus.DONE)
    counters = master.counters
    assert counters.echo_bytes_dropped == counters.bytes_sent
    assert counters.dropped == 0
    assert len(collector.reports) == 8


async def test_garbage_and_a_slow_responder() -> None:
    slow = CODES[0]
    faults = BusFaults(garbage_rate=0.5, slow={slow: 0.1})
    async with bus(faults=faults, response_timeout_s=0.3) as (_, master, collector):
        outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
    assert outcome.reports == dict.fromkeys(CODES, AckStatus.DONE)
    assert master.counters.discarded_bytes > 0
    assert collector.statuses()[slow] is AckStatus.DONE


async def test_socket_url_through_tcp() -> None:
    async with bus(tcp=True) as (sim, master, _):
        assert master.url.startswith("socket://")
        outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
    assert outcome.reports == dict.fromkeys(CODES, AckStatus.DONE)
    assert sum(plays_per_terminal(sim).values()) == 8


async def test_stop_while_playing() -> None:
    async with bus(play_time_s=60.0) as (_, master, collector):
        started = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        stop = StopCommand("alert-1", SOURCE + "202406010001", revision=1, seq=2, reason="cancelled")
        stopped = await asyncio.wait_for(master.dispatch(stop, CODES), WAIT_S)
    assert started.reports == dict.fromkeys(CODES, AckStatus.PLAYING)
    assert stopped.reports == dict.fromkeys(CODES, AckStatus.STOPPED)
    assert [r.status for r in collector.reports] == [AckStatus.PLAYING] * 8 + [AckStatus.STOPPED] * 8
    assert all(r.seq == 2 for r in collector.reports[8:])


async def test_routine_polling_reports_progress_and_heartbeats() -> None:
    async with bus(play_time_s=0.3, poll_interval_s=0.1) as (_, master, collector):
        await collector.until(lambda: sum(p.heartbeat for p in collector.presences) >= 8)
        outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        assert set(outcome.reports.values()) == {AckStatus.PLAYING}
        await collector.until(lambda: collector.statuses() == dict.fromkeys(CODES, AckStatus.DONE))
    for code in CODES:
        assert [r.status for r in collector.reports if r.terminal == code] == [
            AckStatus.PLAYING,
            AckStatus.DONE,
        ]
    heartbeats = [p for p in collector.presences if p.heartbeat]
    assert {p.terminal for p in heartbeats} == set(CODES)
    assert {p.session for p in collector.presences} == {1}


def queries_per_terminal(sim: SerialBusSimulator, alert_id: str) -> Counter[str]:
    assert sim.heard is not None
    return Counter(
        f.targets[0] for f in sim.heard if isinstance(f.body, Query) and f.body.alert_id == alert_id
    )


async def test_back_to_back_broadcasts_the_end_of_play_is_known_at_once() -> None:
    """The second of two broadcasts to a room need not wait for the next routine poll round.

    A terminal that is still playing says how long it has left; the master asks it again then,
    so its "done" (the engine's cue that the terminal is free for the next alert) arrives within
    play time + rounding + one busy poll, not after `poll_interval_s` (30 s).
    """
    play_s, busy_s = 1.0, 0.5
    options = {"poll_interval_s": POLL_INTERVAL_S, "busy_poll_s": busy_s}
    async with bus(play_time_s=play_s, record_frames=True, **options) as (sim, master, collector):
        await collector.until(lambda: sum(p.heartbeat for p in collector.presences) >= 8)  # first round over
        first = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        assert first.reports == dict.fromkeys(CODES, AckStatus.PLAYING)
        await collector.until(
            lambda: collector.statuses() == dict.fromkeys(CODES, AckStatus.DONE),
            timeout_s=play_s + REMAINING_ROUNDING_S + busy_s + SLACK_S,
        )
        second = await asyncio.wait_for(master.dispatch(play("alert-2", seq=2), CODES), WAIT_S)
    assert second.reports == dict.fromkeys(CODES, AckStatus.PLAYING)
    assert plays_per_terminal(sim) == dict.fromkeys(CODES, 2)
    # one query by the alert job, one when the play should have ended: no more, and no poll round
    assert queries_per_terminal(sim, "alert-1") == dict.fromkeys(CODES, 2)
    assert sim.heard is not None
    kinds = [type(f.body) for f in sim.heard]
    assert kinds.count(Heartbeat) == 8  # only the round at connect


async def test_a_terminal_that_does_not_say_its_remaining_time_is_asked_every_busy_poll() -> None:
    play_s, busy_s = 1.0, 0.3
    options = {"poll_interval_s": POLL_INTERVAL_S, "busy_poll_s": busy_s, "says_remaining": False}
    async with bus(play_time_s=play_s, record_frames=True, **options) as (sim, master, collector):
        first = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        assert first.reports == dict.fromkeys(CODES, AckStatus.PLAYING)
        await collector.until(
            lambda: collector.statuses() == dict.fromkeys(CODES, AckStatus.DONE),
            timeout_s=play_s + busy_s + SLACK_S,
        )
    most = 1 + math.ceil(play_s / busy_s) + 1  # the job's query, the re-queries while playing, the done
    assert all(2 <= n <= most for n in queries_per_terminal(sim, "alert-1").values())
    assert set(queries_per_terminal(sim, "alert-1")) == set(CODES)


async def test_alert_preempts_routine_polling() -> None:
    async with bus(baud=9600, poll_interval_s=3600.0, record_frames=True) as (sim, master, collector):
        await collector.until(lambda: len(collector.presences) >= 1)  # the first heartbeat round is under way
        await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        await collector.until(lambda: sum(p.heartbeat for p in collector.presences) >= 8)
    assert sim.heard is not None
    kinds = [type(f.body) for f in sim.heard]
    start = kinds.index(BroadcastStart)
    assert kinds[:start].count(Heartbeat) <= 2  # at most the heartbeat in flight, not the whole round
    queries_end = max(i for i, k in enumerate(kinds) if k is Query)
    assert kinds[start:queries_end].count(Heartbeat) == 0  # the alert ran as one block
    assert kinds.count(Heartbeat) == 8  # and the round finished afterwards


async def test_fault_report_is_counted() -> None:
    async with bus(poll_interval_s=0.1) as (sim, master, collector):
        sim.terminals[CODES[2]].set_fault(42, "amplifier")
        await collector.until(lambda: master.faults_reported == 1 and len(collector.presences) >= 16)
    assert any(p.terminal == CODES[2] and p.heartbeat for p in collector.presences)


async def test_pacing_at_9600_baud_takes_at_least_the_airtime() -> None:
    async with bus(baud=9600, response_timeout_s=0.5) as (_, master, collector):
        started = time.monotonic()
        outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        elapsed = time.monotonic() - started
    assert outcome.reports == dict.fromkeys(CODES, AckStatus.DONE)
    start = BroadcastStart(SOURCE + "202406010001", "alert-1", 1, 1, 1, "11B03", 0xFF, 600, play().text)
    command = encode_frame(Frame(SOURCE, tuple(CODES), start))
    query = encode_frame(Frame(SOURCE, (CODES[0],), Query(SOURCE + "202406010001", "alert-1", 1)))
    counters = master.counters
    assert counters.bytes_sent == len(command) + 8 * len(query)  # one command, one query a terminal
    assert counters.bytes_received > 8 * 60  # eight results crossed the line too
    assert elapsed >= (counters.bytes_sent + counters.bytes_received) * 10 / 9600
    assert len(collector.reports) == 8


async def test_port_loss_reconnects_and_resumes(tmp_path: Path) -> None:
    link = tmp_path / "ttyBUS0"
    collector = Collector()
    first = SerialBusSimulator(TERMINALS, baudrate=FAST_BAUD)
    await first.start_pty(link)
    master = SerialBusMaster(
        str(link), source=SOURCE, terminals=TERMINALS, on_report=collector.on_report, baudrate=FAST_BAUD,
        poll_interval_s=None, response_timeout_s=0.2, reconnect_min_s=0.02, reconnect_max_s=0.1,
    )  # fmt: skip
    async with running(master):
        await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
        await first.close()  # the port goes away under the master
        pending = asyncio.create_task(master.dispatch(play("alert-2", seq=2), CODES))
        async with SerialBusSimulator(TERMINALS, baudrate=FAST_BAUD) as second:
            await second.start_pty(link)
            outcome = await asyncio.wait_for(pending, WAIT_S)
    assert outcome.reports == dict.fromkeys(CODES, AckStatus.DONE)
    assert master.counters.port_failures >= 1
    assert sum(len(t.plays) for t in second.terminals.values()) == 8


async def test_a_failing_callback_does_not_stop_the_bus() -> None:
    calls: list[TerminalReport] = []

    def explode(report: TerminalReport) -> None:
        calls.append(report)
        raise RuntimeError("consumer bug")

    async with SerialBusSimulator(TERMINALS, baudrate=FAST_BAUD) as sim:
        url = await sim.start_pty()
        master = SerialBusMaster(
            url,
            source=SOURCE,
            terminals=TERMINALS,
            on_report=explode,
            baudrate=FAST_BAUD,
            poll_interval_s=None,
        )
        async with running(master):
            outcome = await asyncio.wait_for(master.dispatch(play(), CODES), WAIT_S)
    assert len(outcome.reports) == 8
    assert len(calls) == 8
    assert master.counters.callback_errors == 8


async def test_unknown_terminals_and_stopped_master() -> None:
    stranger = "63415231010010314049999"
    async with bus() as (_, master, _collector):
        outcome = await asyncio.wait_for(master.dispatch(play(), [CODES[0], stranger]), WAIT_S)
        assert outcome.unknown == (stranger,)
        assert set(outcome.reports) == {CODES[0]}
    with pytest.raises(BusClosedError):
        await master.dispatch(play(), CODES)


def test_codes_must_be_resource_codes() -> None:
    with pytest.raises(LocalProtocolError, match="bad address"):
        SerialBusMaster("/dev/null", source="123", terminals={}, on_report=lambda r: None)


def signed(cmd: PlayCommand) -> PlayCommand:
    """`cmd` issued now and signed with the bench key, as the engine sends it."""
    cmd = quantize_command(dataclasses.replace(cmd, issued_at=time.time()))
    return dataclasses.replace(cmd, signature=sign_command(bench_signer("ed25519"), cmd))


async def test_a_signed_resume_of_a_broadcast_played_to_the_end_is_answered_done_not_played() -> None:
    async with bus(verifying=True) as (sim, master, _collector):
        first = await asyncio.wait_for(master.dispatch(signed(play(seq=1)), CODES), WAIT_S)
        again = await asyncio.wait_for(master.dispatch(signed(play(seq=2)), CODES), WAIT_S)
        resume = signed(dataclasses.replace(play(seq=3), resume=True))
        resumed = await asyncio.wait_for(master.dispatch(resume, CODES), WAIT_S)
    assert first.reports == again.reports == resumed.reports == dict.fromkeys(CODES, AckStatus.DONE)
    # a re-send never plays; a resume plays only what was interrupted, and this one had finished
    assert plays_per_terminal(sim) == dict.fromkeys(CODES, 1)
    assert all(not t.refused for t in sim.terminals.values())  # the resume flag is signed and carried


async def test_refusals_reach_the_master_once_by_query_or_by_the_next_poll() -> None:
    async with bus(verifying=True, poll_interval_s=0.05) as (sim, master, collector):
        # a command the master sends unsigned: refused, and reported in the answer to its query
        outcome = await asyncio.wait_for(master.dispatch(play(seq=1), CODES), WAIT_S)
        assert outcome.reports == dict.fromkeys(CODES, AckStatus.REFUSED)
        # frames the master never sent, heard by the terminals: reported in answers to heartbeat polls
        for terminal in sim.terminals.values():
            assert (
                terminal.handle(Frame(SOURCE, tuple(CODES), command_body(play("forged", seq=7))), 0.0) is None
            )
        chatty = sim.terminals[CODES[0]]
        extra = MAX_RESULTS_PER_POLL_ROUND + 4  # more than one poll round hands over
        for n in range(extra):
            chatty.handle(Frame(SOURCE, (chatty.code,), command_body(play(f"forged-{n}", seq=8 + n))), 0.0)

        def refused() -> list[TerminalReport]:
            return [r for r in collector.reports if r.status is AckStatus.REFUSED]

        await collector.until(lambda: len(refused()) == 8 + 8 + extra)
        rounds = sum(p.heartbeat for p in collector.presences)
        await collector.until(lambda: sum(p.heartbeat for p in collector.presences) >= rounds + 2 * 8)
    assert {r.cause for r in refused()} == {"unsigned"}
    assert sorted((r.terminal, r.alert_id) for r in refused()) == sorted(
        [(c, "alert-1") for c in CODES]
        + [(c, "forged") for c in CODES]
        + [(CODES[0], f"forged-{n}") for n in range(extra)]
    )  # each refusal once: the query's is not repeated by a poll
    assert master.counters.dropped == 0
