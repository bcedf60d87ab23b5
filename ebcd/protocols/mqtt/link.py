"""The MQTT link: the only module that imports aiomqtt.

One `MqttLink` owns one client connection. It reconnects with capped, jittered backoff and
re-subscribes on every connect, hands every received message to a synchronous callback (which
must be quick: decode and note, never block), and sends through a bounded outgoing queue served
by a fixed number of workers. Every message it cannot carry is logged and counted; none is
dropped quietly.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ebcd.protocols.mqtt import properties as fast_properties
from ebcd.protocols.mqtt import wire

log = structlog.get_logger("ebcd.mqtt")
_FAST_PROPERTIES: bool | None = None  # installed once per process, on the first MQTT 5 link
_WIRE_UNAVAILABLE_SAID = False  # said once per process, not once per connection

DISCONNECT_TIMEOUT_S = 2.0
KEPT_SUBACK_TIMEOUT_S = 600.0  # a kept session's SUBACK comes after its backlog (see _serve)
SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5: keep a persistent session as MQTT 3.1.1 does

Protocol = Literal["auto", "5", "3.1.1"]


class LinkState(IntEnum):
    """Connection state, also exported as a gauge."""

    DISCONNECTED = 0
    CONNECTING = 1
    CONNECTED = 2


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes if the connection dies."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message waiting to be published."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    properties: Properties | None = None  # MQTT 5 only (e.g. correlation data); dropped on 3.1.1


def response_properties(correlation_data: bytes | None) -> Properties | None:
    """PUBLISH properties for an MQTT 5 response: the requester's correlation data, if any."""
    if correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation_data
    return props


def response_target(properties: Any) -> tuple[str, bytes | None] | None:
    """The MQTT 5 response topic and correlation data of a received message, if it asked for one."""
    topic = getattr(properties, "ResponseTopic", None)
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        return None
    data = getattr(properties, "CorrelationData", None)
    return topic, bytes(data) if isinstance(data, bytes | bytearray) else None


MessageHandler = Callable[[str, bytes, bool, Any], None]  # topic, payload, retain, properties
Ack = Callable[[], None]
# topic, payload, retain, properties, ack: the broker is told the message arrived only by ack()
HeldMessageHandler = Callable[[str, bytes, bool, Any, Ack], None]


