"""MQTT 5 PUBLISH properties decode exactly as paho's own class decodes them, whatever they carry,
and reach the link's handler through a real broker (the shared tables only change the cost)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiomqtt
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ebcd.protocols.mqtt import properties as fast
from ebcd.protocols.mqtt.link import MqttLink
from tests.conftest import Mosquitto
from tests.helpers import wait_for

# what paho itself refuses in a UTF-8 string (MQTT-1.5.4): surrogates, U+0000, U+FEFF
_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00\ufeff"), max_size=20)
_PROPERTY = st.fixed_dictionaries(
    {},
    optional={
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "ContentType": _text,
        "ResponseTopic": _text.filter(bool),
        "CorrelationData": st.binary(max_size=16),
        "TopicAlias": st.integers(1, 65535),
        "UserProperty": st.lists(st.tuples(_text, _text), min_size=1, max_size=3),
    },
)


def _packed(props: dict[str, Any]) -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    for name, value in props.items():
        setattr(p, name, value)
    return bytes(p.pack())


def _publish_body(topic: bytes, props: bytes, payload: bytes) -> bytes:
    # PUBLISH at QoS 1 after the fixed header: topic, packet id, properties, payload
    return len(topic).to_bytes(2, "big") + topic + (7).to_bytes(2, "big") + props + payload


@given(_PROPERTY, st.binary(max_size=40))
@settings(max_examples=300, deadline=None)
def test_decoded_properties_equal_paho_own(props: dict[str, Any], payload: bytes) -> None:
    body = _publish_body(b"ebc/v1/x/t/1/report", _packed(props), payload)
    ours, _ = fast.SharedTableProperties(PacketTypes.PUBLISH).unpack(_packed(props))
    theirs, _ = Properties(PacketTypes.PUBLISH).unpack(_packed(props))
    assert ours.json() == theirs.json()
    assert ours.isEmpty() == theirs.isEmpty() == (not props)
    fast.install()
    packet = _packet.decode_publish(0x32, body, MQTTProtocolVersion.MQTTv5)
    assert packet.payload == payload
    assert packet.properties.json() == theirs.json()


def test_a_reused_object_forgets_what_an_earlier_packet_set() -> None:
    p = fast.SharedTableProperties(PacketTypes.PUBLISH)
    p.unpack(_packed({"ResponseTopic": "a/b", "UserProperty": [("k", "v")]}))
    p.unpack(_packed({}))
    assert p.isEmpty()
    assert p.json() == {}
    assert not hasattr(p, "ResponseTopic")


async def test_properties_cross_a_real_broker_to_the_link_handler(mosquitto: Mosquitto) -> None:
    topic = f"ebcd-test/{uuid.uuid4().hex}"
    heard: list[tuple[bytes, Any]] = []
    link = MqttLink(
        host=mosquitto.host,
        port=mosquitto.port,
        client_id=f"props-{uuid.uuid4().hex[:8]}",
        subscriptions=[topic],
        on_message=lambda _t, payload, _r, props: heard.append((payload, props)),
        protocol="5",
    )
    assert _packet.Properties is fast.SharedTableProperties  # an MQTT 5 link decodes with it
    task = asyncio.create_task(link.run())
    try:
        await wait_for(link.connected.is_set, 10)
        sent = Properties(PacketTypes.PUBLISH)
        sent.ResponseTopic = "ebc/v1/replies/city/1"
        sent.CorrelationData = b"\x00\x01corr"
        sent.UserProperty = [("sender", "city-ews")]
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.publish(topic, b"with", qos=1, properties=sent)
            await c.publish(topic, b"without", qos=1)
            await wait_for(lambda: len(heard) == 2, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    (with_payload, with_props), (without_payload, without_props) = heard
    assert with_payload == b"with"
    assert with_props.ResponseTopic == "ebc/v1/replies/city/1"
    assert with_props.CorrelationData == b"\x00\x01corr"
    assert with_props.UserProperty == [("sender", "city-ews")]
    assert without_payload == b"without"
    assert without_props.isEmpty()
