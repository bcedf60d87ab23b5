"""Upstream messages through a real broker: kept before acknowledged, retained ones refused,
repeats recognised with or without a sender, and what a crash left unjudged judged at the next start."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ebcd.config import Config
from ebcd.journal.journal import Journal
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for

pytestmark = pytest.mark.slow


def _json_alert(village: str, **kw: Any) -> bytes:
    doc: dict[str, Any] = {
        "level": 3,
        "event_type": "11B03",
        "targets": [f"village:{village}"],
        "text": "暴雨黄色预警",
        "test": True,
        **kw,
    }
    return json.dumps(doc, ensure_ascii=False).encode()


def _rejections(seen: list[tuple[str, Any]], topics: Topics) -> list[dict[str, Any]]:
    return [d for t, d in seen if t == topics.rejected and d]


async def test_a_retained_upstream_alert_plays_once_and_is_refused_when_the_broker_replays_it(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    topics = Topics(district.code)
    village = next(v for v in district.villages() if v.link == "mqtt")
    async with (
        mqtt_client(mosquitto.host, mosquitto.port, topics.rejected) as (client, seen),
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
    ):
        try:
            async with running_daemon(config, district, mosquitto.url, tmp_path) as daemon:
                # a live subscriber gets a retained publish as a plain message: it is an alert
                await client.publish(topics.alerts_in, _json_alert(village.code), qos=1, retain=True)
                await wait_for(lambda: len(daemon.runner.alerts) == 1, 10)
                (alert,) = daemon.runner.alerts.values()
                assert (await settle(daemon, alert.id, until="completed"))["state"] == "completed"
            for restart in (1, 2):  # each new subscription gets the retained copy again, flagged
                async with running_daemon(config, district, mosquitto.url, tmp_path) as daemon:
                    await wait_for(lambda n=restart: len(_rejections(seen, topics)) == n, 10)
                    assert not [a for a in daemon.runner.alerts.values() if a.id != alert.id]
        finally:
            await client.publish(topics.alerts_in, b"", qos=1, retain=True)  # clear it for other tests
        assert [d["reason"] for d in _rejections(seen, topics)] == ["retained", "retained"]
        assert {code for code, _a, _r in fleet.plays()} == {t.code for t in village.terminals}
        assert all(n == 1 for n in fleet.plays().values())  # played once, never again
    journal = await Journal.open(tmp_path / "journal.sqlite3")
    try:
        received = await journal.list_received()
    finally:
        await journal.close()
    assert [r.outcome for r in reversed(received)] == ["accepted", "rejected", "rejected"]
    assert all((r.detail or "").startswith("retained") for r in received[:2])


async def test_a_json_alert_without_a_sender_is_deduplicated_by_identifier_and_bare_repeats_by_digest(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    topics = Topics(district.code)
    village = next(v for v in district.villages() if v.link == "mqtt")
    named = _json_alert(village.code, identifier="no-sender-0001")
    bare = _json_alert(village.code, text="暴雨黄色预警：无编号")
    async with (
        mqtt_client(mosquitto.host, mosquitto.port, topics.rejected) as (client, seen),
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
    ):
        for payload in (named, named, bare, bare):
            await client.publish(topics.alerts_in, payload, qos=1)
        await wait_for(lambda: len(_rejections(seen, topics)) == 2, 10)
        assert len(daemon.runner.alerts) == 2
        for alert in list(daemon.runner.alerts.values()):
            assert (await settle(daemon, alert.id, until="completed"))["state"] == "completed"
        rejected = _rejections(seen, topics)
        assert [d["reason"] for d in rejected] == ["duplicate", "duplicate"]
        assert rejected[0]["identifier"] == "no-sender-0001"
        plays = fleet.plays()
        assert all(n == 1 for n in plays.values())  # each of the two alerts played once per terminal
        assert len(plays) == 2 * len(village.terminals)


async def test_a_message_journalled_but_not_judged_before_a_crash_is_judged_at_the_next_start(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    topics = Topics(district.code)
    village = next(v for v in district.villages() if v.link == "mqtt")
    journal = await Journal.open(tmp_path / "journal.sqlite3")
    try:  # what a kill -9 between journalling a message and judging it leaves behind
        row = await journal.record_received(
            topics.alerts_in, _json_alert(village.code, identifier="left-behind"), time.time(), source="mqtt"
        )
    finally:
        await journal.close()
    async with (
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
    ):
        await wait_for(lambda: len(daemon.runner.alerts) == 1, 10)
        (alert,) = daemon.runner.alerts.values()
        assert alert.request.identifier == "left-behind"
        assert (await settle(daemon, alert.id, until="completed"))["state"] == "completed"
        assert {code for code, a, _r in fleet.plays() if a == alert.id} == {t.code for t in village.terminals}
        await wait_for(lambda: daemon.ingest.idle.is_set(), 10)
        (received,) = await daemon.journal.list_received()
        assert (received.row_id, received.outcome, received.alert_id) == (row, "accepted", alert.id)