class MqttLink:
    """A reconnecting MQTT client with a bounded, counted outgoing queue."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        subscriptions: Sequence[str] = (),
        on_message: MessageHandler | None = None,
        held_topics: Sequence[str] = (),
        on_held_message: HeldMessageHandler | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        will: Callable[[], Will | None] | None = None,
        tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        clean_session: bool = True,
        protocol: Protocol = "3.1.1",
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        publish_workers: int = 16,
        queue_size: int = 10_000,
        on_drop: Callable[[str], None] | None = None,
        on_state: Callable[[LinkState], None] | None = None,
        quiet: bool = False,
        source_address: str = "",
    ) -> None:
        self._host, self._port, self._client_id = host, port, client_id
        self._source_address = source_address  # "": whatever the system picks
        self._subscriptions = list(subscriptions)
        self._session_present = False  # the last CONNACK's: the broker kept our session
        self._on_message = on_message
        # messages on these topics are acknowledged (PUBACK) only when their handler calls ack(),
        # so that a broker redelivers what was never kept; every other message after its handler
        self._held = frozenset(held_topics)
        self._on_held = on_held_message
        self._on_connect = on_connect
        self._will = will
        self._tls, self._username, self._password = tls, username, password
        # with tls: the context to verify the broker with (ebcd.security.mqtt_auth.tls_context),
        # else the system's CA store; hostname checking is the context's (on by default)
        self._tls_context = tls_context
        self._keepalive_s, self._clean_session = keepalive_s, clean_session
        self._protocol: Protocol = protocol
        self._v5 = protocol in ("auto", "5")  # "auto" starts with MQTT 5, falls back on refusal
        self._reconnect = (reconnect_initial_s, reconnect_max_s)
        self._workers = publish_workers
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=queue_size)
        self._on_drop = on_drop
        self._on_state = on_state
        self._quiet = quiet
        self._client: aiomqtt.Client | None = None
        self.state = LinkState.DISCONNECTED
        self.connected = asyncio.Event()
        self.connects = 0
        self.dropped = 0
        self._log = log.bind(client_id=client_id)
        if self._v5:
            _install_fast_properties()

    # -- publishing ------------------------------------------------------------------------
    @property
    def speaks_v5(self) -> bool:
        """Whether the connection (or the next attempt) uses MQTT 5."""
        return self._v5

    def enqueue(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> bool:
        """Queue a message for the publisher workers; False (logged, counted) if the queue is full."""
        try:
            self._queue.put_nowait(Outgoing(topic, payload, qos, retain, properties))
        except asyncio.QueueFull:
            self._drop("outgoing queue full", topic)
            return False
        return True

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout_s: float = 5.0
    ) -> bool:
        """Publish now if connected and wait for the broker; False if it could not be done."""
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout_s)
        except aiomqtt.MqttError as e:
            self._log.warning("mqtt.publish_failed", topic=topic, error=str(e))
            return False
        return True

    async def drain(self) -> None:
        """Return when every queued message has been published (or dropped and counted)."""
        await self._queue.join()

    @property
    def queue_depth(self) -> int:
        """Messages waiting to be published."""
        return self._queue.qsize()

    def _drop(self, why: str, topic: str) -> None:
        self.dropped += 1
        self._log.warning("mqtt.dropped", reason=why, topic=topic)
        if self._on_drop:
            self._on_drop(why)

    # -- the connection --------------------------------------------------------------------
    def _set_state(self, state: LinkState) -> None:
        self.state = state
        if state is LinkState.CONNECTED:
            self.connected.set()
        else:
            self.connected.clear()
        if self._on_state:
            self._on_state(state)

    def _make_client(self) -> aiomqtt.Client:
        will = self._will() if self._will else None
        tls_context = (self._tls_context or ssl.create_default_context()) if self._tls else None
        if self._v5:
            # MQTT 5 has no clean-session flag: a persistent session is clean_start=False plus
            # a session expiry interval (0, the default, would end the session at disconnect)
            connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if not self._clean_session:
                connect.SessionExpiryInterval = SESSION_NEVER_EXPIRES
            session: dict[str, Any] = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": self._clean_session,
                "properties": connect,
            }
        else:
            session = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": self._clean_session}
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            username=self._username,
            password=self._password,
            keepalive=self._keepalive_s,
            **session,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain) if will else None,
            tls_context=tls_context,
            max_inflight_messages=max(20, self._workers),
            timeout=10,
            bind_address=self._source_address,
        )
        self._hand_over_directly(client)
        if not self._tls and not wire.install(client._client):
            _say_wire_unavailable()
        self._session_present = False
        hear_connack = client._client.on_connect  # aiomqtt's

        def on_connect(c: Any, userdata: Any, flags: Any, *rest: Any) -> None:
            self._session_present = bool(getattr(flags, "session_present", False))
            if hear_connack is not None:
                hear_connack(c, userdata, flags, *rest)

        client._client.on_connect = on_connect
        return client

    async def run(self) -> None:
        """Connect, serve and reconnect until cancelled."""
        rng = random.Random()
        failures = 0
        while True:
            self._set_state(LinkState.CONNECTING)
            client = self._make_client()
            try:
                try:
                    await client.__aenter__()
                except aiomqtt.MqttError:
                    _abandon(client)
                    raise
                # our workers bound the publishes in flight; aiomqtt's warning threshold follows them
                client.pending_calls_threshold = self._workers + 10
                self._client = client
                failures = 0
                self.connects += 1
                try:
                    _honour_cancel()  # one that landed as the CONNACK arrived
                    await self._serve(client)
                finally:
                    self._client = None
                    await self._disconnect(client)
            except aiomqtt.MqttError as e:
                _stay_cancelled(e)
                if self._protocol == "auto" and self.connects == 0 and _handshake_failed(e):
                    # a broker that refuses MQTT 5 or never answers its CONNECT: try the other
                    # version next; the first that connects is kept for the life of the process
                    self._v5 = not self._v5
                    self._log.warning("mqtt.protocol_switch", to="5" if self._v5 else "3.1.1", reason=str(e))
                    if not self._v5:
                        continue
                failures += 1
                delay = min(self._reconnect[1], self._reconnect[0] * 2 ** min(failures - 1, 16))
                delay *= rng.uniform(0.5, 1.0)
                if not self._quiet or failures == 1:
                    self._log.warning("mqtt.disconnected", error=str(e), retry_in_s=round(delay, 2))
                self._set_state(LinkState.DISCONNECTED)
                await asyncio.sleep(delay)
            finally:
                if self.state is not LinkState.DISCONNECTED:
                    self._set_state(LinkState.DISCONNECTED)

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        """Leave the broker politely, but never wait for it longer than DISCONNECT_TIMEOUT_S."""
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), DISCONNECT_TIMEOUT_S)
        except (TimeoutError, aiomqtt.MqttError) as e:
            self._log.info("mqtt.disconnect_forced", error=str(e) or type(e).__name__)
            sock = client._client.socket()
            if sock is not None:
                sock.close()

    async def _serve(self, client: aiomqtt.Client) -> None:
        # Not a TaskGroup: a lost connection must surface here as a plain MqttError for run().
        workers: list[asyncio.Task[None]] = []
        try:
            topics = [(topic, 1) for topic in self._subscriptions]  # one SUBSCRIBE for all
            if self._session_present and not self._clean_session:
                # the broker kept our session, subscriptions included: what was queued while
                # disconnected (the re-sends after a restart) goes out now, beside the messages
                # the broker kept for us, not after them and the SUBACK behind them. The
                # subscriptions are refreshed (a topic added since) without waiting: the SUBACK
                # comes after the whole backlog, which at 30,000 terminals took longer to read
                # than any timeout, and a timeout here would drop the connection and start over
                workers = self._start_publishers(client)
                if topics:
                    workers.append(asyncio.create_task(self._refresh(client, topics), name="mqtt-subscribe"))
            elif topics:
                await client.subscribe(topics)
                _honour_cancel()  # one that landed as the SUBACK arrived
            self._set_state(LinkState.CONNECTED)
            if not self._quiet:
                self._log.info("mqtt.connected", broker=f"{self._host}:{self._port}", connects=self.connects)
            # publishing starts before the round trips of `on_connect`
            workers = workers or self._start_publishers(client)
            if self._on_connect:
                await self._on_connect()
            await self._receive(client)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _refresh(self, client: aiomqtt.Client, topics: list[tuple[str, int]]) -> None:
        try:
            await client.subscribe(topics, timeout=KEPT_SUBACK_TIMEOUT_S)
        except aiomqtt.MqttError as e:
            _stay_cancelled(e)
            self._log.warning(
                "mqtt.resubscribe_failed",
                error=str(e),
                hint="the subscriptions the broker kept still deliver; a topic added since may not",
            )

    def _start_publishers(self, client: aiomqtt.Client) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._publisher(client), name=f"mqtt-pub-{i}") for i in range(self._workers)
        ]

    async def _receive(self, client: aiomqtt.Client) -> None:
        """The held messages, in order, through aiomqtt's queue (the others never reach it)."""
        on_held = self._on_held
        async for message in client.messages:
            if on_held is None:
                continue
            payload = message.payload
            if isinstance(payload, str):
                data = payload.encode()
            elif isinstance(payload, bytes | bytearray):
                data = bytes(payload)
            else:
                data = b"" if payload is None else str(payload).encode()
            ack = functools.partial(_ack, client._client, message.mid, message.qos)
            on_held(message.topic.value, data, message.retain, message.properties, ack)

    def _hand_over_directly(self, client: aiomqtt.Client) -> None:
        """Every message not held goes to `on_message` from paho's callback, as it is read off the
        socket, not through aiomqtt's queue and its per-message objects: terminal reports are most
        of what the daemon reads, and nothing about handling them awaits. Held messages still go
        through the queue, and are acknowledged (PUBACK) only when their handler says so; the
        others are acknowledged as they are read, as paho would, not when our loop gets to them,
        else a busy loop would fill the broker's in-flight window with acknowledgements not yet
        sent, and it would stop sending."""
        paho = client._client
        held, on_held, handler = self._held, self._on_held, self._on_message
        manual = bool(held) and on_held is not None
        if manual:
            paho.manual_ack_set(True)
        queue_it = paho.on_message  # aiomqtt's: into client.messages
        log_ = self._log

        def on_message(c: Any, userdata: Any, message: Any) -> None:
            topic = message.topic
            if manual and topic in held:
                if queue_it is not None:
                    queue_it(c, userdata, message)
                return
            if manual and message.qos:
                c.ack(message.mid, message.qos)
            if handler is None:
                return
            try:
                handler(topic, message.payload, message.retain, message.properties)
            except Exception:  # a bug in a handler: never into paho's reader, which would stop
                log_.exception("mqtt.handler_failed", topic=topic)

        paho.on_message = on_message

    async def _publisher(self, client: aiomqtt.Client) -> None:
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():
                # aiomqtt awaits PUBACKs with asyncio.wait_for, which on Python 3.11 can swallow a
                # cancellation that lands as the PUBACK arrives; honour it here or never stop
                raise asyncio.CancelledError
            msg = await self._queue.get()
            try:
                await client.publish(
                    msg.topic,
                    msg.payload,
                    qos=msg.qos,
                    retain=msg.retain,
                    properties=msg.properties if self._v5 else None,
                    timeout=10,
                )
            except aiomqtt.MqttError as e:
                _stay_cancelled(e)
                self._drop(f"publish failed: {e}", msg.topic)
            finally:
                self._queue.task_done()


