"""SerialTransport and the bus master when the port is not there: the cause reaches `on_failed`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ebcd.metrics import Metrics
from ebcd.protocols.messages import AckStatus, Liveness, PlayCommand, TerminalPresence
from ebcd.protocols.serial.bus import BusDownError, SerialBusMaster, port_down_cause
from ebcd.protocols.serial.transport import SerialTransport
from ebcd.tiers.terminal import Terminal
from simulators.serial_bus import SerialBusSimulator

ROOM = "63415231060010314010101"
TOWN = "53415231060000314010101"
TERMINALS = {f"634152310600103140104{i:02d}": i for i in range(1, 4)}
CODES = list(TERMINALS)
FAST_BAUD = 115200
ACK_TIMEOUT_S = 5.0  # [delivery] ack_timeout_s: a failure must be told well before this
WAIT_S = 20.0


def play(alert_id: str = "alert-1", seq: int = 1) -> PlayCommand:
    return PlayCommand(alert_id, ROOM + "202406010001", 1, seq, 1, "11B03", "请注意", 600.0)


def terminals() -> list[Terminal]:
    return [
        Terminal(code, f"{n}号", ROOM, ROOM, TOWN, 31.4, 116.9, "serial", n) for code, n in TERMINALS.items()
    ]


class Failures:
    """Records on_failed calls; a test waits for them without sleeping."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[str], str]] = []
        self._changed = asyncio.Event()

    def __call__(self, alert_id: str, revision: int, codes: list[str], cause: str) -> None:
        self.calls.append((alert_id, revision, codes, cause))
        self._changed.set()

    async def until(self, count: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.calls) < count:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def running(master: SerialBusMaster) -> AsyncIterator[None]:
    task = asyncio.create_task(master.run(), name="bus-master")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def master_at(port: Path, online: asyncio.Event | None = None) -> SerialBusMaster:
    """A bus master at `port` that sets `online` when a heartbeat poll finds a terminal online."""

    def on_presence(presence: TerminalPresence) -> None:
        if online is not None and presence.state is Liveness.ONLINE:
            online.set()

    return SerialBusMaster(
        str(port), source=ROOM, terminals=TERMINALS, on_report=lambda r: None, on_presence=on_presence,
        baudrate=FAST_BAUD, poll_interval_s=3600.0, response_timeout_s=0.2, reconnect_min_s=0.02,
        reconnect_max_s=0.05,
    )  # fmt: skip


async def test_a_port_that_does_not_exist_fails_the_dispatch_with_its_cause(tmp_path: Path) -> None:
    port = tmp_path / "run" / ROOM  # the run folder of a simulator that never started
    online = asyncio.Event()
    master = master_at(port, online)
    failures = Failures()
    transport = SerialTransport({ROOM: master}, Metrics(), on_failed=failures)
    cause = f"serial port {port} does not exist"
    async with running(master):
        transport.send(play(), terminals(), first=True)  # queued before the port is first tried
        await failures.until(1, ACK_TIMEOUT_S)
        assert master.down_cause == cause
        with pytest.raises(BusDownError) as down:  # while down, a dispatch fails at once
            await master.dispatch(play("alert-2", seq=2), CODES)
        assert (down.value.cause, down.value.terminals) == (cause, tuple(CODES))
        transport.send(play("alert-3", seq=3), terminals(), first=False)
        await failures.until(2, ACK_TIMEOUT_S)

        # the port appears: the master opens it (its first poll round says so), commands go through
        async with SerialBusSimulator(TERMINALS, baudrate=FAST_BAUD) as sim:
            port.parent.mkdir()
            await sim.start_pty(port)
            await asyncio.wait_for(online.wait(), WAIT_S)
            outcome = await asyncio.wait_for(master.dispatch(play("alert-4", seq=4), CODES), WAIT_S)
    await transport.close()
    assert failures.calls == [("alert-1", 1, CODES, cause), ("alert-3", 1, CODES, cause)]
    assert outcome.reports == dict.fromkeys(CODES, AckStatus.DONE)
    assert master.down_cause is None
    assert master.counters.port_failures >= 1


async def test_a_room_without_a_bus_and_a_stopped_master_are_failures_too(tmp_path: Path) -> None:
    master = master_at(tmp_path / "ttyNONE")
    failures = Failures()
    transport = SerialTransport({ROOM: master}, Metrics(), on_failed=failures)
    no_bus = SerialTransport({}, Metrics(), on_failed=failures)
    no_bus.send(play(), terminals(), first=True)
    await failures.until(1, ACK_TIMEOUT_S)
    async with running(master):
        transport.send(play("alert-2", seq=2), terminals(), first=True)
        await failures.until(2, ACK_TIMEOUT_S)  # the master has run: its port does not exist
    transport.send(play("alert-3", seq=3), terminals(), first=True)
    await failures.until(3, ACK_TIMEOUT_S)
    await transport.close()
    await no_bus.close()
    assert failures.calls[0] == ("alert-1", 1, CODES, f"room {ROOM} has no serial bus")
    assert failures.calls[1] == ("alert-2", 1, CODES, f"serial port {tmp_path / 'ttyNONE'} does not exist")
    assert failures.calls[2][:3] == ("alert-3", 1, CODES)
    assert "stopped" in failures.calls[2][3]


def test_port_down_causes(tmp_path: Path) -> None:
    error = OSError(2, "could not open port")
    gone = tmp_path / "ttyGONE"
    assert port_down_cause(str(gone), error) == f"serial port {gone} does not exist"
    dangling = tmp_path / "ttyLINK"
    os.symlink("/dev/pts/999999", dangling)
    assert port_down_cause(str(dangling), error) == (
        f"serial port {dangling} does not exist (it links to /dev/pts/999999, which is gone)"
    )
    assert port_down_cause("{run_dir}/x", error) == (
        "serial port {run_dir}/x does not exist: its {run_dir} was never expanded"
    )
    assert port_down_cause("/dev/null", OSError(25, "not a tty")) == (
        "serial port /dev/null is down: [Errno 25] not a tty"
    )
    assert port_down_cause("socket://127.0.0.1:1", ConnectionRefusedError(111, "refused")).startswith(
        "serial port socket://127.0.0.1:1 is down: "
    )
