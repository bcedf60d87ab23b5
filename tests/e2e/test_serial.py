"""End to end over pty pairs: the daemon's bus masters and simulated serial buses, real bytes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.tiers.district import District
from ebcd.tiers.village import Village
from simulators.serial_bus import BusFaults, SerialBusSimulator
from tests.conftest import Mosquitto, fast_config
from tests.helpers import running_daemon, settle

pytestmark = pytest.mark.slow


def _serial_copy(shipped_config: Config, district: District) -> tuple[Config, District]:
    return fast_config(shipped_config, ack_timeout_s=3.0), district


@contextlib.asynccontextmanager
async def _bus(
    village: Village, config: Config, faults: BusFaults | None = None
) -> AsyncIterator[SerialBusSimulator]:
    assert village.port is not None
    async with SerialBusSimulator(
        {t.code: t.bus_address or 0 for t in village.terminals},
        baudrate=config.serial.baudrate,
        play_time_s=0.05,
        faults=faults,
        seed=7,
    ) as sim:
        await sim.start_pty(link=village.port)
        yield sim


def _alert(village: Village) -> AlertRequest:
    return AlertRequest(
        level=2,
        event_type="11A51",
        targets=[parse_target(f"village:{village.code}")],
        text="山洪灾害预警，请立即转移",
        ttl_s=300,
    )


def _serial_villages(district: District) -> list[Village]:
    villages = [v for v in district.villages() if v.link == "serial"]
    assert villages, "the shipped district has serial rooms"
    return villages


async def test_an_alert_to_a_serial_village_reaches_every_terminal_on_its_bus(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config, district = _serial_copy(shipped_config, district)
    village = _serial_villages(district)[0]
    async with (
        _bus(village, config) as sim,
        running_daemon(config, district, mosquitto.url, tmp_path / "s") as d,
    ):
        run = await d.submit(_alert(village), source="test", actor="pytest")
        state = await settle(d, run.id, timeout_s=30, until="completed")
        assert state["state"] == "completed"
        assert state["acked"] == len(village.terminals)
        assert {code for code, t in sim.terminals.items() if t.plays} == {t.code for t in village.terminals}
        assert all(len(t.plays) == 1 for t in sim.terminals.values())  # each played once


async def test_a_dead_terminal_leaves_the_alert_partial_naming_it(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config, district = _serial_copy(shipped_config, district)
    village = _serial_villages(district)[1]
    dead = village.terminals[-1].code
    faults = BusFaults(dead=frozenset({dead}))
    async with (
        _bus(village, config, faults),
        running_daemon(config, district, mosquitto.url, tmp_path / "s") as d,
    ):
        run = await d.submit(_alert(village), source="test", actor="pytest")
        state = await settle(d, run.id, timeout_s=60)
        assert state["state"] == "partial"
        assert state["acked"] == len(village.terminals) - 1
        not_acked = [t for t, dl in run.deliveries.items() if dl.bucket != "acked"]
        assert not_acked == [dead]
        report = d.control.report(run)
        assert [p["terminal"] for p in report["problems"]] == [dead]


async def test_ten_percent_corrupted_frames_still_reach_everyone(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config, district = _serial_copy(shipped_config, district)
    villages = _serial_villages(district)[:4]
    faults = BusFaults(corrupt_rate=0.10)
    async with contextlib.AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(_bus(v, config, faults)) for v in villages]
        d = await stack.enter_async_context(running_daemon(config, district, mosquitto.url, tmp_path / "s"))
        request = AlertRequest(
            level=2,
            event_type="11A51",
            text="山洪灾害预警",
            targets=[parse_target(f"village:{v.code}") for v in villages],
            ttl_s=300,
        )
        run = await d.submit(request, source="test", actor="pytest")
        state = await settle(d, run.id, timeout_s=60, until="completed")
        assert state["state"] == "completed"
        assert state["acked"] == sum(len(v.terminals) for v in villages)
        counters = [d.serial_masters[v.code].counters for v in villages]
        assert sum(c.crc_errors + c.discarded_bytes + c.timeouts for c in counters) > 0  # corruption happened
        assert sum(c.retries for c in counters) > 0  # and was repaired by retries
        for sim in sims:
            assert all(len(t.plays) == 1 for t in sim.terminals.values())  # each played once