def _abandon(client: aiomqtt.Client) -> None:
    """Close a connection whose CONNECT failed: aiomqtt leaves its socket and housekeeping task
    behind when the broker never answers, one of each per attempt."""
    sock = client._client.socket()
    if sock is not None:
        client._client._sock_close()  # through paho, so aiomqtt's socket-closed hook runs
    task = client._misc_task
    if task is not None and not task.done():
        task.cancel()


def _handshake_failed(error: aiomqtt.MqttError) -> bool:
    """Whether the broker took the TCP connection but refused or never answered the CONNECT
    (as a broker that speaks only MQTT 3.1.1 may do with an MQTT 5 CONNECT)."""
    return isinstance(error, aiomqtt.MqttCodeError) or str(error) == "Operation timed out"


def _honour_cancel() -> None:
    """Raise CancelledError if the task is being cancelled: aiomqtt awaits CONNACKs and SUBACKs with
    asyncio.wait_for, which on Python 3.11 can swallow a cancellation that lands as the answer
    arrives; the link would then serve for ever (seen with thousands of links connecting at once)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _stay_cancelled(error: aiomqtt.MqttError) -> None:
    """Re-raise CancelledError if the task is being cancelled: aiomqtt reports a publish or a
    disconnect cut short by a cancellation as MqttError, which would otherwise swallow it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


