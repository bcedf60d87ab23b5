"""The adapter link over real sockets: transport, listener and a simulated adapter in one loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ebcd.metrics import Metrics
from ebcd.model.backoff import Backoff
from ebcd.protocols.adapter.address import Address
from ebcd.protocols.adapter.bodies import Heartbeat, TaskEnd, encode_body
from ebcd.protocols.adapter.frame import HEAD_ADAPTER, Frame, encode_frame, sign_frame
from ebcd.protocols.adapter.link import AdapterLink
from ebcd.protocols.adapter.listener import AdapterListener
from ebcd.protocols.adapter.transport import AdapterTransport
from ebcd.protocols.messages import AckStatus, PlayCommand, StopCommand, TerminalPresence, TerminalReport
from ebcd.security.signing import Ed25519SigningKey, Signer
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal
from ebcd.tiers.town import Town
from ebcd.tiers.village import Village
from simulators.adapter import AdapterFaults, AdapterSimulator
from tests.helpers import wait_for

TOWN = "53415231060000314010101"
ROOM = "63415231060010314010101"
CODES = tuple(f"634152310600103140104{k:02d}" for k in range(1, 4))
EBMID = "43415230000000314010301202612030001"


def district() -> District:
    d = District(code="43415230000000314010301", name="d", area="341523000000")
    town = Town(TOWN, "t", "341523106000")
    village = Village(ROOM, "v", "341523106001", TOWN, "adapter", "tcp://127.0.0.1:0")
    for code in CODES:
        village.terminals.append(Terminal(code, code, ROOM, ROOM, TOWN, 31.0, 116.0, "adapter"))
    town.villages[ROOM] = village
    d.towns[TOWN] = town
    d.index()
    return d


@dataclass
class Rig:
    transport: AdapterTransport
    listener: AdapterListener
    sim: AdapterSimulator | None
    metrics: Metrics
    reports: list[TerminalReport] = field(default_factory=list)
    presences: list[TerminalPresence] = field(default_factory=list)
    failed: list[tuple[str, list[str], str]] = field(default_factory=list)
    unknown: list[tuple[list[str], str]] = field(default_factory=list)
    serving: asyncio.Task[None] | None = None  # the listener's run()

    def statuses(self, status: AckStatus) -> set[str]:
        return {r.terminal for r in self.reports if r.status is status}

    def dropped(self) -> float:
        return (
            self.metrics.registry.get_sample_value("ebcd_dropped_messages_total", {"where": "adapter"}) or 0.0
        )


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[tuple[Rig, list[asyncio.Task[None]]]] = []

    async def make(
        *,
        faults: AdapterFaults | None = None,
        sim: bool = True,
        sign: Signer | None = None,
        sim_checks: Signer | None = None,
        heartbeat_s: float = 0.2,
    ) -> Rig:
        metrics = Metrics()
        port_dir = tmp_path / "run"
        holder: list[Rig] = []
        link = AdapterLink(
            ROOM,
            Address("127.0.0.1", None, port_dir),
            backoff=Backoff(0.05, 0.2, 0.1),
            connect_timeout_s=1.0,
            reply_timeout_s=2.0,
            on_frame=lambda f: holder[0].listener.handle(f),
            on_drop=lambda why: metrics.dropped.labels("adapter").inc(),
        )
        transport = AdapterTransport(
            {ROOM: link},
            metrics,
            signer=sign,
            on_report=lambda r: holder[0].reports.append(r),
            on_failed=lambda a, rev, codes, cause: holder[0].failed.append((a, codes, cause)),
        )
        listener = AdapterListener(
            Address("127.0.0.1", None, port_dir),
            district(),
            transport,
            metrics,
            on_report=lambda r: holder[0].reports.append(r),
            on_presence=lambda p: holder[0].presences.append(p),
            on_unknown=lambda codes, why: holder[0].unknown.append((codes, why)),
            signer=sign,
            verifiers={},
            heartbeat_s=heartbeat_s,
            max_garbage_bytes=2048,
        )
        simulator = None
        if sim:
            simulator = AdapterSimulator(
                ROOM,
                CODES,
                Address("127.0.0.1", None, port_dir),
                Address("127.0.0.1", None, port_dir),
                None if sim_checks is None else sim_checks.verifier(),
                play_time_s=0.3,
                heartbeat_s=heartbeat_s,
                faults=faults or AdapterFaults(),
            )
        r = Rig(transport, listener, simulator, metrics)
        holder.append(r)
        tasks = [asyncio.create_task(listener.run()), asyncio.create_task(link.run())]
        r.serving = tasks[0]
        await asyncio.wait_for(listener.ready.wait(), 10)
        if simulator is not None:
            await simulator.start()
        made.append((r, tasks))
        return r

    yield make
    for r, tasks in made:
        if r.sim is not None:
            await r.sim.close()
        await r.transport.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def play(seq: int = 1, *, text: str = "暴雨预警", revision: int = 1) -> PlayCommand:
    return PlayCommand("a1", EBMID, revision, seq, 2, "11B03", text, 60.0, issued_at=1.0)


def terminals() -> list[Terminal]:
    return list(district().terminals())


async def test_a_start_is_received_then_playing_then_done(rig: Callable[..., object]) -> None:
    r: Rig = await rig()  # type: ignore[misc]
    await wait_for(lambda: {p.terminal for p in r.presences} == set(CODES), 10)
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.DONE) == set(CODES), 10)
    assert r.statuses(AckStatus.RECEIVED) == set(CODES)
    assert r.statuses(AckStatus.PLAYING) == set(CODES)
    assert all(rep.alert_id == "a1" and rep.revision == 1 for rep in r.reports)
    assert r.sim is not None
    assert r.sim.plays == {EBMID: 1}


async def test_a_stop_is_acknowledged_as_stopped(rig: Callable[..., object]) -> None:
    r: Rig = await rig()  # type: ignore[misc]
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.RECEIVED) == set(CODES), 10)
    r.transport.send(StopCommand("a1", EBMID, 1, 2, "cancelled"), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.STOPPED) == set(CODES), 10)


async def test_code_3_refuses_every_addressed_terminal_with_that_cause(rig: Callable[..., object]) -> None:
    r: Rig = await rig(faults=AdapterFaults(refuse=frozenset({ROOM})))  # type: ignore[misc]
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.REFUSED) == set(CODES), 10)
    causes = {rep.cause for rep in r.reports}
    assert causes == {"adapter refused: code 3 (command conflict): command conflict (simulated)"}


async def test_an_unsigned_command_is_refused_by_an_adapter_that_checks(rig: Callable[..., object]) -> None:
    key = Signer(Ed25519SigningKey.generate(), "5")
    r: Rig = await rig(sim_checks=key)  # type: ignore[misc]
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.REFUSED) == set(CODES), 10)
    assert all("unsigned command" in (rep.cause or "") for rep in r.reports)


async def test_a_signed_command_plays_on_an_adapter_that_checks(rig: Callable[..., object]) -> None:
    key = Signer(Ed25519SigningKey.generate(), "5")
    r: Rig = await rig(sign=key, sim_checks=key)  # type: ignore[misc]
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.DONE) == set(CODES), 10)


async def test_an_adapter_nobody_runs_fails_the_command_with_its_cause(rig: Callable[..., object]) -> None:
    r: Rig = await rig(sim=False)  # type: ignore[misc]
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: bool(r.failed), 10)
    _, codes, cause = r.failed[0]
    assert set(codes) == set(CODES)
    assert "no port published" in cause or "cannot connect" in cause


async def test_a_fault_heartbeat_refuses_new_starts(rig: Callable[..., object]) -> None:
    r: Rig = await rig(faults=AdapterFaults(fault=frozenset({ROOM})))  # type: ignore[misc]
    await wait_for(lambda: ROOM in r.transport.faults, 10)
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.REFUSED) == set(CODES), 10)
    assert "heartbeat state 3" in (r.reports[0].cause or "")


async def test_a_silent_adapter_makes_its_terminals_unknown(rig: Callable[..., object]) -> None:
    r: Rig = await rig(heartbeat_s=0.1)  # type: ignore[misc]
    await wait_for(lambda: bool(r.presences), 10)
    assert r.sim is not None
    await r.sim.close()
    await wait_for(lambda: bool(r.unknown), 10)
    assert r.unknown[0] == (list(CODES), f"adapter {ROOM} silent")


async def test_unknown_adapters_and_broadcasts_are_dropped_and_counted(rig: Callable[..., object]) -> None:
    r: Rig = await rig(sim=False)  # type: ignore[misc]
    stranger = "63415231060020314010101"
    hb = Frame(HEAD_ADAPTER, 0x20, encode_body(Heartbeat(stranger, 1, 0)), source=2)
    end = Frame(HEAD_ADAPTER, 0x19, encode_body(TaskEnd(ROOM, "1" * 35)), source=2)
    assert r.listener.handle(hb) == []
    assert r.listener.handle(end) == []
    assert r.dropped() == 2
    assert not r.reports
    assert not r.presences


async def test_a_listener_with_the_adapters_key_drops_zero_and_forged_blocks(
    rig: Callable[..., object],
) -> None:
    r: Rig = await rig(sim=False)  # type: ignore[misc]
    key = Signer(Ed25519SigningKey.generate(), "9")
    r.listener._verifiers[ROOM] = key.verifier()
    hb = Frame(HEAD_ADAPTER, 0x20, encode_body(Heartbeat(ROOM, 1, 0)), source=2)
    assert r.listener.handle(hb) == []  # all-zero block
    other = Signer(Ed25519SigningKey.generate(), "9")
    assert r.listener.handle(sign_frame(hb, other, now=1)) == []
    assert r.dropped() == 2
    answers = r.listener.handle(sign_frame(hb, key, now=1))
    assert len(answers) == 1
    assert answers[0][3] == 0x21
    assert {p.terminal for p in r.presences} == set(CODES)


async def test_garbage_past_the_bound_disconnects_the_peer(rig: Callable[..., object]) -> None:
    r: Rig = await rig(sim=False)  # type: ignore[misc]
    assert r.listener.bound_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", r.listener.bound_port)
    writer.write(bytes(range(0x60, 0xF0)) * 40)  # no head byte, 5 KiB
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the listener
    writer.close()
    assert r.dropped() >= 1
    # and it still serves the next adapter
    reader, writer = await asyncio.open_connection("127.0.0.1", r.listener.bound_port)
    writer.write(encode_frame(Frame(HEAD_ADAPTER, 0x20, encode_body(Heartbeat(ROOM, 1, 0)), source=2)))
    await writer.drain()
    answer = await asyncio.wait_for(reader.readexactly(93), 10)
    assert answer[0] == 0x49
    assert answer[3] == 0x21
    writer.close()


async def test_a_stopping_listener_closes_its_connections_and_their_handlers_end(
    rig: Callable[..., object],
) -> None:
    r: Rig = await rig(sim=False)  # type: ignore[misc]
    assert r.listener.bound_port is not None
    assert r.serving is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", r.listener.bound_port)
    writer.write(encode_frame(Frame(HEAD_ADAPTER, 0x20, encode_body(Heartbeat(ROOM, 1, 0)), source=2)))
    await writer.drain()
    await asyncio.wait_for(reader.readexactly(93), 10)  # answered: its handler is reading again
    assert r.listener.open_connections == 1
    r.serving.cancel()
    await asyncio.gather(r.serving, return_exceptions=True)
    # no handler left blocked in a read for the loop's shutdown to cancel (an error asyncio logs)
    assert r.listener.open_connections == 0
    await asyncio.wait_for(reader.read(), 10)  # the rest of the answer, then
    assert reader.at_eof()  # the adapter sees the daemon go
    writer.close()


async def test_a_stop_to_some_codes_leaves_the_others_playing_to_their_end(
    rig: Callable[..., object],
) -> None:
    r: Rig = await rig()  # type: ignore[misc]
    r.transport.send(play(), terminals(), first=True)
    await wait_for(lambda: r.statuses(AckStatus.PLAYING) == set(CODES), 10)
    leaving = [t for t in terminals() if t.code == CODES[0]]
    r.transport.send(StopCommand("a1", EBMID, 1, 2, "left the area"), leaving, first=True)
    await wait_for(lambda: r.statuses(AckStatus.DONE) == set(CODES[1:]), 10)
    assert r.statuses(AckStatus.STOPPED) == {CODES[0]}
    assert CODES[0] not in r.statuses(AckStatus.DONE)
