"""A terminal plays one broadcast at a time: priority, pre-emption, resumption, and rooms' own areas."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.delivery.state import DState
from ebcd.ingest import IngestError, Reason
from ebcd.model.alert import AlertRequest, Origin, parse_target
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import running_daemon, running_fleet, settle, wait_for

pytestmark = pytest.mark.slow


def _long_play(config: Config, policy: str = "resume") -> Config:
    config = fast_config(config)
    return config.model_copy(update={
        "simulator": config.simulator.model_copy(update={"play_time_s": 30.0}),
        "priority": config.priority.model_copy(update={"preempted": policy}),
    })  # fmt: skip


def _daily(village_code: str) -> AlertRequest:
    return AlertRequest(
        level=4,
        event_type="20000",
        targets=[parse_target(f"village:{village_code}")],
        text="村务通知：今晚八点召开村民大会",
        origin=Origin.VILLAGE,
        origin_room=village_code,
        ttl_s=600,
    )


def _emergency(target: str) -> AlertRequest:
    return AlertRequest(
        level=1, event_type="11B03", targets=[parse_target(target)], text="暴雨红色预警", ttl_s=600
    )


async def test_a_district_emergency_preempts_a_village_broadcast_which_resumes_after_it(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = _long_play(shipped_config)
    village = next(v for v in district.villages() if v.link == "mqtt")
    codes = {t.code for t in village.terminals}
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
    ):
        daily = await daemon.submit(_daily(village.code), source="cli", actor="village keeper")
        assert (await settle(daemon, daily.id, until="completed"))["state"] == "completed"

        emergency = await daemon.submit(
            _emergency(f"town:{village.town}"), source="cli", actor="duty officer"
        )
        await wait_for(lambda: all(daily.deliveries[c].state is DState.PREEMPTED for c in codes), 10)
        assert all(daily.deliveries[c].cause == f"pre-empted by alert {emergency.id}" for c in codes)
        await wait_for(lambda: all(emergency.deliveries[c].state is DState.ACKNOWLEDGED for c in codes), 10)
        daemon.runner.flush_states()
        doc = daily.state_doc(district, 0)  # a pre-emption takes nothing from what was reached
        assert (doc["state"], doc["acked"], doc["pending"]) == ("completed", len(codes), 0)
        assert all(daily.deliveries[c].resume for c in codes)  # to play again when the terminal is free
        assert all(s.behaviour.current == (emergency.id, 1) for s in fleet.terminals)

        await daemon.runner.cancel(emergency.id, "the storm passed")
        await wait_for(lambda: all(daily.deliveries[c].state is DState.ACKNOWLEDGED for c in codes), 10)
        assert daily.state.value == "completed"  # it never stopped counting as reached
        assert all(s.behaviour.current == (daily.id, 1) for s in fleet.terminals)  # playing it again
        assert all(s.behaviour.resumes[(daily.id, 1)] == 1 for s in fleet.terminals)
        await daemon.journal.flush()
        first = village.terminals[0].code
        history = [t.state for t in await daemon.journal.history(daily.id) if t.terminal == first]
        changes = [s for i, s in enumerate(history) if i == 0 or history[i - 1] != s]  # progress repeats
        assert changes[-3:] == [DState.PREEMPTED, DState.SENT, DState.ACKNOWLEDGED]


async def test_a_lower_priority_alert_waits_and_policy_end_does_not_resume(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = _long_play(shipped_config, policy="end")
    village = next(v for v in district.villages() if v.link == "mqtt")
    codes = {t.code for t in village.terminals}
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
    ):
        emergency = await daemon.submit(
            _emergency(f"village:{village.code}"), source="cli", actor="duty officer"
        )
        assert (await settle(daemon, emergency.id, until="completed"))["state"] == "completed"
        daily = await daemon.submit(_daily(village.code), source="cli", actor="village keeper")
        await wait_for(
            lambda: all((daily.deliveries[c].cause or "").startswith("waiting") for c in codes), 10
        )
        assert all(
            daily.deliveries[c].state is DState.WAITING and daily.deliveries[c].attempts == 0 for c in codes
        )  # never sent over the emergency

        await daemon.runner.cancel(emergency.id, "over")
        assert (await settle(daemon, daily.id, until="completed"))[
            "state"
        ] == "completed"  # the waiting one goes out now

        second = await daemon.submit(
            _emergency(f"village:{village.code}"), source="cli", actor="duty officer"
        )
        await settle(daemon, second.id, until="completed")
        await wait_for(lambda: all(daily.deliveries[c].state is DState.CANCELLED for c in codes), 10)
        assert all((daily.deliveries[c].cause or "").startswith("ended: pre-empted") for c in codes)
        await daemon.runner.cancel(second.id, "over")
        assert (await settle(daemon, daily.id, until="completed"))[
            "state"
        ] == "completed"  # what it reached stays reached
        assert all(s.behaviour.resumes[(daily.id, 1)] == 0 for s in fleet.terminals)  # policy end: no resume
        assert all(daily.deliveries[c].finished for c in codes)


async def test_a_room_broadcasts_to_its_own_area_only(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    villages = [v for v in district.villages() if v.link == "mqtt"][:2]
    async with running_daemon(fast_config(shipped_config), district, mosquitto.url, tmp_path) as daemon:
        request = _daily(villages[0].code).model_copy(
            update={"targets": [parse_target(f"village:{villages[1].code}")]}
        )
        with pytest.raises(IngestError) as refused:
            await daemon.submit(request, source="cli", actor="village keeper")
        assert refused.value.reason is Reason.NOT_ALLOWED
        assert "own area only" in refused.value.detail
        assert not daemon.runner.alerts
