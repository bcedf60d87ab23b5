"""The daemon: one TaskGroup that runs the MQTT link, the engine, ingest and the control socket.

`Daemon` owns the life cycle, the MQTT wiring, the journal's ticks, recovery and the liveness sweep;
it composes `Admission` (how a request becomes an alert), `ControlHandler` (the control socket's
answers) and `Scheduler` (the scheduled test broadcasts).

Shutdown (SIGTERM/SIGINT): stop taking alerts, flush alert states and the journal, publish the
offline status, then cancel the group; a second signal or the grace period ends it harder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import start_http_server

from ebcd import __version__
from ebcd.admission.admission import Admission, alert_doc
from ebcd.admission.authority import DISTRICT_WIDE, OperatorAuthority, Scope, UpstreamAuthority
from ebcd.admission.scheduler import Scheduler
from ebcd.alert_run import AlertRun, AlertState, RetryPolicy
from ebcd.config import Config, parse_broker_url
from ebcd.control.handler import ControlHandler
from ebcd.control.socket import SOCKET_NAME, serve
from ebcd.delivery import Backoff, Delivery, DState
from ebcd.engine import Engine
from ebcd.ingest import IngestError, Reason
from ebcd.journal.journal import Journal, JournalError, NullJournal
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest
from ebcd.protocols.mqtt import codec as mqtt_codec
from ebcd.protocols.mqtt.codec import CodecError, Topics
from ebcd.protocols.mqtt.link import LinkState, MqttLink, Will, response_properties, response_target
from ebcd.protocols.serial.bus import SerialBusMaster
from ebcd.security.bench import BENCH, signer_from
from ebcd.security.mqtt_auth import read_secret, tls_context
from ebcd.tiers.district import District
from ebcd.transport import MqttTransport, SerialTransport

log = structlog.get_logger("ebcd.daemon")

SHUTDOWN_GRACE_S = 10.0
JOURNAL_TICK_S = 0.05  # delivery transitions reach the journal in one transaction per tick
LIVENESS_SWEEP_S = 5.0


class _Shutdown(Exception):
    """Raised inside the TaskGroup to end it after a graceful stop."""


class Daemon:
    """ebcd's running state: config, district, links, engine, journal."""

    def __init__(
        self,
        config: Config,
        district: District,
        *,
        state_dir: Path,
        broker: str | None = None,
        metrics_port: int | None = None,
        journal: bool = True,
    ) -> None:
        self.config = config
        self.district = district
        self.state_dir = state_dir
        self.broker = broker or config.mqtt.broker
        self.metrics_port = config.daemon.metrics_port if metrics_port is None else metrics_port
        self.journal_enabled = journal
        self.topics = Topics(district.code)
        self.metrics = Metrics()
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.bound_metrics_port: int | None = None
        self._ingest: asyncio.Queue[tuple[str, bytes, Any]] = asyncio.Queue(config.mqtt.ingest_queue_size)
        self._journal: Journal | None = None
        self._docs_dirty: dict[str, dict[str, Any]] = {}
        self._transitions: list[tuple[str, str, str, str | None, float]] = []
        host, port, tls = parse_broker_url(self.broker)
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self.link = MqttLink(
            host=host,
            port=port,
            tls=tls,
            tls_context=_tls_context(config, tls),
            client_id=config.mqtt.client_id or f"ebcd-{district.code}-{digest}",
            username=config.mqtt.username,
            password=_read_secret(config.mqtt.password_file, config.base_dir),
            keepalive_s=config.mqtt.keepalive_s,
            clean_session=False,
            protocol=config.mqtt.protocol,
            subscriptions=[self.topics.alerts_in, self.topics.all_reports, self.topics.all_presence],
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=lambda: Will(self.topics.status, self._status_doc("offline"), retain=True),
            reconnect_initial_s=config.mqtt.reconnect_initial_s,
            reconnect_max_s=config.mqtt.reconnect_max_s,
            publish_workers=config.mqtt.publish_concurrency,
            queue_size=config.mqtt.outgoing_queue_size,
            on_drop=lambda why: self.metrics.dropped.labels("mqtt_outgoing").inc(),
            on_state=self._on_link_state,
        )
        dc = config.delivery
        sec = config.security
        signer = None if sec.scheme == "none" else signer_from(sec.private_key, sec.scheme, config.base_dir)
        if signer is None:
            log.warning("security.unsigned_commands", hint="terminals that check signatures will refuse them")
        elif sec.private_key == BENCH:
            log.warning(
                "security.bench_key",
                scheme=sec.scheme,
                hint="the published test-bench key: generate your own with ebcd keys generate",
            )
        self.upstream = UpstreamAuthority(config, district)
        self.operators = OperatorAuthority(config, district)
        self.serial_masters = self._serial_masters()
        self.serial = SerialTransport(self.serial_masters, self.metrics)
        self.engine = Engine(
            district=district,
            policy=RetryPolicy(
                dc.ack_timeout_s,
                dc.max_attempts,
                Backoff(dc.retry_initial_s, dc.retry_max_s, dc.retry_jitter),
            ),
            transports={
                "mqtt": MqttTransport(
                    district, self.topics, self.link, self.metrics, groups=config.mqtt.group_topics
                ),
                "serial": self.serial,
            },
            metrics=self.metrics,
            publish_state=self._publish_state,
            record_transition=self._record_transition,
            state_interval_s=dc.state_publish_interval_s,
            priority_order=tuple(config.priority.order),
            preempted_policy=config.priority.preempted,
            signer=signer,
        )
        self.admission = Admission(
            config=config,
            district=district,
            engine=self.engine,
            upstream=self.upstream,
            metrics=self.metrics,
            journal=lambda: self.journal,
        )
        self.scheduler = Scheduler(
            config=config, engine=self.engine, admission=self.admission, metrics=self.metrics
        )
        self.control = ControlHandler(
            district=district,
            engine=self.engine,
            admission=self.admission,
            operators=self.operators,
            journal=lambda: self.journal,
            stopping=self.stopping,
            test_outcomes=self.scheduler.outcomes,
        )

    @property
    def journal(self) -> Journal:
        """The open journal (from the start of `run()`)."""
        assert self._journal is not None  # noqa: S101
        return self._journal

    async def submit(
        self, request: AlertRequest, *, source: str, actor: str, scope: Scope = DISTRICT_WIDE
    ) -> AlertRun:
        """Accept an alert (or an update or cancel of one) durably, or raise IngestError."""
        return await self.admission.submit(request, source=source, actor=actor, scope=scope)

    def _serial_masters(self) -> dict[str, SerialBusMaster]:
        sc = self.config.serial
        masters = {}
        for village in self.district.villages():
            if village.link != "serial" or village.port is None:
                continue
            masters[village.code] = SerialBusMaster(
                village.port,
                source=village.code,
                terminals={t.code: t.bus_address or 0 for t in village.terminals},
                on_report=lambda r: self.engine.on_report(r),
                on_presence=lambda p: self.engine.on_presence(p),
                baudrate=sc.baudrate,
                parity=sc.parity,
                response_timeout_s=sc.response_timeout_s,
                attempts=sc.attempts,
                inter_frame_gap_s=sc.inter_frame_gap_s,
                echo_suppression=sc.echo_suppression,
                poll_interval_s=sc.poll_interval_s,
            )
        return masters

    # -- life cycle ------------------------------------------------------------------------
    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until `stop()` or a signal, then shut down gracefully."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        on_commit = lambda latency_s, rows: self.metrics.journal_latency.observe(latency_s)  # noqa: E731
        if self.journal_enabled:
            self._journal = await Journal.open(self.state_dir / "journal.sqlite3", on_commit=on_commit)
        else:
            self._journal = await NullJournal.open()
        await self._recover()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        server = await serve(
            self.state_dir / SOCKET_NAME, self.control.handle, self.config.daemon.socket_mode
        )
        http = None
        if self.metrics_port >= 0:
            http, _ = start_http_server(
                self.metrics_port, self.config.daemon.metrics_host, self.metrics.registry
            )
            self.bound_metrics_port = int(http.server_port)
        log.info(
            "daemon.started",
            version=__version__,
            district=self.district.code,
            terminals=len(self.district),
            broker=self.broker,
            state_dir=str(self.state_dir),
            metrics_port=self.bound_metrics_port,
        )
        if self.upstream.open:
            log.warning(
                "upstream.open",
                hint="no [[upstream.senders]] listed: any sender that may publish to "
                f"{self.topics.alerts_in} may alert the whole district",
            )
        if self.operators.open:
            log.info(
                "operators.open", hint="no [[operators]] listed: the control socket acts for the district"
            )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="mqtt-link")
                tg.create_task(self.engine.run_timers(), name="engine-timers")
                tg.create_task(self.engine.run_publisher(), name="state-publisher")
                tg.create_task(self._ingest_loop(), name="ingest")
                tg.create_task(self._liveness_loop(), name="liveness")
                tg.create_task(self._save_docs_loop(), name="journal-docs")
                tg.create_task(self.scheduler.run(), name="test-broadcasts")
                tg.create_task(self._stopper(server), name="stopper")
                for room, master in self.serial_masters.items():
                    tg.create_task(master.run(), name=f"serial-bus-{room}")
                self.ready.set()
                if on_ready:
                    on_ready()
        except* _Shutdown:
            pass
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            server.close()
            if http is not None:
                http.shutdown()
            await self._journal.close()
            log.info("daemon.stopped")

    def stop(self) -> None:
        """Ask the daemon to stop (signal-safe)."""
        self.stopping.set()

    async def _stopper(self, server: asyncio.Server) -> None:
        await self.stopping.wait()
        log.info("daemon.stopping")
        server.close()
        self.engine.flush_states()
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE_S):
                await self._flush_outgoing()
                await self.serial.close()
                await self._save_docs()
                if self._journal:
                    await self._journal.flush()
                await self.link.publish(self.topics.status, self._status_doc("offline"), retain=True)
        except TimeoutError:
            log.warning("daemon.shutdown_grace_exceeded", grace_s=SHUTDOWN_GRACE_S)
        raise _Shutdown

    async def _save_docs_loop(self) -> None:
        while True:
            await asyncio.sleep(JOURNAL_TICK_S)
            await self._save_docs()

    async def _save_docs(self) -> None:
        journal = self.journal
        transitions, self._transitions = self._transitions, []
        for alert_id, terminal, state, detail, at in transitions:
            journal.record_transition(alert_id, terminal, state, detail, at, attempt=state == "sent")
        docs, self._docs_dirty = self._docs_dirty, {}
        for alert_id, doc in docs.items():
            try:
                await journal.save_alert(alert_id, doc)
            except JournalError as e:
                log.error("journal.save_failed", alert_id=alert_id, error=str(e))

    async def _flush_outgoing(self) -> None:
        if self.link.connected.is_set():
            await self.link.drain()

    # -- recovery --------------------------------------------------------------------------
    async def _recover(self) -> None:
        journal = self.journal
        alerts = await journal.list_alerts(10_000)
        self.admission.remember(alerts)
        self.engine.resume_seq(max([0, *(int(alert.get("last_seq", 0)) for alert in alerts)]))
        now_wall = time.time()
        for active in await journal.load_active():
            doc = active.doc
            request = AlertRequest.model_validate(doc["request"])
            remaining = float(doc["expires_at"]) - now_wall
            deliveries = {}
            for code, journalled in active.deliveries.items():
                d = Delivery(code)
                if journalled.state == DState.ACKNOWLEDGED.value:
                    d.state = DState.ACKNOWLEDGED
                    d.acked_at = 0.0
                deliveries[code] = d
            run = self.engine.accept(
                request,
                [],
                alert_id=doc["id"],
                ebmid=doc["ebmid"],
                deliveries=deliveries,
                expires_in_s=max(0.0, remaining),
                accepted_at=doc["accepted_at"],
                revision=doc.get("revision", 1),
                hold=doc.get("state") == AlertState.PENDING_APPROVAL.value,
            )
            log.info(
                "alert.recovered",
                alert_id=run.id,
                acked=run.counts["acked"],
                targets=len(deliveries),
                remaining_s=round(remaining, 1),
            )

    # -- MQTT ------------------------------------------------------------------------------
    def _status_doc(self, state: str) -> bytes:
        return json.dumps(
            {"state": state, "version": __version__, "district": self.district.code, "at": time.time()}
        ).encode()

    async def _on_connect(self) -> None:
        self.metrics.mqtt_connects.inc()
        await self.link.publish(self.topics.status, self._status_doc("online"), retain=True)
        self.engine.republish_all()

    def _on_link_state(self, state: LinkState) -> None:
        self.metrics.mqtt_connected.set(1 if state is LinkState.CONNECTED else 0)

    def _on_message(self, topic: str, payload: bytes, retain: bool, properties: Any) -> None:
        if topic == self.topics.alerts_in:
            try:
                self._ingest.put_nowait((topic, payload, properties))
            except asyncio.QueueFull:
                self.metrics.dropped.labels("ingest_queue").inc()
                self._reject(
                    payload,
                    IngestError(Reason.UNSUPPORTED, "ingest queue full: ebcd is overloaded, send again"),
                    properties,
                )
            return
        terminal = self.topics.terminal_of(topic)
        if terminal is None:
            self.metrics.unexpected.labels("topic").inc()
            return
        known = self.district.terminal(terminal)
        if known is None or known.link != "mqtt":  # only IP/4G terminals speak for themselves over MQTT
            self.metrics.unexpected.labels("not_an_mqtt_terminal").inc()
            log.warning("terminal.not_on_mqtt", terminal=terminal, topic=topic)
            return
        try:
            if topic.endswith("/report"):
                self.engine.on_report(mqtt_codec.decode_report(terminal, payload))
            elif topic.endswith("/presence"):
                self.engine.on_presence(mqtt_codec.decode_presence(terminal, payload))
        except CodecError as e:
            self.metrics.unexpected.labels("malformed").inc()
            log.warning("terminal.malformed_message", terminal=terminal, topic=topic, error=str(e))

    def _publish_state(self, run: AlertRun, doc: dict[str, Any]) -> None:
        self.link.enqueue(
            self.topics.alert_state(run.id), json.dumps(doc, ensure_ascii=False).encode(), retain=True
        )
        self._docs_dirty[run.id] = alert_doc(run, self.engine.last_seq)

    def _record_transition(
        self, alert_id: str, terminal: str, state: str, detail: str | None, at: float
    ) -> None:
        # Buffered and handed to the journal every JOURNAL_TICK_S: a transaction per tick, not per ack.
        # A crash loses at most one tick of transitions; those deliveries are re-sent on recovery
        # and the terminals' de-duplication keeps them from playing twice.
        self._transitions.append((alert_id, terminal, state, detail, time.time()))

    def _reject(self, payload: bytes, err: IngestError, properties: Any = None) -> None:
        self.metrics.rejected.labels(err.reason.value).inc()
        doc = {
            "reason": err.reason.value,
            "detail": err.detail,
            "identifier": err.identifier,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        self.link.enqueue(self.topics.rejected, json.dumps(doc, ensure_ascii=False).encode())
        self._respond(properties, {"status": "rejected", **doc})
        log.warning("ingest.rejected", reason=err.reason.value, detail=err.detail, identifier=err.identifier)

    def _respond(self, properties: Any, doc: dict[str, Any]) -> None:
        """Answer an MQTT 5 request on its response topic, with its correlation data."""
        target = response_target(properties)
        if target is None:
            return
        topic, correlation = target
        if not topic.startswith(self.topics.replies) or len(topic) == len(self.topics.replies):
            # never let a sender make ebcd publish elsewhere (a command topic, an alert state)
            self.metrics.unexpected.labels("response_topic").inc()
            log.warning("ingest.response_topic_refused", topic=topic[:200], allowed=self.topics.replies)
            return
        self.link.enqueue(
            topic,
            json.dumps(doc, ensure_ascii=False).encode(),
            properties=response_properties(correlation),
        )

    # -- ingest ----------------------------------------------------------------------------
    async def _ingest_loop(self) -> None:
        while True:
            topic, payload, props = await self._ingest.get()
            self.metrics.queue_depth.labels("ingest").set(self._ingest.qsize())
            await self._ingest_one(topic, payload, props)

    async def _ingest_one(self, topic: str, payload: bytes, properties: Any = None) -> None:
        journal = self.journal
        try:
            row = await journal.record_received(topic, payload, time.time(), source="mqtt")
        except JournalError as e:
            err = IngestError(Reason.JOURNAL, f"could not journal the message: {e}")
            self._reject(payload, err, properties)
            return
        try:
            request = self.admission.parse_upstream(payload)
            scope = self.upstream.scope(request)
            run = await self.admission.submit(
                request, source="mqtt", actor=request.sender or "upstream", scope=scope
            )
        except IngestError as e:
            self._reject(payload, e, properties)
            await journal.mark_received(
                row, outcome="rejected", detail=f"{e.reason.value}: {e.detail}", alert_id=None
            )
            return
        await journal.mark_received(row, outcome="accepted", detail=request.msg_type.value, alert_id=run.id)
        self._respond(
            properties,
            {
                "status": "accepted",
                "msg_type": request.msg_type.value,
                "id": run.id,
                "identifier": request.identifier,
                "state": run.state.value,
                "state_topic": self.topics.alert_state(run.id),
            },
        )

    # -- liveness --------------------------------------------------------------------------
    async def _liveness_loop(self) -> None:
        silent_after_s = 3 * self.config.simulator.heartbeat_interval_s + 5
        while True:
            await asyncio.sleep(LIVENESS_SWEEP_S)
            now = self.engine.clock()
            for code, live in self.engine.liveness.items():
                if live.state == "online" and now - live.last_seen > silent_after_s:
                    live.state = "unknown"
                    log.info("terminal.silent", terminal=code, silent_s=round(now - live.last_seen))
            for room, master in self.serial_masters.items():
                village = self.district.village(room)
                if not master.connected and village is not None:
                    self.engine.mark_unknown([t.code for t in village.terminals])
            self.metrics.serial_link.set(sum(1 for m in self.serial_masters.values() if m.connected))
            per_town: dict[tuple[str, str], int] = {}
            for term in self.district.terminals():
                key = (term.town, self.engine.liveness[term.code].state)
                per_town[key] = per_town.get(key, 0) + 1
            for town in self.district.towns:
                for state in ("unknown", "online", "offline"):
                    self.metrics.town_terminals.labels(town, state).set(per_town.get((town, state), 0))
            counts = self.engine.liveness_counts()
            for state, n in counts.items():
                self.metrics.terminals.labels(state).set(n)
            self.metrics.queue_depth.labels("mqtt_outgoing").set(self.link.queue_depth)


def _read_secret(path: str | None, base: Path) -> str | None:
    # MqttAuthError (naming the key and the file) if it cannot be read or is open to others
    return read_secret(path, base=base, key="[mqtt] password_file")


def _tls_context(config: Config, tls: bool) -> ssl.SSLContext | None:
    """The TLS context of an mqtts:// broker from [mqtt] ca_file, cert_file, key_file."""
    m = config.mqtt
    if not tls:
        if m.ca_file or m.cert_file or m.key_file:
            log.warning(
                "mqtt.tls_files_unused", hint="ca_file, cert_file and key_file apply to mqtts:// only"
            )
        return None
    return tls_context(
        base=config.base_dir, section="[mqtt]", ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file
    )
