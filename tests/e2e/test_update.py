"""Alert, update with a smaller area, cancel: over MQTT, in JSON and in CAP 1.2; and manual review."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ebcd.config import Config
from ebcd.delivery.core import Refused
from ebcd.journal.reader import JOURNAL_FILE, JournalReader
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from simulators.mqtt_fleet import MqttFleet
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for
from tests.ingest.cap_docs import alert as cap_alert
from tests.ingest.cap_docs import area as cap_area
from tests.ingest.cap_docs import info as cap_info

pytestmark = pytest.mark.slow


def _town(district: District) -> Any:
    return next(t for t in district.towns.values() if all(v.link == "mqtt" for v in t.villages.values()))


def _stopped(fleet: MqttFleet, alert_id: str) -> set[str]:
    return {s.terminal.code for s in fleet.terminals if alert_id in s.behaviour.stopped}


def _played(fleet: MqttFleet, alert_id: str, revision: int) -> set[str]:
    return {code for (code, a, r) in fleet.plays() if a == alert_id and r == revision}


def _states(seen: list[tuple[str, Any]], topic: str) -> list[dict[str, Any]]:
    return [d for t, d in seen if t == topic and isinstance(d, dict)]


async def _update_and_cancel(
    mosquitto: Mosquitto, config: Config, district: District, tmp_path: Path, messages: list[bytes]
) -> None:
    """Publish alert, update (one village of the town) and cancel; check terminals and the state topic."""
    topics = Topics(district.code)
    town = _town(district)
    village = next(iter(town.villages.values()))
    everyone = {t.code for t in town.terminals()}
    kept = {t.code for t in village.terminals}
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, list(town.terminals()), mosquitto.host, mosquitto.port) as fleet,
        mqtt_client(mosquitto.host, mosquitto.port, f"{topics.prefix}/alerts/#") as (client, seen),
    ):
        await client.publish(topics.alerts_in, messages[0], qos=1)
        await wait_for(lambda: len(daemon.runner.alerts) == 1, 10)
        run = next(iter(daemon.runner.alerts.values()))
        first = await settle(daemon, run.id, until="completed")
        assert (first["state"], first["targets"], first["revision"]) == ("completed", len(everyone), 1)
        assert _played(fleet, run.id, 1) == everyone

        await client.publish(topics.alerts_in, messages[1], qos=1)
        await wait_for(lambda: run.revision == 2, 10)
        second = await settle(daemon, run.id, until="completed")
        assert (second["state"], second["targets"], second["acked"]) == ("completed", len(kept), len(kept))
        assert second["text"] != first["text"]
        await wait_for(lambda: _stopped(fleet, run.id) == everyone - kept, 10)  # the right ones stop
        assert _played(fleet, run.id, 2) == kept  # the kept ones got the new content

        await client.publish(topics.alerts_in, messages[2], qos=1)
        await wait_for(lambda: run.state.value == "cancelled", 10)
        await wait_for(lambda: _stopped(fleet, run.id) == everyone, 10)  # all stop
        daemon.runner.flush_states()
        state_topic = topics.alert_state(run.id)
        await wait_for(lambda: any(d["state"] == "cancelled" for d in _states(seen, state_topic)), 10)
        published = _states(seen, state_topic)
        assert [d["revision"] for d in published] == sorted(d["revision"] for d in published)
        assert {(d["revision"], d["targets"]) for d in published} >= {(1, len(everyone)), (2, len(kept))}
        assert all(n == 1 for n in fleet.plays().values())  # nothing played twice
        rejected = [d for t, d in seen if t == topics.rejected]
        assert rejected == []


async def test_json_alert_update_cancel(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    town = _town(district)
    village = next(iter(town.villages.values()))
    base = {"identifier": "flood-7", "sender": "city-ews", "level": 2, "event_type": "11A01", "ttl_s": 600}
    messages = [
        {**base, "targets": [f"town:{town.code}"], "text": "洪水橙色预警"},
        {
            **base,
            "identifier": "flood-7u",
            "msgType": "update",
            "references": ["city-ews,flood-7"],
            "targets": [f"village:{village.area}"],
            "text": "洪水橙色预警：仅沿河村庄",
        },
        {**base, "identifier": "flood-7c", "msgType": "cancel", "references": ["city-ews,flood-7u"]},
    ]
    await _update_and_cancel(
        mosquitto, fast_config(shipped_config), district, tmp_path, [json.dumps(m).encode() for m in messages]
    )


async def test_cap_alert_update_cancel(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    town = _town(district)
    village = next(iter(town.villages.values()))
    now = datetime.now(UTC).replace(microsecond=0)
    sent = [(now + timedelta(seconds=i)).isoformat() for i in range(3)]
    expires = (now + timedelta(minutes=30)).isoformat()
    sender = "warning@example.gov.cn"

    def doc(i: int, msg_type: str, where: str, headline: str, refs: str | None = None) -> bytes:
        areas = [cap_area("沿河", geocodes=[("AreaCode", where)])]
        return cap_alert(
            identifier=f"GD-{i}",
            sender=sender,
            sent=sent[i],
            msg_type=msg_type,
            references=refs,
            infos=[cap_info(expires=expires, headline=headline, areas=areas)],
        )

    messages = [
        doc(0, "Alert", town.area, "暴雨红色预警"),
        doc(1, "Update", village.area, "暴雨红色预警（更新）", f"{sender},GD-0,{sent[0]}"),
        doc(2, "Cancel", village.area, "解除", f"{sender},GD-1,{sent[1]}"),
    ]
    await _update_and_cancel(mosquitto, fast_config(shipped_config), district, tmp_path, messages)


async def test_manual_review_holds_an_alert_until_approved_and_reject_ends_it(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    config = config.model_copy(update={"review": config.review.model_copy(update={"levels": [1]})})
    topics = Topics(district.code)
    village = next(district.villages())
    alert = {
        "level": 1,
        "event_type": "11A01",
        "targets": [f"village:{village.code}"],
        "text": "洪水红色预警",
    }
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
        mqtt_client(mosquitto.host, mosquitto.port) as (client, _seen),
    ):
        await client.publish(
            topics.alerts_in, json.dumps({**alert, "identifier": "r1", "sender": "s"}), qos=1
        )
        await client.publish(
            topics.alerts_in, json.dumps({**alert, "identifier": "r2", "sender": "s"}), qos=1
        )
        await client.publish(
            topics.alerts_in, json.dumps({**alert, "level": 3, "identifier": "r3", "sender": "s"}), qos=1
        )
        await wait_for(lambda: len(daemon.runner.alerts) == 3, 10)
        held, other, auto = sorted(daemon.runner.alerts.values(), key=lambda r: r.request.identifier or "")
        assert held.state.value == other.state.value == "pending_approval"
        # the journal shows a held alert with its targets, as `alert status` reads it with the daemon down
        reader = JournalReader(tmp_path / JOURNAL_FILE, district)
        try:
            n = len(village.terminals)
            await wait_for(lambda: (reader.alert_state(held.id) or {}).get("pending") == n, 10)
            journalled = reader.alert_state(held.id)
            assert journalled is not None
            assert (journalled["state"], journalled["targets"], journalled["acked"]) == (
                "pending_approval",
                n,
                0,
            )
        finally:
            reader.close()
        await settle(daemon, auto.id, until="completed")
        assert auto.state.value == "completed"  # level 3 is not held
        assert not _played(fleet, held.id, 1)

        await daemon.runner.approve(held.id)
        assert (await settle(daemon, held.id, until="completed"))["state"] == "completed"
        assert _played(fleet, held.id, 1) == {t.code for t in village.terminals}

        await daemon.runner.reject(other.id, "rejected in review")
        assert other.state.value == "rejected"
        with pytest.raises(Refused):  # a rejected alert never goes out
            await daemon.runner.approve(other.id)
        assert not _played(fleet, other.id, 1)
