"""The daemon: one TaskGroup that runs the MQTT link, the engine, ingest and the control socket.

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
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import start_http_server

from ebcd import __version__
from ebcd.alert import AlertRequest, MsgType, Origin
from ebcd.alert_run import AlertRun, AlertState, RetryPolicy
from ebcd.authority import DISTRICT_WIDE, OperatorAuthority, Scope, UpstreamAuthority, as_room
from ebcd.codes import ebmid as make_ebmid
from ebcd.config import Config, parse_broker_url
from ebcd.control import SOCKET_NAME, ControlError, Peer, serve
from ebcd.delivery import Backoff, Delivery, DState
from ebcd.engine import Engine
from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap import parse_cap
from ebcd.ingest.json_alert import parse_json_alert
from ebcd.metrics import Metrics
from ebcd.protocols import mqtt_codec
from ebcd.protocols.mqtt_codec import CodecError, Topics
from ebcd.protocols.mqtt_link import LinkState, MqttLink, Will, response_properties, response_target
from ebcd.protocols.serial_link import SerialBusMaster
from ebcd.schedule import TestOutcome, due, previous_fire
from ebcd.security.bench import BENCH, signer_from
from ebcd.security.mqtt_auth import read_secret, tls_context
from ebcd.store import Journal, JournalError, NullJournal
from ebcd.tiers.district import District
from ebcd.tiers.rollup import Tally
from ebcd.tiers.terminal import Terminal
from ebcd.transport import MqttTransport, SerialTransport

log = structlog.get_logger("ebcd.daemon")

SHUTDOWN_GRACE_S = 10.0
TEST_SCHEDULE_TICK_S = 1.0
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
        self._seq: dict[str, int] = {}
        self._dedupe: dict[tuple[str, str], str] = {}
        self._docs_dirty: dict[str, dict[str, Any]] = {}
        self._transitions: list[tuple[str, str, str, str | None, float]] = []
        self.wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.test_outcomes: dict[str, TestOutcome] = {}
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
        server = await serve(self.state_dir / SOCKET_NAME, self._handle, self.config.daemon.socket_mode)
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
                tg.create_task(self._test_schedule_loop(), name="test-broadcasts")
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
        assert self._journal is not None  # noqa: S101
        transitions, self._transitions = self._transitions, []
        for alert_id, terminal, state, detail, at in transitions:
            self._journal.record_transition(alert_id, terminal, state, detail, at, attempt=state == "sent")
        docs, self._docs_dirty = self._docs_dirty, {}
        for alert_id, doc in docs.items():
            try:
                await self._journal.save_alert(alert_id, doc)
            except JournalError as e:
                log.error("journal.save_failed", alert_id=alert_id, error=str(e))

    async def _flush_outgoing(self) -> None:
        if self.link.connected.is_set():
            await self.link.drain()

    # -- recovery --------------------------------------------------------------------------
    async def _recover(self) -> None:
        assert self._journal is not None  # noqa: S101
        last_seq = 0
        for alert in await self._journal.list_alerts(10_000):
            day, _, seq = alert["id"].partition("-")
            if seq.isdigit():
                self._seq[day] = max(self._seq.get(day, 0), int(seq))
            last_seq = max(last_seq, int(alert.get("last_seq", 0)))
            req = alert.get("request", {})
            if req.get("sender") and req.get("identifier"):
                self._dedupe.setdefault((req["sender"], req["identifier"]), alert["id"])
        self.engine.resume_seq(last_seq)
        now_wall = time.time()
        for active in await self._journal.load_active():
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
        self._docs_dirty[run.id] = self._alert_doc(run)

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
        assert self._journal is not None  # noqa: S101
        try:
            row = await self._journal.record_received(topic, payload, time.time(), source="mqtt")
        except JournalError as e:
            err = IngestError(Reason.JOURNAL, f"could not journal the message: {e}")
            self._reject(payload, err, properties)
            return
        try:
            request = self.parse_upstream(payload)
            scope = self.upstream.scope(request)
            run = await self.submit(request, source="mqtt", actor=request.sender or "upstream", scope=scope)
        except IngestError as e:
            self._reject(payload, e, properties)
            await self._journal.mark_received(
                row, outcome="rejected", detail=f"{e.reason.value}: {e.detail}", alert_id=None
            )
            return
        await self._journal.mark_received(
            row, outcome="accepted", detail=request.msg_type.value, alert_id=run.id
        )
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

    def parse_upstream(self, payload: bytes) -> AlertRequest:
        """JSON alert or CAP 1.2 document -> AlertRequest, or IngestError. The sender is vouched
        for (listed, signature verified) as soon as it is known, before the content is judged."""
        if not _is_xml(payload):
            request = parse_json_alert(payload)
            self.upstream.vouch(request.sender, request.identifier, payload, is_cap=False)
            return request
        cap = parse_cap(
            payload,
            district_area=self.district.area,
            default_ttl_s=self.config.delivery.default_ttl_s,
            vouch=lambda m: self.upstream.vouch(m.sender, m.identifier, payload, is_cap=True),
        )
        # Updates and cancels are matched on (sender, identifier), as CAP's references name them.
        refs = [f"{r.sender},{r.identifier}" for r in cap.references]
        return cap.request.model_copy(update={"references": refs, "sender": cap.sender})

    async def submit(
        self, request: AlertRequest, *, source: str, actor: str, scope: Scope = DISTRICT_WIDE
    ) -> AlertRun:
        """Accept an alert (or an update or cancel of one) durably, or raise IngestError.

        `scope` is what the asking sender or operator may address; the alert's terminals (and,
        for an update or cancel, those of the alert it changes) must all lie within it."""
        key = (request.sender, request.identifier) if request.sender and request.identifier else None
        if key and key in self._dedupe:
            raise IngestError(
                Reason.DUPLICATE, f"already accepted as alert {self._dedupe[key]}", request.identifier
            )
        if request.msg_type is MsgType.CANCEL:
            run = await self._cancel_referenced(request, actor, scope, source)
        elif request.msg_type is MsgType.UPDATE:
            run = await self._update_referenced(request, scope, source)
        else:
            return await self._accept(request, source=source, actor=actor, key=key, scope=scope)
        if key:  # an update or cancel is itself a message that must not be applied twice
            self._dedupe[key] = run.id
            await self._save(run, key)
        return run

    async def _accept(
        self,
        request: AlertRequest,
        *,
        source: str,
        actor: str,
        key: tuple[str, str] | None,
        scope: Scope,
    ) -> AlertRun:
        terminals = self._resolve(request)
        scope.check(terminals, request.identifier, "alert")
        self._check_origin(request, terminals)
        alert_id, ebmid = self._next_id()
        hold = self.config.review.holds(request.level, request.sender, source)
        run = self.engine.accept(
            request, terminals, alert_id=alert_id, ebmid=ebmid, hold=True, accepted_at=time.time()
        )
        run.source, run.actor = source, actor
        try:
            await self._save(run, key)
        except IngestError:
            del self.engine.runs[alert_id]
            raise
        if key:
            self._dedupe[key] = alert_id
        if hold:
            log.info(
                "alert.awaiting_approval",
                alert_id=alert_id,
                level=request.level,
                sender=request.sender,
                source=source,
            )
        else:
            self.engine.approve(alert_id)
        self.metrics.alerts.labels(str(request.level), source).inc()
        return run

    def _resolve(self, request: AlertRequest) -> tuple[Terminal, ...]:
        resolution = self.district.resolve(request.targets)
        if resolution.unknown:
            raise IngestError(
                Reason.UNKNOWN_TARGET,
                f"target(s) not in the district: {', '.join(resolution.unknown)}",
                request.identifier,
            )
        if not resolution.terminals:
            raise IngestError(
                Reason.NO_TARGET_IN_DISTRICT,
                "the targets select no terminal of the district",
                request.identifier,
            )
        return resolution.terminals

    def _check_origin(self, request: AlertRequest, terminals: tuple[Terminal, ...]) -> None:
        """A town or village room may broadcast to its own area only."""
        room = request.origin_room
        if room is None:
            return
        if request.origin is Origin.TOWN and self.district.town(room) is not None:
            outside = [t.code for t in terminals if t.town != room]
        elif request.origin is Origin.VILLAGE and self.district.village(room) is not None:
            outside = [t.code for t in terminals if t.village != room]
        else:
            raise IngestError(
                Reason.NOT_ALLOWED,
                f"origin_room {room} is not a {request.origin.value} room",
                request.identifier,
            )
        if outside:
            raise IngestError(
                Reason.NOT_ALLOWED,
                f"a {request.origin.value} room may broadcast to its own area only; {len(outside)} target "
                f"terminal(s) lie outside {room}, e.g. {outside[0]}",
                request.identifier,
            )

    async def _save(self, run: AlertRun, key: tuple[str, str] | None) -> None:
        assert self._journal is not None  # noqa: S101
        try:
            await self._journal.save_alert(run.id, self._alert_doc(run), dedupe_key=key)
        except JournalError as e:
            raise IngestError(
                Reason.JOURNAL, f"could not journal the alert: {e}", run.request.identifier
            ) from None

    async def _update_referenced(self, request: AlertRequest, scope: Scope, source: str) -> AlertRun:
        run = self._referenced(request, scope, source)
        old = run.request
        merged = request.model_copy(
            update={
                "msg_type": MsgType.ALERT,
                "targets": request.targets or old.targets,
                "text": request.text or old.text,
                "identifier": old.identifier,
                "sender": old.sender,
            }
        )
        terminals = self._resolve(merged)
        scope.check(terminals, request.identifier, "alert")
        if self.engine.update(run.id, merged, terminals) is None:
            raise IngestError(
                Reason.UNKNOWN_REFERENCE,
                f"alert {run.id} cannot be updated ({run.state.value})",
                request.identifier,
            )
        return run

    def _referenced(self, request: AlertRequest, scope: Scope, source: str) -> AlertRun:
        """The alert an update or cancel names, if the asker may change it."""
        for ref in request.references:
            alert_id = self._resolve_reference(ref)
            if alert_id is not None and alert_id in self.engine.runs:
                run = self.engine.runs[alert_id]
                if source == "mqtt" and run.request.sender != request.sender:
                    raise IngestError(
                        Reason.NOT_ALLOWED,
                        f"alert {run.id} was sent by {run.request.sender or run.actor!r}; only its sender "
                        "may update or cancel it",
                        request.identifier,
                    )
                scope.check(run.deliveries, request.identifier, "change alerts of")
                return run
        raise IngestError(
            Reason.UNKNOWN_REFERENCE, f"no alert matches references {request.references}", request.identifier
        )

    async def _cancel_referenced(
        self, request: AlertRequest, actor: str, scope: Scope, source: str
    ) -> AlertRun:
        run = self._referenced(request, scope, source)
        if self.engine.cancel(run.id, f"cancelled by {actor}") is None:
            raise IngestError(
                Reason.UNKNOWN_REFERENCE,
                f"alert {run.id} has already ended ({run.state.value})",
                request.identifier,
            )
        return run

    def _resolve_reference(self, ref: str) -> str | None:
        if ref in self.engine.runs:
            return ref
        parts = ref.split(",")
        if len(parts) >= 2:
            return self._dedupe.get((parts[0], parts[1]))
        return None

    def _next_id(self) -> tuple[str, str]:
        day = datetime.now().strftime("%Y%m%d")
        seq = self._seq.get(day, 0) + 1
        self._seq[day] = seq
        return f"{day}-{seq:04d}", make_ebmid(self.district.code, day, seq % 10_000)

    def _alert_doc(self, run: AlertRun) -> dict[str, Any]:
        return {
            "id": run.id,
            "ebmid": run.ebmid,
            "revision": run.revision,
            "state": run.state.value,
            "request": run.request.model_dump(mode="json"),
            "accepted_at": run.accepted_at,
            "expires_at": run.accepted_at + (run.expires - run.started),
            "final": not run.active,
            "counts": dict(run.counts),
            "last_seq": self.engine.last_seq,
            "source": run.source,
            "actor": run.actor,
            "reason": run.reason,
        }

    # -- scheduled test broadcasts ----------------------------------------------------------
    async def _test_schedule_loop(self) -> None:
        """Send each configured test broadcast when due; report the terminals that missed it."""
        schedules = [s for s in self.config.test_broadcast if s.enabled]
        last_fired = dict.fromkeys(range(len(schedules)), self.wall_clock())  # never fire on installation
        watching: dict[str, datetime] = {}
        while True:
            now = self.wall_clock()
            for i, spec in enumerate(schedules):
                if not due(spec, last_fired[i], now):
                    continue
                last_fired[i] = now
                try:
                    run = await self.submit(
                        spec.to_request(), source="schedule", actor=f"test_broadcast[{i}]"
                    )
                except IngestError as e:
                    log.error("test_broadcast.refused", schedule=i, reason=e.reason.value, detail=e.detail)
                    continue
                watching[run.id] = previous_fire(spec, now)
                log.info("test_broadcast.sent", alert_id=run.id, schedule=i, targets=len(run.deliveries))
            for alert_id, slot in list(watching.items()):
                run = self.engine.runs[alert_id]
                if run.state in (AlertState.DISPATCHING, AlertState.PENDING_APPROVAL):
                    continue
                del watching[alert_id]
                acked = [t for t, d in run.deliveries.items() if d.bucket == "acked"]
                outcome = TestOutcome.of(alert_id, run.deliveries, acked, slot)
                self.test_outcomes[alert_id] = outcome
                self.metrics.missed_tests.set(len(outcome.missed))
                if outcome.missed:
                    log.warning("test_broadcast.missed", **outcome.to_log_fields())
                else:
                    log.info("test_broadcast.complete", **outcome.to_log_fields())
            await asyncio.sleep(TEST_SCHEDULE_TICK_S)

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

    # -- control socket --------------------------------------------------------------------
    async def _handle(
        self, req: dict[str, Any], peer: Peer
    ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        op = req["op"]
        if op in ("send", "cancel", "approve", "reject"):
            return await self._command(op, req, peer)
        if op == "status":
            return {"state": self._run(req).state_doc(self.district, self.engine.clock())}
        if op == "list":
            now = self.engine.clock()
            return {"alerts": [r.state_doc(self.district, now) for r in self.engine.runs.values()]}
        if op == "watch":
            return self._watch(self._run(req))
        if op == "report":
            return self._report(self._run(req))
        if op == "terminals":
            return {"terminals": self._terminals()}
        raise ControlError("bad_request", f"unknown op {op!r}")

    async def _command(self, op: str, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """send, cancel, approve, reject: journalled with who asked, refused outside their scope."""
        assert self._journal is not None  # noqa: S101
        token = req.get("token")
        detail = {k: v for k, v in req.items() if k not in ("op", "token")}  # never journal a secret
        who = peer.user if token is None else f"{peer.user} (token)"
        log.info("control.command", op=op, user=who, uid=peer.uid, pid=peer.pid)
        await self._journal.record_audit(who, op, detail)
        try:
            scope = self.operators.scope_of(
                uid=peer.uid, gid=peer.gid, user=peer.user, token=token if isinstance(token, str) else None
            )
            return await self._command_in_scope(op, req, scope, who)
        except IngestError as e:
            if e.reason is Reason.NOT_ALLOWED:
                log.warning("control.refused", op=op, user=who, uid=peer.uid, detail=e.detail)
                await self._journal.record_audit(
                    who, f"{op} refused", {**detail, "reason": e.reason.value, "detail": e.detail}
                )
            raise ControlError(e.reason.value, e.detail) from None

    async def _command_in_scope(self, op: str, req: dict[str, Any], scope: Scope, who: str) -> dict[str, Any]:
        now = self.engine.clock
        if op == "send":
            if self.stopping.is_set():
                raise ControlError("stopping", "the daemon is stopping and takes no new alerts")
            try:
                request = AlertRequest.model_validate(req.get("alert") or {})
            except ValueError as e:
                raise ControlError("invalid", str(e)) from None
            run = await self.submit(as_room(request, scope), source="cli", actor=who, scope=scope)
            return {"id": run.id, "state": run.state_doc(self.district, now())}
        run = self._run(req)
        scope.check(run.deliveries, run.request.identifier, f"{op} alerts of")
        if op == "cancel":
            if self.engine.cancel(run.id, f"cancelled by {who}") is None:
                raise ControlError("ended", f"alert {run.id} has already ended ({run.state.value})")
        elif op == "approve":
            if self.engine.approve(run.id) is None:
                raise ControlError(
                    "not_pending", f"alert {run.id} is not waiting for approval ({run.state.value})"
                )
        elif self.engine.cancel(run.id, f"rejected in review by {who}", AlertState.REJECTED) is None:
            raise ControlError("ended", f"alert {run.id} has already ended ({run.state.value})")
        return {"state": run.state_doc(self.district, now())}

    def _run(self, req: dict[str, Any]) -> AlertRun:
        alert_id = req.get("id")
        run = self.engine.runs.get(alert_id) if isinstance(alert_id, str) else None
        if run is None:
            raise ControlError("unknown_alert", f"no alert with id {alert_id!r} (ebcd alert list shows them)")
        return run

    async def _watch(self, run: AlertRun) -> AsyncIterator[dict[str, Any]]:
        q = self.engine.watch(run.id)
        try:
            doc = run.state_doc(self.district, self.engine.clock())
            while True:
                settled = run.state is not AlertState.DISPATCHING
                if settled:  # a queued state may predate the change that settled the alert
                    doc = run.state_doc(self.district, self.engine.clock())
                yield {"state": doc, "more": not settled}
                if settled:
                    return
                doc = await q.get()
        finally:
            self.engine.unwatch(run.id, q)

    def _report(self, run: AlertRun) -> dict[str, Any]:
        buckets = run.buckets()
        towns = []
        for town in self.district.towns.values():
            tt = town.tally(buckets)
            if not tt.targets:
                continue
            own = Tally()  # the terminals the town room drives itself, as a row of their own
            for own_term in town.own_terminals:
                if (bucket := buckets.get(own_term.code)) is not None:
                    own.add(bucket)
            own_row = (
                [{"code": town.code, "name": f"{town.name}（镇直属）", **own.as_dict()}]
                if own.targets
                else []
            )
            villages = own_row + [
                {"code": code, "name": town.villages[code].name, **t.as_dict()}
                for code, t in town.village_tallies(buckets).items()
            ]
            towns.append({"code": town.code, "name": town.name, **tt.as_dict(), "villages": villages})
        problems = []
        for code, d in run.deliveries.items():
            if d.state is not DState.ACKNOWLEDGED:
                term = self.district.terminal(code)
                problems.append(
                    {
                        "terminal": code,
                        "name": term.name if term else "",
                        "state": d.state.value,
                        "cause": d.cause,
                        "attempts": d.attempts,
                        "liveness": self.engine.liveness[code].state
                        if code in self.engine.liveness
                        else "unknown",
                    }
                )
        report: dict[str, Any] = {
            "state": run.state_doc(self.district, self.engine.clock()),
            "towns": towns,
            "problems": problems,
        }
        if run.refusals:  # every refusal heard, including refused forgeries and replays
            report["refusals"] = [{"terminal": t, "cause": c} for t, c in run.refusals[-200:]]
        outcome = self.test_outcomes.get(run.id)
        if outcome is not None:  # a scheduled test: the expected terminals that did not acknowledge it
            report["test"] = {
                "missed": list(outcome.missed),
                "acked": outcome.acked,
                "targets": outcome.targets,
            }
        return report

    def _terminals(self) -> list[dict[str, Any]]:
        out = []
        for t in self.district.terminals():
            live = self.engine.liveness[t.code]
            out.append(
                {
                    "code": t.code,
                    "name": t.name,
                    "town": t.town,
                    "village": t.village,
                    "link": t.link,
                    "state": live.state,
                    "session": live.session,
                }
            )
        return out


def _is_xml(payload: bytes) -> bool:
    """A CAP document (XML) rather than a JSON alert."""
    return payload[:64].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


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
