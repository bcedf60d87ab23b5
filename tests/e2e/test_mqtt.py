"""End to end through a real Mosquitto: the daemon and all 769 simulated terminals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.delivery.state import Bucket
from ebcd.ingest import MAX_PAYLOAD_BYTES
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from simulators.faults import Fault, plan
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for, wait_online

pytestmark = pytest.mark.slow


def _alert(target: str, **kw: object) -> AlertRequest:
    return AlertRequest.model_validate(
        {
            "level": 2,
            "event_type": "11B03",
            "targets": [parse_target(target)],
            "text": "暴雨橙色预警：请注意防范",
            "test": True,
            **kw,
        }
    )


async def test_district_wide_alert_reaches_every_terminal_and_town_alert_only_its_town(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    topics = Topics(district.code)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, list(district.terminals()), mosquitto.host, mosquitto.port) as fleet,
        mqtt_client(mosquitto.host, mosquitto.port, f"{topics.prefix}/alerts/+") as (_client, seen),
    ):
        await wait_online(daemon, 769)
        run = await daemon.submit(_alert("all"), source="test", actor="pytest")
        state = await settle(daemon, run.id, until="completed")
        assert state["state"] == "completed"
        assert (state["targets"], state["acked"], state["coverage"]) == (769, 769, 1.0)
        for town in district.towns.values():
            n = sum(1 for _ in town.terminals())
            assert (state["towns"][town.code]["targets"], state["towns"][town.code]["acked"]) == (n, n)
        plays = fleet.plays()
        assert sum(1 for (_, a, _r) in plays if a == run.id) == 769
        assert all(n == 1 for n in plays.values())
        await wait_for(
            lambda: any(t == topics.alert_state(run.id) and d and d["coverage"] == 1.0 for t, d in seen), 5
        )

        town = list(district.towns.values())[2]
        town_run = await daemon.submit(_alert(f"town:{town.area}"), source="test", actor="pytest")
        town_state = await settle(daemon, town_run.id, until="completed")
        expected = {t.code for t in town.terminals()}
        assert town_state["state"] == "completed"
        assert town_state["targets"] == len(expected)
        assert list(town_state["towns"]) == [town.code]
        played = {code for (code, a, _r) in fleet.plays() if a == town_run.id}
        assert played == expected


async def test_five_percent_offline_ends_partial_naming_exactly_them(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config, ack_timeout_s=1.0, max_attempts=2, retry_initial_s=0.2)
    codes = [t.code for t in district.terminals() if t.link == "mqtt"]  # serial buses: faults of their own
    faults = plan(codes, "offline=5%", seed=11)
    offline = set(faults.terminals(Fault.OFFLINE))
    assert len(offline) == round(0.05 * len(codes))
    topics = Topics(district.code)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, list(district.terminals()), mosquitto.host, mosquitto.port, faults),
        mqtt_client(mosquitto.host, mosquitto.port, f"{topics.prefix}/alerts/+") as (_client, seen),
    ):
        await wait_online(daemon, 769 - len(offline))
        run = await daemon.submit(_alert("all"), source="test", actor="pytest")
        await settle(daemon, run.id)
        # the simulated fleet shares this process's event loop: some acknowledgements arrive after the
        # last attempt timed out, and upgrade their uncertain deliveries when they do
        await wait_for(lambda: run.counts[Bucket.ACKED] == 769 - len(offline), 60)
        state = run.state_doc(district, daemon.runner.clock())
        assert state["state"] == "partial"
        assert state["uncertain"] == len(offline)
        not_acked = {t for t, d in run.deliveries.items() if d.bucket != "acked"}
        assert not_acked == offline
        assert all(run.deliveries[t].attempts == 2 for t in offline)
        await wait_for(
            lambda: any(
                t == topics.alert_state(run.id)
                and d
                and d["state"] == "partial"
                and d["acked"] == 769 - len(offline)
                for t, d in seen
            ),
            5,
        )


async def test_bad_upstream_input_is_rejected_with_its_reason_and_the_daemon_keeps_serving(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    topics = Topics(district.code)
    village = next(district.villages())
    good = {
        "identifier": "ok-1",
        "sender": "city",
        "level": 3,
        "event_type": "11B03",
        "targets": [f"village:{village.code}"],
        "text": "大风蓝色预警",
    }
    bad = {
        "malformed_json": b'{"level": 9, "targets": ["nowhere"',
        "unknown_event": json.dumps({**good, "identifier": "b1", "event_type": "99Z99"}).encode(),
        "unknown_target": json.dumps(
            {**good, "identifier": "b2", "targets": ["village:999999999999"]}
        ).encode(),
        "too_large": b'{"text": "' + b"x" * (MAX_PAYLOAD_BYTES + 10) + b'"}',
    }
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port),
        mqtt_client(mosquitto.host, mosquitto.port, topics.rejected, f"{topics.prefix}/alerts/+") as (
            client,
            seen,
        ),
    ):
        for payload in bad.values():
            await client.publish(topics.alerts_in, payload, qos=1)
        await wait_for(lambda: len([1 for t, _ in seen if t == topics.rejected]) >= len(bad), 10)
        reasons = [d["reason"] for t, d in seen if t == topics.rejected]
        assert sorted(reasons) == sorted(bad)
        for _t, d in seen:
            if _t == topics.rejected:
                assert d["detail"]
                assert len(d["sha256"]) == 64
        await client.publish(topics.alerts_in, json.dumps(good).encode(), qos=1)
        await wait_for(lambda: any(r.request.identifier == "ok-1" for r in daemon.runner.alerts.values()), 10)
        run = next(r for r in daemon.runner.alerts.values() if r.request.identifier == "ok-1")
        state = await settle(daemon, run.id, until="completed")
        assert state["state"] == "completed"
        assert state["targets"] == len(village.terminals)
        await client.publish(topics.alerts_in, json.dumps(good).encode(), qos=1)  # the same again
        await wait_for(lambda: "duplicate" in [d["reason"] for t, d in seen if t == topics.rejected], 10)
        assert sum(1 for r in daemon.runner.alerts.values() if r.request.identifier == "ok-1") == 1
        metric = daemon.metrics.rejected
        assert {r: metric.labels(r)._value.get() for r in bad} == dict.fromkeys(bad, 1.0)
        await asyncio.sleep(0)