def _ack(paho: Any, mid: int, qos: int) -> None:
    """PUBACK a held message (a no-op for QoS 0, and harmless once the connection is gone)."""
    if qos:
        paho.ack(mid, qos)


# -- a one-off probe of the broker's rules (ebcd.security.acl_probe) ---------------------------

# CONNACK reason codes that refuse a login: bad user name or password, not authorized, banned, bad
# authentication method (paho gives MQTT 3.1.1's return codes 4 and 5 as 0x86 and 0x87)
CONNACK_LOGIN_REFUSED = frozenset({0x86, 0x87, 0x8A, 0x8C})


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """What the broker did with one QoS 1 publish of a throwaway anonymous client."""

    protocol: Literal["5", "3.1.1"]
    login_refused: bool = False  # the CONNACK refused the anonymous login: nothing was published
    puback_reason: int | None = None  # MQTT 5: the PUBACK's reason code (>= 0x80: refused)
    echoed: bool = False  # the message came back on the client's own subscription to the topic
    detail: str = ""


async def probe_publish(
    host: str,
    port: int,
    *,
    topic: str,
    payload: bytes,
    tls_context: ssl.SSLContext | None = None,
    protocol: Literal["5", "3.1.1"] = "5",
    timeout_s: float = 5.0,
) -> ProbeAnswer:
    """Log in anonymously (clean session, random client id), subscribe to `topic`, publish `payload`
    on it at QoS 1, wait up to `timeout_s` for it to come back, leave; ConnectionError if the broker
    cannot be reached or does not complete the handshake (as a broker without MQTT 5 may not)."""
    session: dict[str, Any] = (
        {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": True}
        if protocol == "5"
        else {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": True}
    )
    client = aiomqtt.Client(
        host,
        port,
        identifier=f"ebcd-acl-probe-{random.getrandbits(48):012x}",
        keepalive=max(5, int(timeout_s) * 2),
        tls_context=tls_context,
        timeout=timeout_s,
        **session,
    )
    reasons: list[int] = []
    paho = client._client
    on_publish: Any = paho.on_publish  # aiomqtt's, which completes its publish()

    def note_puback(c: Any, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        reasons.append(reason.value)
        on_publish(c, userdata, mid, reason, properties)

    paho.on_publish = note_puback
    try:
        await client.__aenter__()
    except aiomqtt.MqttCodeError as e:
        _stay_cancelled(e)
        _abandon(client)
        if isinstance(e.rc, ReasonCode) and e.rc.value in CONNACK_LOGIN_REFUSED:
            return ProbeAnswer(protocol, login_refused=True, detail=f"anonymous login refused: {e}")
        raise ConnectionError(f"MQTT {protocol} CONNECT failed: {e}") from None
    except aiomqtt.MqttError as e:
        _stay_cancelled(e)
        _abandon(client)
        raise ConnectionError(f"MQTT {protocol}: {e}") from None
    try:
        await client.subscribe(topic, qos=1, timeout=timeout_s)
        await client.publish(topic, payload, qos=1, timeout=timeout_s)
        reason = reasons[0] if reasons and protocol == "5" else None
        if reason is not None and reason >= 0x80:
            return ProbeAnswer(protocol, puback_reason=reason, detail=f"PUBACK reason 0x{reason:02X}")
        echoed = False
        try:
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    if message.topic.value == topic and message.payload == payload:
                        echoed = True
                        break
        except TimeoutError:
            pass
        what = "came back" if echoed else f"did not come back within {timeout_s:g} s"
        return ProbeAnswer(protocol, puback_reason=reason, echoed=echoed, detail=f"the publish {what}")
    except aiomqtt.MqttError as e:  # e.g. a broker that closes the connection of a refused publish
        _stay_cancelled(e)
        return ProbeAnswer(protocol, detail=f"connection lost while probing: {e}")
    finally:
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), DISCONNECT_TIMEOUT_S)
        except (TimeoutError, aiomqtt.MqttError):
            _abandon(client)


def _say_wire_unavailable() -> None:
    global _WIRE_UNAVAILABLE_SAID  # said once per process
    if not _WIRE_UNAVAILABLE_SAID:
        _WIRE_UNAVAILABLE_SAID = True
        log.info("mqtt.buffered_socket_unavailable", hint="this paho version reads and writes as before")


def _install_fast_properties() -> None:
    global _FAST_PROPERTIES  # a process-wide patch of paho, made once
    if _FAST_PROPERTIES is None:
        _FAST_PROPERTIES = fast_properties.install()
        if not _FAST_PROPERTIES:
            log.info("mqtt.properties_fast_path_unavailable", hint="this paho version decodes as before")
