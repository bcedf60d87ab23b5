"""End to end through the vendors' adapters: the daemon, simulated adapters, real TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.delivery.state import Progress
from ebcd.model.alert import AlertRequest, MsgType, parse_target
from ebcd.protocols.adapter import address as adapter_address
from ebcd.protocols.adapter.bodies import Heartbeat, encode_body
from ebcd.protocols.adapter.frame import HEAD_ADAPTER, Frame, SignedData, encode_frame
from ebcd.security.bench import verifier_from
from ebcd.tiers.district import District
from ebcd.tiers.town import Town
from ebcd.tiers.village import Village
from simulators.adapter import AdapterFaults, AdapterSimulator
from tests.conftest import Mosquitto, fast_config
from tests.helpers import running_daemon, running_fleet, settle, wait_for, wait_online

pytestmark = pytest.mark.slow


def _town(district: District) -> Town:
    town = next(t for t in district.towns.values() if any(v.link == "adapter" for v in t.villages.values()))
    assert all(v.link == "adapter" for v in town.villages.values()), "one town's villages all on adapters"
    return town


def _villages(district: District) -> list[Village]:
    return list(_town(district).villages.values())


def _codes(villages: list[Village]) -> set[str]:
    return {t.code for v in villages for t in v.terminals}


def _alert(target: str, text: str = "山洪灾害预警，请立即转移", **kw: object) -> AlertRequest:
    return AlertRequest(
        level=2, event_type="11A51", targets=[parse_target(target)], text=text, ttl_s=300, **kw
    )  # type: ignore[arg-type]


def _sim(config: Config, village: Village, **kw: object) -> AdapterSimulator:
    assert village.port is not None
    listen = config.adapter.listen
    assert listen is not None
    sec = config.security
    return AdapterSimulator(
        village.code,
        tuple(t.code for t in village.terminals),
        adapter_address.parse(village.port),
        adapter_address.parse(listen, scheme=False),
        verifier_from(sec.public_key, sec.scheme, config.base_dir),
        variant=SignedData(config.adapter.signed_data),
        play_time_s=float(kw.pop("play_time_s", 0.2)),  # type: ignore[arg-type]
        heartbeat_s=config.adapter.heartbeat_s,
        **kw,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def _adapters(sims: list[AdapterSimulator]) -> AsyncIterator[list[AdapterSimulator]]:
    try:
        for sim in sims:
            await sim.start()
        yield sims
    finally:
        for sim in sims:
            await sim.close()


async def test_a_district_wide_alert_reaches_every_adapter_terminal_with_start_task_start_and_end(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    villages = _villages(district)
    on_adapters = _codes(villages)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, list(district.terminals()), mosquitto.host, mosquitto.port) as fleet,
    ):
        await wait_online(daemon, len(district), timeout_s=120)
        run = await daemon.submit(_alert("all"), source="test", actor="pytest")
        state = await settle(daemon, run.id, until="completed", timeout_s=120)
        assert (state["state"], state["acked"]) == ("completed", len(district))
        # the 0x18 task start and the 0x19 task end of every adapter reached ebcd
        await wait_for(lambda: all(run.deliveries[c].progress is Progress.DONE for c in on_adapters), 30)
        assert len(fleet.adapters) == len(villages)
        assert all(sim.plays == {run.ebmid: 1} for sim in fleet.adapters)  # one start each, played once
        assert sum(sim.commands for sim in fleet.adapters) == len(villages)  # no retries were needed
        plays = fleet.plays()
        assert {code for (code, a, _r) in plays if a == run.id} >= on_adapters


async def test_cancel_stops_and_update_restarts_over_the_adapter_link(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    village = _villages(district)[0]
    codes = {t.code for t in village.terminals}
    async with (
        _adapters([_sim(config, village, play_time_s=60.0)]) as (sim,),
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
    ):
        run = await daemon.submit(_alert(f"village:{village.code}"), source="test", actor="pytest")
        await wait_for(lambda: all(run.deliveries[c].progress is Progress.PLAYING for c in codes), 30)

        update = _alert(
            f"village:{village.code}", text="更新：水位继续上涨", msg_type=MsgType.UPDATE, references=[run.id]
        )
        await daemon.submit(update, source="test", actor="pytest")
        await wait_for(lambda: sim.plays.get(run.ebmid) == 2, 30)  # a new start with the new content
        current = sim.now_playing(run.ebmid)
        assert current is not None
        assert current.languages[0].text == "更新：水位继续上涨"
        await wait_for(
            lambda: all(run.deliveries[c].progress is Progress.PLAYING and run.revision == 2 for c in codes),
            30,
        )

        cancel = _alert(f"village:{village.code}", msg_type=MsgType.CANCEL, references=[run.id])
        await daemon.submit(cancel, source="test", actor="pytest")
        await wait_for(lambda: run.state.value == "cancelled", 30)
        await wait_for(lambda: sim.now_playing(run.ebmid) is None, 30)
        assert not sim.finished(run.ebmid)  # stopped, never played to its end
        state = await settle(daemon, run.id, until="cancelled")
        assert (state["state"], state["acked"]) == ("cancelled", len(codes))  # a cancel keeps history


async def test_an_adapter_killed_mid_broadcast_and_restarted_gets_the_alert(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config, ack_timeout_s=2.0, max_attempts=6)
    village = _villages(district)[1]
    codes = {t.code for t in village.terminals}
    first = _sim(config, village, faults=AdapterFaults(slow_s=30.0))  # takes the command, never answers
    await first.start()
    try:
        async with running_daemon(config, district, mosquitto.url, tmp_path) as daemon:
            run = await daemon.submit(_alert(f"village:{village.code}"), source="test", actor="pytest")
            await wait_for(lambda: first.commands >= 1, 30)
            await first.close()  # killed while the command is in flight
            link = daemon.adapter_links[village.code]
            await wait_for(lambda: not link.connected.is_set(), 30)
            async with _adapters([_sim(config, village)]) as (second,):
                state = await settle(daemon, run.id, until="completed", timeout_s=60)
                assert (state["state"], state["acked"]) == ("completed", len(codes))
                assert sorted(code for code, _e, _n in second.played) == sorted(codes)  # each once
                assert link.connects >= 2
                await wait_for(lambda: all(run.deliveries[c].progress is Progress.DONE for c in codes), 30)
    finally:
        await first.close()


async def test_an_adapter_refusing_with_code_3_shows_in_the_report(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    village = _villages(district)[2]
    codes = {t.code for t in village.terminals}
    faults = AdapterFaults(refuse=frozenset({village.code}))
    async with (
        _adapters([_sim(config, village, faults=faults)]),
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
    ):
        run = await daemon.submit(_alert(f"village:{village.code}"), source="test", actor="pytest")
        state = await settle(daemon, run.id, timeout_s=60)
        assert state["acked"] == 0
        report = daemon.control.report(run)
        assert {p["terminal"] for p in report["problems"]} == codes
        assert all("code 3 (command conflict)" in (p["cause"] or "") for p in report["problems"])


async def test_unsigned_and_corrupted_commands_are_refused_by_the_adapter_and_reported(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    unsigned = fast_config(shipped_config)
    unsigned = unsigned.model_copy(
        update={"security": unsigned.security.model_copy(update={"scheme": "none"})}
    )
    checking, corrupted = _villages(district)[3], _villages(district)[4]
    proxy_dir = tmp_path / "behind-proxy"
    behind = _sim(shipped_config, corrupted)
    behind.address = adapter_address.Address("127.0.0.1", None, proxy_dir)
    async with (
        _adapters([_sim(shipped_config, checking)]),
        running_daemon(unsigned, district, mosquitto.url, tmp_path / "d") as daemon,
    ):
        run = await daemon.submit(_alert(f"village:{checking.code}"), source="test", actor="pytest")
        await settle(daemon, run.id, timeout_s=60)
        problems = daemon.control.report(run)["problems"]
        assert {p["terminal"] for p in problems} == {t.code for t in checking.terminals}
        assert all("unsigned command" in (p["cause"] or "") for p in problems)

    signed = fast_config(shipped_config)
    async with (
        _adapters([behind]),
        _corrupting_proxy(corrupted.code, shipped_config, proxy_dir),
        running_daemon(signed, district, mosquitto.url, tmp_path / "e") as daemon,
    ):
        run = await daemon.submit(_alert(f"village:{corrupted.code}"), source="test", actor="pytest")
        await settle(daemon, run.id, timeout_s=60)
        problems = daemon.control.report(run)["problems"]
        assert {p["terminal"] for p in problems} == {t.code for t in corrupted.terminals}
        assert all("CRC mismatch" in (p["cause"] or "") for p in problems)
        assert "crc" in behind.refused


@contextlib.asynccontextmanager
async def _corrupting_proxy(room: str, config: Config, behind: Path) -> AsyncIterator[None]:
    """Stands at the room's address; flips one body byte of everything ebcd sends to the adapter."""
    village_port = adapter_address.parse(f"tcp://127.0.0.1:{config.base_dir}")
    assert village_port.port_dir is not None

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = adapter_address.Address("127.0.0.1", None, behind).resolve(
            adapter_address.room_port_file(room)
        )
        up_reader, up_writer = await asyncio.open_connection(host, port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flip: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if flip and len(data) > 20:
                        data = data[:20] + bytes([data[20] ^ 0x01]) + data[21:]
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    adapter_address.publish_port(village_port.port_dir, adapter_address.room_port_file(room), port)
    try:
        yield
    finally:
        server.close()


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_the_listener_survives_random_bytes_truncated_frames_and_huge_lengths(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    village = _villages(district)[5]
    rng = random.Random(13)
    hb = encode_frame(Frame(HEAD_ADAPTER, 0x20, encode_body(Heartbeat(village.code, 1, 0)), source=2))
    async with running_daemon(config, district, mosquitto.url, tmp_path) as daemon:
        listener = daemon.adapter_listener
        assert listener is not None
        await asyncio.wait_for(listener.ready.wait(), 20)
        port = listener.bound_port
        assert port is not None
        before = _rss_kib()
        attacks = [
            rng.randbytes(200_000),  # random bytes
            hb[: len(hb) // 2] * 500,  # truncated frames, again and again
            b"".join(b"\x50\x00\x01\x20\x02" + rng.randbytes(4) for _ in range(20_000)),  # huge lengths
            b"\x50\x00\x01\x20\x02\x00\x00\x3f\xff" + rng.randbytes(20_000),  # a length within the bound
        ]
        for round_ in range(5):
            for attack in attacks:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                with contextlib.suppress(OSError):
                    writer.write(attack)
                    await writer.drain()
                    writer.write_eof()
                    await asyncio.wait_for(reader.read(), 30)  # the listener answers or closes, never hangs
                writer.close()
            assert daemon.runner.alerts == {}, f"round {round_}: nothing an adapter sends makes an alert"
        grown_mib = (_rss_kib() - before) / 1024
        assert grown_mib < 64, f"the daemon grew by {grown_mib:.0f} MiB under garbage"
        assert listener.open_connections == 0
        dropped = daemon.metrics.registry.get_sample_value(
            "ebcd_dropped_messages_total", {"where": "adapter"}
        )
        assert dropped is not None
        assert dropped > 0
        # and a real heartbeat still works
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hb)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readexactly(93), 20)
        assert answer[3] == 0x21
        writer.close()
        await wait_for(lambda: daemon.core.liveness.state(village.terminals[0].code).value == "online", 20)
