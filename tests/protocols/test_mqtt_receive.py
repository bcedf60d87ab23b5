"""What the link reads: all its topics from one SUBSCRIBE; messages handed over as paho reads them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiomqtt
import pytest
import structlog

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


async def test_a_handler_that_fails_is_logged_and_the_next_message_still_arrives(
    mosquitto: Mosquitto,
) -> None:
    topic = f"ebcd-test/{uuid.uuid4().hex}"
    heard: list[bytes] = []

    def handler(_topic: str, payload: bytes, _retain: bool, _props: object) -> None:
        if payload == b"bad":
            raise ValueError("a bug in the handler")
        heard.append(payload)

    link = MqttLink(
        host=mosquitto.host,
        port=mosquitto.port,
        client_id=f"recv-{uuid.uuid4().hex[:8]}",
        subscriptions=[topic],
        on_message=handler,
        protocol="5",
    )
    task = asyncio.create_task(link.run())
    try:
        with structlog.testing.capture_logs() as logs:
            await wait_for(link.connected.is_set, 10)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
                for payload in (b"one", b"bad", b"two"):
                    await c.publish(topic, payload, qos=1)
                await wait_for(lambda: len(heard) == 2, 10)
        assert heard == [b"one", b"two"]
        failed = [e for e in logs if e["event"] == "mqtt.handler_failed"]
        assert [e["topic"] for e in failed] == [topic]
        assert link.connected.is_set()  # the connection was not dropped over it
        assert link.connects == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _kept_session_link(mosquitto: Mosquitto, base: str, heard: list[bytes], **more: Any) -> MqttLink:
    """A link with a persistent session on `base`/report, connected once and gone again."""
    link = MqttLink(
        host=mosquitto.host,
        port=mosquitto.port,
        client_id=f"kept-{uuid.uuid4().hex[:8]}",
        subscriptions=[f"{base}/report"],
        on_message=lambda _t, payload, _r, _p: heard.append(payload),
        clean_session=False,
        protocol="5",
        **more,
    )
    task = asyncio.create_task(link.run())
    await wait_for(link.connected.is_set, 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return link


async def test_a_kept_session_delivers_what_was_queued_both_ways(mosquitto: Mosquitto) -> None:
    base = f"ebcd-test/{uuid.uuid4().hex}"
    heard: list[bytes] = []
    link = await _kept_session_link(mosquitto, base, heard)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.subscribe(f"{base}/cmd", qos=1)
        await c.publish(f"{base}/report", b"while away", qos=1)  # the broker keeps it for the link
        assert link.enqueue(f"{base}/cmd", b"re-send", qos=1)  # queued while disconnected
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                async for message in c.messages:
                    assert message.payload == b"re-send"
                    break
            await wait_for(lambda: heard == [b"while away"], 10)
            assert link._session_present
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_kept_session_serves_before_its_suback(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a kill -9 the broker hands a kept session its whole backlog before the SUBACK; at
    30,000 terminals reading it took longer than the link's timeouts. The link must serve, publish
    and run on_connect meanwhile, not wait for the SUBACK and drop the connection when it is late."""
    base = f"ebcd-test/{uuid.uuid4().hex}"
    heard: list[bytes] = []
    connected: list[int] = []

    async def on_connect() -> None:
        connected.append(1)

    link = await _kept_session_link(mosquitto, base, heard, on_connect=on_connect)
    subscribe = aiomqtt.Client.subscribe
    late = asyncio.Event()

    async def suback_never_comes(self: aiomqtt.Client, *args: object, **kwargs: object) -> object:
        await late.wait()  # the backlog the broker sends first takes for ever to read
        return await subscribe(self, *args, **kwargs)  # type: ignore[arg-type]

    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.subscribe(f"{base}/cmd", qos=1)
        monkeypatch.setattr(aiomqtt.Client, "subscribe", suback_never_comes)  # the link's, from here
        await c.publish(f"{base}/report", b"kept for the link", qos=1)
        assert link.enqueue(f"{base}/cmd", b"re-send", qos=1)
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                async for message in c.messages:
                    assert message.payload == b"re-send"
                    break
            await wait_for(lambda: heard == [b"kept for the link"] and connected == [1, 1], 10)
            assert link.connected.is_set()
            assert link.connects == 2  # the first connection, and this one: never dropped
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
