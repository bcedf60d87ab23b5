"""The link subscribes to all its topics in one SUBSCRIBE (one round trip before its first send)."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import pytest

from ebcd.protocols.mqtt.link import MqttLink
from tests.conftest import Mosquitto
from tests.helpers import wait_for


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_every_topic_of_the_one_subscribe_delivers(mosquitto: Mosquitto, protocol: str) -> None:
    base = f"ebcd-test/{uuid.uuid4().hex}"
    heard: list[tuple[str, bytes]] = []
    link = MqttLink(
        host=mosquitto.host,
        port=mosquitto.port,
        client_id=f"sub-{uuid.uuid4().hex[:8]}",
        subscriptions=[f"{base}/alerts", f"{base}/reports/+", f"{base}/presence/#"],
        on_message=lambda topic, payload, _r, _p: heard.append((topic, payload)),
        protocol=protocol,
    )
    task = asyncio.create_task(link.run())
    try:
        await wait_for(link.connected.is_set, 10)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
            for topic in (f"{base}/presence/t/1", f"{base}/alerts", f"{base}/reports/t1", f"{base}/other"):
                await c.publish(topic, topic.encode(), qos=1)
            await wait_for(lambda: len(heard) == 3, 10)
        assert sorted(t for t, _ in heard) == [f"{base}/alerts", f"{base}/presence/t/1", f"{base}/reports/t1"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
