"""MQTT 5 request/response: an upstream system that names a response topic and correlation data
hears on that topic, with its correlation data, whether its alert was accepted or refused; an
MQTT 3.1.1 upstream (no properties) still gets the rejection topic only."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ebcd.config import Config
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, wait_for

pytestmark = pytest.mark.slow


def _request(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


async def test_response_topic_and_correlation_data_are_honoured(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    topics = Topics(district.code)
    village = next(v for v in district.villages() if v.link == "mqtt")
    replies: list[tuple[str, dict[str, Any], bytes | None]] = []
    reply_to = f"{topics.replies}city-ews/42"
    elsewhere = topics.alert_state("20260101-0001")  # a sender may not make ebcd publish there
    good = json.dumps(
        {
            "identifier": "CITY-2026-0042",
            "sender": "city-ews",
            "level": 3,
            "event_type": "11B03",
            "targets": [f"village:{village.code}"],
            "text": "暴雨黄色预警",
        }
    ).encode()
    async with (
        running_daemon(fast_config(shipped_config), district, mosquitto.url, tmp_path) as daemon,
        aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as upstream,
        mqtt_client(mosquitto.host, mosquitto.port, topics.rejected) as (_observer, rejections),
    ):
        assert daemon.link.speaks_v5  # Mosquitto speaks MQTT 5, so "auto" stays there
        await upstream.subscribe(reply_to, qos=1)
        await upstream.subscribe(elsewhere, qos=1)

        async def collect() -> None:
            async for m in upstream.messages:
                corr = getattr(m.properties, "CorrelationData", None)
                replies.append((m.topic.value, json.loads(bytes(m.payload)), corr))  # type: ignore[arg-type]

        task = asyncio.create_task(collect())
        try:
            await upstream.publish(topics.alerts_in, good, qos=1, properties=_request(reply_to, b"req-1"))
            await upstream.publish(
                topics.alerts_in, b'{"level": 9', qos=1, properties=_request(reply_to, b"\x00req-2\xff")
            )
            await wait_for(lambda: len(replies) == 2, 10)
            unexpected = daemon.metrics.unexpected.labels("response_topic")
            hijack = json.loads(good) | {"identifier": "CITY-2026-0043"}
            await upstream.publish(
                topics.alerts_in, json.dumps(hijack), qos=1, properties=_request(elsewhere, b"req-3")
            )
            await wait_for(lambda: unexpected._value.get() == 1, 10)
            await wait_for(lambda: len(daemon.runner.alerts) == 2, 10)  # accepted, just not answered there
            await upstream.publish(topics.alerts_in, b"{}", qos=1, properties=_request(reply_to, b"fence"))
            await wait_for(lambda: len(replies) == 3, 10)
        finally:
            task.cancel()
        assert [topic for topic, _doc, _corr in replies] == [reply_to] * 3  # nothing elsewhere
        by_corr = {corr: (topic, doc) for topic, doc, corr in replies}
        accepted_topic, accepted = by_corr[b"req-1"]
        run = next(r for r in daemon.runner.alerts.values() if r.request.identifier == "CITY-2026-0042")
        assert accepted_topic == reply_to
        assert accepted["status"] == "accepted"
        assert (accepted["id"], accepted["identifier"]) == (run.id, "CITY-2026-0042")
        assert accepted["state_topic"] == topics.alert_state(run.id)
        _topic, refused = by_corr[b"\x00req-2\xff"]  # binary correlation data comes back byte for byte
        assert (refused["status"], refused["reason"]) == ("rejected", "malformed_json")
        # the rejection topic still carries every refusal, for systems that do not ask for an answer
        await wait_for(lambda: len(rejections) == 2, 5)
        assert rejections[0][1]["sha256"] == refused["sha256"]


async def test_the_daemon_falls_back_to_mqtt_311_on_a_broker_that_refuses_5(
    shipped_config: Config, district: District, tmp_path: Path
) -> None:
    from ebcd.cli.broker import start_amqtt
    from tests.conftest import free_port

    port = free_port()
    broker = await start_amqtt(port)  # amqtt: MQTT 3.1.1 only
    try:
        async with running_daemon(
            fast_config(shipped_config), district, f"mqtt://127.0.0.1:{port}", tmp_path
        ) as daemon:
            assert not daemon.link.speaks_v5
            assert daemon.link.connected.is_set()
    finally:
        await broker.shutdown()
