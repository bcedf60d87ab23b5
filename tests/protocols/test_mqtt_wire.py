"""paho's socket with a read buffer and joined writes: the same bytes, fewer system calls."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import deque
from typing import Any

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebcd.protocols.mqtt import wire
from ebcd.protocols.mqtt.link import MqttLink
from tests.conftest import Mosquitto
from tests.helpers import wait_for


def pair() -> tuple[wire.BufferedSocket, socket.socket]:
    a, b = socket.socketpair()
    return wire.BufferedSocket.adopt(a), b


def test_small_reads_are_served_from_one_read_ahead() -> None:
    reader, writer = pair()
    with reader, writer:
        packets = [b"\x30\x05hello", b"\x40\x02\x00\x01", b"\x30\x03abc"]
        writer.sendall(b"".join(packets))
        reader.setblocking(False)
        got = []
        for _ in packets:  # as paho reads: the command byte, the length byte, the body
            head, length = reader.recv(1), reader.recv(1)
            got.append(head + length + reader.recv(length[0]))
        assert got == packets
        assert reader.pending() == 0
        with pytest.raises(BlockingIOError):  # nothing held, nothing on the wire
            reader.recv(1)
        writer.sendall(b"\x30")
        assert reader.pending() == 0  # bytes on the wire are not pending: the selector sees them
        assert reader.recv(1) == b"\x30"
        writer.close()
        assert reader.recv(1) == b""  # the peer closed


def test_pending_counts_what_was_read_ahead() -> None:
    reader, writer = pair()
    with reader, writer:
        writer.sendall(b"abcdef")
        assert reader.recv(2) == b"ab"
        assert reader.pending() == 4
        assert reader.recv(10) == b"cdef"  # a read past what is held returns what is held
        assert reader.pending() == 0


def _turn(reader: wire.BufferedSocket, size: int) -> int:
    """One readiness callback as aiomqtt runs it: paho reads a packet of `size` bytes (again while
    it is short), and again while pending(); the bytes read."""
    got = 0
    while True:
        want = size
        try:
            while want:
                want -= len(reader.recv(want))
        except BlockingIOError:
            return got + size - want
        got += size
        if not reader.pending():
            return got


def test_a_flood_ends_the_turn_while_the_socket_stays_readable() -> None:
    reader, writer = pair()
    with reader, writer:
        writer.setblocking(False)
        sent = writer.send(b"r" * (8 * wire.READ_BYTES))  # as much as the socket takes
        assert sent > 3 * wire.READ_BYTES
        reader.setblocking(False)
        first = _turn(reader, 100)
        # two reads from the wire, then the turn ends: what it holds waits for the next callback
        assert wire.READ_BYTES < first <= 2 * wire.READ_BYTES
        total, turns = first, 1
        while total < sent:
            total += _turn(reader, 100)
            turns += 1
        assert total == sent
        assert turns >= sent // (2 * wire.READ_BYTES)
        with pytest.raises(BlockingIOError):
            reader.recv(1)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    chunks=st.lists(st.integers(1, 700), min_size=1, max_size=20),
    reads=st.lists(st.integers(1, 300), min_size=1, max_size=50),
)
def test_any_reads_of_any_writes_give_back_the_same_bytes(
    data: bytes, chunks: list[int], reads: list[int]
) -> None:
    reader, writer = pair()
    with reader, writer:
        at = 0
        for size in chunks:
            writer.sendall(data[at : at + size])
            at += size
        writer.sendall(data[at:])
        writer.close()
        got = bytearray()
        i = 0
        while (piece := reader.recv(reads[i % len(reads)])) != b"":
            assert len(piece) <= reads[i % len(reads)]
            got += piece
            i += 1
        assert bytes(got) == data


def out(command: int, body: bytes, qos: int = 1, pos: int = 0) -> dict[str, Any]:
    packet = bytes([command, len(body)]) + body
    return {"command": command, "mid": 1, "qos": qos, "pos": pos, "to_process": len(packet) - pos,
            "packet": packet, "info": None}  # fmt: skip


def test_the_whole_packets_at_the_head_are_joined_into_one_write() -> None:
    pubacks = [out(0x40, bytes([0, i])) for i in range(1, 4)]
    qos1 = out(0x32, b"\x00\x01t\x00\x07report")
    queue = deque([*pubacks, qos1])
    assert wire.join_head(queue) == 4
    assert len(queue) == 1
    assert queue[0]["packet"] == b"".join(p["packet"] for p in [*pubacks, qos1])
    assert queue[0]["to_process"] == len(queue[0]["packet"])


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(out(0x30, b"\x00\x01tqos0", qos=0), id="QoS 0 PUBLISH: on_publish fires once written"),
        pytest.param(out(0xE0, b""), id="DISCONNECT: paho closes the socket once written"),
    ],
)
def test_a_packet_paho_acts_on_once_written_stays_itself(stop: dict[str, Any]) -> None:
    first, after = out(0x40, b"\x00\x01"), out(0x40, b"\x00\x02")
    queue = deque([first, out(0x40, b"\x00\x03"), stop, after])
    assert wire.join_head(queue) == 2
    assert [p["packet"] for p in queue][1:] == [stop["packet"], after["packet"]]
    queue = deque([stop, first, after])
    assert wire.join_head(queue) == 0
    assert list(queue) == [stop, first, after]


def test_a_half_written_head_and_the_size_limit_are_respected() -> None:
    half = out(0x40, b"\x00\x01", pos=2)
    queue = deque([half, out(0x40, b"\x00\x02")])
    assert wire.join_head(queue) == 0
    big = [out(0x32, b"x" * 120) for _ in range(wire.MAX_JOINED_BYTES // 100)]
    queue = deque(big)
    joined = wire.join_head(queue)
    assert 2 <= joined < len(big)
    assert queue[0]["to_process"] <= wire.MAX_JOINED_BYTES
    assert b"".join(p["packet"] for p in queue) == b"".join(p["packet"] for p in big)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_burst_read_at_once_is_handled_whole_and_acknowledged(
    mosquitto: Mosquitto, protocol: str
) -> None:
    """500 QoS 1 messages arrive in a few segments and then nothing: the last ones must not wait in
    the buffer for bytes that never come, and their PUBACKs must go out (the broker sends no more
    than its in-flight window without them)."""
    topic = f"ebcd-test/{uuid.uuid4().hex}"
    heard: list[bytes] = []
    link = MqttLink(
        host=mosquitto.host,
        port=mosquitto.port,
        client_id=f"burst-{uuid.uuid4().hex[:8]}",
        subscriptions=[topic],
        on_message=lambda _t, payload, _r, _p: heard.append(payload),
        protocol=protocol,
    )
    task = asyncio.create_task(link.run())
    try:
        await wait_for(link.connected.is_set, 10)
        assert link._client is not None
        assert type(link._client._client._sock) is wire.BufferedSocket
        sent = [f"report {i}".encode() for i in range(500)]
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, max_inflight_messages=500) as c:
            await asyncio.gather(*(c.publish(topic, p, qos=1) for p in sent))
            await wait_for(lambda: len(heard) == len(sent), 10)
        assert heard == sent
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
