"""The simulated serial bus: terminal behaviour, fault specs, pacing, and the stand-alone entry point."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ebcd.protocols.messages import AckStatus, PlayCommand, TerminalReport
from ebcd.protocols.serial.bus import SerialBusMaster
from ebcd.protocols.serial.frame import (
    Body,
    BroadcastResult,
    BroadcastStart,
    BroadcastStop,
    FaultReport,
    Frame,
    FrameDecoder,
    FrameType,
    Heartbeat,
    Query,
    ResultStatus,
    TerminalState,
    encode_frame,
)
from simulators.serial_bus import BusFaults, SerialBusSimulator, SimulatedTerminal, parse_terminals

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "43415230000000314010301"
T1 = "63415231010010314010401"
T2 = "63415231010010314010402"
EBMID = SOURCE + "202406010001"


def start(alert_id: str = "a-1", revision: int = 1, seq: int = 1, ttl_s: int = 600) -> BroadcastStart:
    return BroadcastStart(EBMID, alert_id, revision, seq, 1, "11B03", 80, ttl_s, "请注意")


def to(targets: tuple[str, ...], body: Body, session: int = 1) -> Frame:
    return Frame(SOURCE, targets, body, session=session)


def status(terminal: SimulatedTerminal, now: float, alert_id: str = "a-1", revision: int = 1) -> ResultStatus:
    reply = terminal.handle(to((terminal.code,), Query(EBMID, alert_id, revision)), now)
    assert isinstance(reply, BroadcastResult)
    return reply.status


def test_terminal_plays_each_alert_revision_once() -> None:
    terminal = SimulatedTerminal(T1, 1, play_time_s=10.0)
    assert status(terminal, 0.0) is ResultStatus.UNKNOWN
    assert terminal.handle(to((T1, T2), start()), 1.0) is None  # commands are never answered
    assert terminal.handle(to((T1,), start(seq=2)), 2.0) is None  # a re-send
    assert [(p.alert_id, p.revision, p.at) for p in terminal.plays] == [("a-1", 1, 1.0)]
    assert status(terminal, 5.0) is ResultStatus.PLAYING
    assert status(terminal, 11.0) is ResultStatus.DONE
    terminal.handle(to((T1,), start(revision=2, seq=3)), 12.0)  # an update plays again
    assert len(terminal.plays) == 2


def test_a_playing_terminal_says_how_long_it_has_left() -> None:
    def remaining(terminal: SimulatedTerminal, now: float) -> int | None:
        reply = terminal.handle(to((terminal.code,), Query(EBMID, "a-1", 1)), now)
        assert isinstance(reply, BroadcastResult)
        return reply.remaining_s

    terminal = SimulatedTerminal(T1, 1, play_time_s=10.0)
    terminal.handle(to((T1,), start()), 0.0)
    assert remaining(terminal, 1.0) == 9
    assert remaining(terminal, 9.5) == 1  # rounded up: asking again then finds it done
    assert remaining(terminal, 10.0) is None  # done: the old form of the result
    older = SimulatedTerminal(T2, 2, play_time_s=10.0, says_remaining=False)
    older.handle(to((T2,), start()), 0.0)
    assert remaining(older, 1.0) is None
    assert status(older, 1.0) is ResultStatus.PLAYING


def test_terminal_stop_wins_even_before_the_start() -> None:
    terminal = SimulatedTerminal(T1, 1, play_time_s=10.0)
    terminal.handle(to((T1,), BroadcastStop(EBMID, "a-1", 1, seq=5, reason="cancel")), 0.0)
    terminal.handle(to((T1,), start()), 1.0)
    assert terminal.plays == []
    reply = terminal.handle(to((T1,), Query(EBMID, "a-1", 1)), 2.0)
    assert isinstance(reply, BroadcastResult)
    assert (reply.status, reply.seq) == (ResultStatus.STOPPED, 5)


def test_terminal_refuses_an_expired_broadcast() -> None:
    terminal = SimulatedTerminal(T1, 1)
    terminal.handle(to((T1,), start(ttl_s=0)), 0.0)
    reply = terminal.handle(to((T1,), Query(EBMID, "a-1", 1)), 0.0)
    assert isinstance(reply, BroadcastResult)
    assert (reply.status, reply.cause) == (ResultStatus.REFUSED, "expired")
    assert terminal.plays == []


def test_terminal_answers_only_polls_naming_it_alone() -> None:
    terminal = SimulatedTerminal(T1, 1)
    assert terminal.handle(to((T1, T2), Heartbeat()), 0.0) is None
    assert terminal.handle(to((T2,), Heartbeat()), 0.0) is None
    reply_frame = Frame(T2, (SOURCE,), Heartbeat(TerminalState.IDLE), frame_type=FrameType.REPLY)
    assert terminal.handle(reply_frame, 0.0) is None
    assert terminal.handle(to((T1,), Heartbeat()), 0.0) == Heartbeat(TerminalState.IDLE)


def test_terminal_heartbeat_reports_work_and_faults() -> None:
    terminal = SimulatedTerminal(T1, 1, play_time_s=10.0)
    terminal.handle(to((T1,), start()), 0.0)
    assert terminal.handle(to((T1,), Heartbeat()), 1.0) == Heartbeat(TerminalState.WORKING)
    assert terminal.handle(to((T1,), Heartbeat()), 20.0) == Heartbeat(TerminalState.IDLE)
    terminal.set_fault(7, "speaker open circuit")
    first = terminal.handle(to((T1,), Heartbeat()), 21.0)
    assert isinstance(first, FaultReport)
    assert (first.code, first.description) == (7, "speaker open circuit")
    assert terminal.handle(to((T1,), Heartbeat()), 22.0) == Heartbeat(TerminalState.FAULT)


def test_fault_spec_parsing() -> None:
    faults = BusFaults.parse(f"corrupt=0.1,loss=5%,echo,garbage=0.02,slow={T1}:0.5,dead={T2}")
    assert faults == BusFaults(
        corrupt_rate=0.1, loss_rate=0.05, echo=True, garbage_rate=0.02, slow={T1: 0.5}, dead=frozenset({T2})
    )
    assert BusFaults.parse("") == BusFaults()
    for bad in ("corrupt=2", "explode", "slow=5", "dead="):
        with pytest.raises(ValueError, match="fault"):
            BusFaults.parse(bad)


def test_terminal_spec_parsing() -> None:
    assert parse_terminals(f"{T1}:1, {T2}:2") == {T1: 1, T2: 2}
    with pytest.raises(ValueError, match="CODE:ADDR"):
        parse_terminals(T1)


async def test_pty_bus_is_paced_at_its_baud_rate(tmp_path: Path) -> None:
    """A heartbeat poll and its reply take at least their airtime on a 2400-baud line."""
    link = tmp_path / "ttyBUS"
    poll = encode_frame(Frame(SOURCE, (T1,), Heartbeat(), session=3))
    async with SerialBusSimulator({T1: 1}, baudrate=2400) as sim:
        assert await sim.start_pty(link) == str(link)
        assert link.is_symlink()
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        loop = asyncio.get_running_loop()
        decoder = FrameDecoder()
        answered: asyncio.Future[Frame] = loop.create_future()

        def readable() -> None:
            decoder.feed(os.read(fd, 4096))
            for frame in decoder:
                if not answered.done():
                    answered.set_result(frame)

        loop.add_reader(fd, readable)
        try:
            started = time.monotonic()
            os.write(fd, poll)
            reply = await asyncio.wait_for(answered, 10)
            elapsed = time.monotonic() - started
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    assert reply.body == Heartbeat(TerminalState.IDLE)
    assert (reply.source, reply.session, reply.frame_type) == (T1, 3, FrameType.REPLY)
    assert elapsed >= (len(poll) + len(encode_frame(reply))) * 10 / 2400
    assert not link.exists()  # close() removes the symlink


async def test_entry_point_serves_a_bus_until_sigterm(tmp_path: Path) -> None:
    link = tmp_path / "ttyVILLAGE"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.serial_bus", "--terminals", f"{T1}:1,{T2}:2",
        "--pty-link", str(link), "--baud", "115200", "--faults", "garbage=0.2",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"sim.serial_bus.ready" not in (line := await proc.stdout.readline()):
                assert line, "the simulator exited before it was ready"
        reports: list[TerminalReport] = []
        master = SerialBusMaster(
            str(link), source=SOURCE, terminals={T1: 1, T2: 2}, on_report=reports.append,
            baudrate=115200, poll_interval_s=None, response_timeout_s=0.3,
        )  # fmt: skip
        task = asyncio.create_task(master.run())
        cmd = PlayCommand("a-1", EBMID, 1, 1, 1, "11B03", "请注意", 600.0)
        outcome = await asyncio.wait_for(master.dispatch(cmd, [T1, T2]), 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert outcome.reports == {T1: AckStatus.DONE, T2: AckStatus.DONE}
        assert {r.terminal for r in reports} == {T1, T2}
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            output = await proc.stdout.read()
            assert await proc.wait() == 0
        assert b"sim.serial_bus.stopped" in output
        assert not link.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
