"""The daemon: builds the parts and wires them together in one TaskGroup.

The delivery core (`ebcd.delivery`) decides, its runner performs; the MQTT link and the serial
bus masters carry; admission (`ebcd.admission`) turns requests into alerts; the control socket
answers the duty officer; the journal remembers. This module only connects them and owns the
life cycle.

Shutdown (SIGTERM/SIGINT): stop taking alerts, flush alert states and the journal, publish the
offline status, then cancel the group; a second signal or the grace period ends it harder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import start_http_server

from ebcd import __version__
from ebcd.admission.admission import Admission
from ebcd.admission.authority import DISTRICT_WIDE, OperatorAuthority, Scope, UpstreamAuthority
from ebcd.admission.routine import Scheduler
from ebcd.admission.upstream import UpstreamIngest
from ebcd.config import Config, parse_broker_url
from ebcd.control.duty import links_doc
from ebcd.control.handler import ControlHandler
from ebcd.control.socket import SOCKET_NAME, serve
from ebcd.daemon.health import JournalHealth
from ebcd.daemon.signals import on_stop_signals
from ebcd.daemon.terminals import TerminalTraffic
from ebcd.delivery.alerts import Alert
from ebcd.delivery.core import Core, Policy
from ebcd.delivery.records import AlertRecord
from ebcd.delivery.recovery import record_from_row, restore
from ebcd.delivery.runner import Runner
from ebcd.delivery.state import AState, Bucket
from ebcd.journal.journal import Journal, JournalError, NullJournal
from ebcd.journal.retention import run_retention
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest
from ebcd.model.backoff import Backoff
from ebcd.protocols.adapter import address as adapter_address
from ebcd.protocols.adapter.frame import SignedData
from ebcd.protocols.adapter.link import AdapterLink
from ebcd.protocols.adapter.listener import AdapterListener, adapter_verifiers
from ebcd.protocols.adapter.transport import AdapterTransport
from ebcd.protocols.mqtt.codec import Topics
from ebcd.protocols.mqtt.link import LinkState, MqttLink, Will
from ebcd.protocols.mqtt.transport import MqttTransport
from ebcd.protocols.serial.bus import SerialBusMaster
from ebcd.protocols.serial.transport import SerialTransport
from ebcd.security.bench import BENCH, signer_from
from ebcd.security.mqtt_auth import read_secret, tls_context
from ebcd.security.reports import report_verifier_from
from ebcd.tiers.district import District

if TYPE_CHECKING:  # aiohttp and the EBD stack load only where [ebd] listen or [web] listen is set
    from ebcd.platform.platform import EbdPlatform
    from ebcd.platform.server import EbdServer
    from ebcd.web.server import WebServer

log = structlog.get_logger("ebcd.daemon")

SHUTDOWN_GRACE_S = 10.0
JOURNAL_TICK_S = 0.05  # changed alert documents reach the journal at most this late
LIVENESS_SWEEP_S = 5.0


class _Shutdown(Exception):
    """Raised inside the TaskGroup to end it after a graceful stop."""


class Daemon:
    """ebcd's running state: config, district, links, delivery core and runner, journal."""

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
        self.bound_web_port: int | None = None  # [web] listen, once bound
        self._journal: Journal | None = None
        self.health = JournalHealth(lambda: self.journal.stats, self.metrics, on_change=self._on_health)
        host, port, tls = parse_broker_url(self.broker)
        self._broker_addr = (host, port, _tls_context(config, tls))
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self.link = MqttLink(
            host=host,
            port=port,
            tls=tls,
            tls_context=self._broker_addr[2],
            client_id=config.mqtt.client_id or f"ebcd-{district.code}-{digest}",
            username=config.mqtt.username,
            password=_read_secret(config.mqtt.password_file, config.base_dir),
            keepalive_s=config.mqtt.keepalive_s,
            clean_session=False,
            protocol=config.mqtt.protocol,
            subscriptions=[self.topics.alerts_in, self.topics.all_reports, self.topics.all_presence],
            on_message=lambda *message: self.terminals.on_message(*message),
            held_topics=[self.topics.alerts_in],  # acknowledged to the broker once journalled
            on_held_message=lambda topic, payload, retain, props, ack: self.ingest.offer(
                topic, payload, retain, props, ack
            ),
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
        self.upstream = UpstreamAuthority(config, district)
        self.operators = OperatorAuthority(config, district)
        self.core = Core(
            (t.code for t in district.terminals()),
            Policy(
                ack_timeout_s=dc.ack_timeout_s,
                max_attempts=dc.max_attempts,
                backoff=Backoff(dc.retry_initial_s, dc.retry_max_s, dc.retry_jitter),
                max_play_s=dc.max_play_s,
                priority_order=tuple(config.priority.order),
                preempted=config.priority.preempted,
            ),
        )
        self.serial_masters = self._serial_masters()
        signer = _signer(config)
        self.adapter_links = self._adapter_links()
        self.adapter = AdapterTransport(
            self.adapter_links,
            self.metrics,
            signer=signer,
            on_report=lambda r: self.runner.on_report(r),
            on_failed=lambda *a: self.runner.send_failed(*a),
            variant=SignedData(config.adapter.signed_data),
            agency=config.adapter.agency,
        )
        self.adapter_listener = self._adapter_listener(signer)
        self.serial = SerialTransport(
            self.serial_masters, self.metrics, on_failed=lambda *a: self.runner.send_failed(*a)
        )
        self.runner = Runner(
            self.core,
            district,
            transports={
                "mqtt": MqttTransport(
                    district, self.topics, self.link, self.metrics, groups=config.mqtt.group_topics
                ),
                "serial": self.serial,
                "adapter": self.adapter,
            },
            metrics=self.metrics,
            publish_state=self._publish_state,
            journal=lambda: self.journal,
            signer=signer,
            state_interval_s=dc.state_publish_interval_s,
        )
        sec = config.security
        for town in district.towns.values():  # for the dashboard's map: a few fixed series
            points = [(t.lat, t.lon) for t in town.terminals()]
            if points:
                lat = sum(p[0] for p in points) / len(points)
                lon = sum(p[1] for p in points) / len(points)
                self.metrics.town_location.labels(town.code, town.name, f"{lat:.5f}", f"{lon:.5f}").set(1)
        self.terminals = TerminalTraffic(
            district,
            self.topics,
            report_verifier_from(sec.terminal_keys_dir, config.base_dir, window_s=sec.replay_window_s),
            self.runner,
            self.metrics,
        )
        self.terminals.warn_missing_keys()
        self.admission = Admission(
            config=config,
            district=district,
            runner=self.runner,
            upstream=self.upstream,
            metrics=self.metrics,
            journal=lambda: self.journal,
        )
        self.ingest = UpstreamIngest(
            admission=self.admission,
            upstream=self.upstream,
            topics=self.topics,
            link=self.link,
            metrics=self.metrics,
            journal=lambda: self.journal,
            queue_size=config.mqtt.ingest_queue_size,
            recent_rejections=config.duty_room.recent_rejections,
        )
        self.scheduler = Scheduler(
            config=config, runner=self.runner, admission=self.admission, metrics=self.metrics
        )
        self.ebd = self._ebd_platform()  # the platform above, EBD over HTTP; off unless [ebd] listen is set
        self.ebd_server: EbdServer | None = None
        self.control = ControlHandler(
            district=district,
            runner=self.runner,
            admission=self.admission,
            operators=self.operators,
            journal=lambda: self.journal,
            stopping=self.stopping,
            test_outcomes=self.scheduler.outcomes,
            links=self._links,
            rejections=lambda: list(self.ingest.recent_rejections),
            duty_room=config.duty_room,
        )
        self.web = self._web_server()  # ValueError: beyond localhost without a token

    @property
    def journal(self) -> Journal:
        """The open journal (from the start of `run()`)."""
        assert self._journal is not None  # noqa: S101
        return self._journal

    async def submit(
        self, request: AlertRequest, *, source: str, actor: str, scope: Scope = DISTRICT_WIDE
    ) -> Alert:
        """Accept an alert (or an update or cancel of one) durably, or raise IngestError."""
        return await self.admission.submit(request, source=source, actor=actor, scope=scope)

    def _ebd_platform(self) -> EbdPlatform | None:
        if self.config.ebd.listen is None:
            return None
        from ebcd.platform.platform import EbdPlatform

        return EbdPlatform(
            config=self.config,
            district=self.district,
            admission=self.admission,
            runner=self.runner,
            core=self.core,
            metrics=self.metrics,
            journal=lambda: self.journal,
            signer=self.runner.signer,
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
                on_report=lambda r: self.runner.on_report(r),
                on_presence=lambda p: self.runner.on_presence(p),
                baudrate=sc.baudrate,
                parity=sc.parity,
                response_timeout_s=sc.response_timeout_s,
                attempts=sc.attempts,
                inter_frame_gap_s=sc.inter_frame_gap_s,
                echo_suppression=sc.echo_suppression,
                poll_interval_s=sc.poll_interval_s,
                busy_poll_s=sc.busy_poll_s,
            )
        return masters

    def _adapter_links(self) -> dict[str, AdapterLink]:
        ac = self.config.adapter
        links = {}
        for village in self.district.villages():
            if village.link != "adapter" or village.port is None:
                continue
            try:
                address = adapter_address.parse(village.port)
            except adapter_address.AddressError as e:
                log.error("adapter.bad_address", room=village.code, error=str(e))
                continue  # its commands fail with "no adapter link", in the alert's report
            links[village.code] = AdapterLink(
                village.code,
                address,
                backoff=Backoff(ac.reconnect_initial_s, ac.reconnect_max_s, 0.2),
                connect_timeout_s=ac.connect_timeout_s,
                reply_timeout_s=ac.reply_timeout_s,
                on_frame=lambda frame: self._adapter_frame(frame),
                on_drop=lambda why: self.metrics.dropped.labels("adapter").inc(),
                max_garbage_bytes=ac.max_garbage_bytes,
            )
        return links

    def _adapter_listener(self, signer: Any) -> AdapterListener | None:
        ac = self.config.adapter
        if not any(v.link == "adapter" for v in self.district.villages()):
            return None  # no adapter room: nobody to listen to
        if ac.listen is None:
            if self.adapter_links:
                log.warning(
                    "adapter.no_listener", hint="[adapter] listen unset: no heartbeats or task reports"
                )
            return None
        try:
            listen = adapter_address.parse(ac.listen, scheme=False)
        except adapter_address.AddressError as e:
            log.error("adapter.bad_listen", error=str(e), hint="[adapter] listen: HOST:PORT")
            return None
        return AdapterListener(
            listen,
            self.district,
            self.adapter,
            self.metrics,
            on_report=lambda r: self.runner.on_report(r),
            on_presence=lambda p: self.runner.on_presence(p),
            on_unknown=lambda codes, why: self.runner.terminals_unknown(codes, why),
            signer=signer,
            verifiers=adapter_verifiers(
                ac.keys_dir, self.config.base_dir, self.config.security.scheme, list(self.adapter_links)
            ),
            variant=SignedData(ac.signed_data),
            heartbeat_s=ac.heartbeat_s,
            max_connections=ac.max_connections,
            max_garbage_bytes=ac.max_garbage_bytes,
            idle_timeout_s=ac.idle_timeout_s,
        )

    def _adapter_frame(self, frame: Any) -> None:
        """A report or heartbeat an adapter sent on the command connection: as if to the listener."""
        if self.adapter_listener is not None:
            self.adapter_listener.handle(frame)  # answers belong on the adapter's listener connection
        else:
            self.metrics.dropped.labels("adapter").inc()

    # -- life cycle ------------------------------------------------------------------------
    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until `stop()` or a signal, then shut down gracefully."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        on_commit = lambda latency_s, rows: self.metrics.journal_latency.observe(latency_s)  # noqa: E731
        if self.journal_enabled:
            self._journal = await Journal.open(
                self.state_dir / "journal.sqlite3",
                on_commit=on_commit,
                group_commit_s=self.config.journal.group_commit_ms / 1000,
            )
        else:
            self._journal = await NullJournal.open()
        await self._recover()
        loop = asyncio.get_running_loop()
        undo_signals = on_stop_signals(loop, self.stop)
        dc = self.config.daemon
        server = await serve(
            self.state_dir / SOCKET_NAME,
            self.control.handle,
            dc.socket_mode,
            idle_timeout_s=dc.control_idle_timeout_s,
            max_connections=dc.control_max_connections,
            metrics=self.metrics,
        )
        web = self.web
        if web is not None:
            try:
                await web.start()
            except OSError as e:
                log.error("web.bind_failed", listen=self.config.web.listen, error=str(e))
                server.close()
                await self._journal.close()
                raise
            self.bound_web_port = web.bound_port
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
        on_mqtt = len(self.terminals.mqtt_codes)
        if self.config.mqtt.outgoing_queue_size < on_mqtt:
            log.warning(
                "mqtt.queue_below_district",
                outgoing_queue_size=self.config.mqtt.outgoing_queue_size,
                mqtt_terminals=on_mqtt,
                hint="after a restart the alerts in flight are re-sent to each terminal on its own "
                "topic: what does not fit is dropped (logged, counted) and waits for the next attempt; "
                "raise [mqtt] outgoing_queue_size to twice the terminals",
            )
        if self.operators.open:
            log.info(
                "operators.open", hint="no [[operators]] listed: the control socket acts for the district"
            )
        if self.ebd is not None:
            from ebcd.platform.server import EbdServer

            await self.ebd.recover()
            self.ebd_server = EbdServer(self.ebd.receive, max_body_bytes=self.config.ebd.max_package_bytes)
            host, _, port = (self.config.ebd.listen or "").rpartition(":")
            await self.ebd_server.start(host, int(port))
        try:
            async with asyncio.TaskGroup() as tg:
                if self.ebd is not None:
                    tg.create_task(self.ebd.run(), name="ebd-platform")
                tg.create_task(self.link.run(), name="mqtt-link")
                tg.create_task(self.runner.run_timers(), name="delivery-timers")
                tg.create_task(self.runner.run_publisher(), name="state-publisher")
                tg.create_task(self.ingest.run(), name="ingest")
                tg.create_task(self._liveness_loop(), name="liveness")
                tg.create_task(self._save_docs_loop(), name="journal-docs")
                tg.create_task(run_retention(self.journal, self.config.journal), name="journal-retention")
                tg.create_task(self.scheduler.run(), name="test-broadcasts")
                tg.create_task(self.terminals.probe_acl(*self._broker_addr), name="acl-probe")
                tg.create_task(self._stopper(server), name="stopper")
                for room, master in self.serial_masters.items():
                    tg.create_task(master.run(), name=f"serial-bus-{room}")
                for room, link in self.adapter_links.items():
                    tg.create_task(link.run(), name=f"adapter-{room}")
                if self.adapter_listener is not None:
                    tg.create_task(self.adapter_listener.run(), name="adapter-listener")
                self.ready.set()
                if on_ready:
                    on_ready()
        except* _Shutdown:
            pass
        finally:
            undo_signals()
            server.close()
            if web is not None:
                await web.close()
            if http is not None:
                http.shutdown()
            if self.ebd_server is not None:
                await self.ebd_server.stop()
            await self._journal.close()
            log.info("daemon.stopped")

    def stop(self) -> None:
        """Ask the daemon to stop (signal-safe)."""
        self.stopping.set()

    async def _stopper(self, server: asyncio.AbstractServer) -> None:
        await self.stopping.wait()
        log.info("daemon.stopping")
        server.close()
        if self.ebd_server is not None:  # no package from above is taken once stopping
            await self.ebd_server.stop()
        if self.ingest.waiting:  # journalled, so judged at the next start; never dropped
            log.warning("ingest.deferred", messages=self.ingest.waiting, hint="judged at the next start")
        self.runner.flush_states()
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE_S):
                if self.link.connected.is_set():
                    await self.link.drain()
                await self.serial.close()
                await self.adapter.close()
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
        for alert_id, doc in self.runner.take_docs().items():
            try:
                await journal.save_alert(alert_id, doc)
            except JournalError as e:
                self.metrics.journal_failures.labels("alert").inc()
                log.error("journal.save_failed", alert_id=alert_id, error=str(e))

    # -- recovery --------------------------------------------------------------------------
    async def _recover(self) -> None:
        journal = self.journal
        alerts = await journal.list_alerts(10_000)
        self.admission.remember(alerts)
        self.admission.remember_claims(await journal.dedupe_claims())
        self.runner.resume_seq(max([0, *(int(alert.get("last_seq", 0)) for alert in alerts)]))
        records, deliveries = [], {}
        for active in await journal.load_active():
            records.append(_alert_record(active.doc))
            deliveries[active.alert_id] = [
                record_from_row(active.alert_id, code, row) for code, row in active.deliveries.items()
            ]
        restored = restore(self.core, records, deliveries, now=self.runner.clock(), wall_now=time.time())
        self.runner.recovered()
        await self.ingest.recover()
        for alert in restored:
            log.info(
                "alert.recovered",
                alert_id=alert.id,
                state=alert.state.value,
                acked=alert.counts[Bucket.ACKED],
                targets=alert.targets,
            )

    # -- MQTT ------------------------------------------------------------------------------
    def _status_doc(self, state: str) -> bytes:
        doc: dict[str, Any] = {"state": state, "version": __version__, "district": self.district.code}
        if state == "online" and self.health.degraded:
            doc["degraded"] = [self.health.component]
            doc["reason"] = self.health.reason
        doc["at"] = time.time()
        return json.dumps(doc).encode()

    def _web_server(self) -> WebServer | None:
        """The wall screen's page, if `[web] listen` is set (ValueError beyond localhost without a token)."""
        web = self.config.web
        if web.listen is None:
            return None
        from ebcd.web.server import WebServer, ledger_doc, parse_listen

        host, port = parse_listen(web.listen)
        token = read_secret(web.token_file, base=self.config.base_dir, key="[web] token_file")
        dr = self.config.duty_room
        return WebServer(
            host, port, token=token, ledger=ledger_doc(self.district), snapshot=self.control.web_doc,
            watch=self.runner.watch_room, unwatch=self.runner.unwatch_room, metrics=self.metrics,
            refresh_s=dr.refresh_s, min_interval_s=dr.min_interval_s,
        )  # fmt: skip

    def _links(self) -> list[dict[str, Any]]:
        """The broker and every serial port, up or down, for the duty room's view."""
        host, port, tls = self._broker_addr
        items = [
            ("mqtt broker", f"{'mqtts' if tls else 'mqtt'}://{host}:{port}", self.link.connected.is_set(), "")
        ]
        for room, master in self.serial_masters.items():
            village = self.district.village(room)
            items.append(("serial port", master.url, master.connected, village.name if village else room))
        return links_doc(items)

    def _on_health(self, degraded: bool, reason: str | None) -> None:
        """The journal failed or recovered: say so on the status topic at once."""
        log.log(
            40 if degraded else 20, "journal.degraded" if degraded else "journal.recovered", reason=reason
        )
        if self.link.connected.is_set():
            self.link.enqueue(self.topics.status, self._status_doc("online"), retain=True)

    async def _on_connect(self) -> None:
        self.metrics.mqtt_connects.inc()
        await self.link.publish(self.topics.status, self._status_doc("online"), retain=True)
        self.runner.republish_all()

    def _on_link_state(self, state: LinkState) -> None:
        self.metrics.mqtt_connected.set(1 if state is LinkState.CONNECTED else 0)

    def _publish_state(self, alert: Alert, doc: dict[str, Any]) -> None:
        self.link.enqueue(
            self.topics.alert_state(alert.id), json.dumps(doc, ensure_ascii=False).encode(), retain=True
        )

    # -- liveness --------------------------------------------------------------------------
    async def _liveness_loop(self) -> None:
        beats = [self.config.delivery.terminal_heartbeat_s]
        if self.adapter_links:  # the rooms' terminals are heard at each of their adapter's heartbeats
            beats.append(self.config.adapter.heartbeat_s)
        silent_after_s = 3 * max(beats) + 5
        while True:
            await asyncio.sleep(LIVENESS_SWEEP_S)
            self.runner.sweep(silent_after_s)
            self.health.check()
            for room, master in self.serial_masters.items():
                village = self.district.village(room)
                if not master.connected and village is not None:
                    self.runner.terminals_unknown([t.code for t in village.terminals], "serial port down")
            self.metrics.serial_link.set(sum(1 for m in self.serial_masters.values() if m.connected))
            live = self.core.liveness
            per_town: dict[tuple[str, str], int] = {}
            for term in self.district.terminals():
                key = (term.town, live.state(term.code).value)
                per_town[key] = per_town.get(key, 0) + 1
            for town in self.district.towns:
                for state in ("unknown", "online", "offline"):
                    self.metrics.town_terminals.labels(town, state).set(per_town.get((town, state), 0))
            for state, n in live.counts().items():
                self.metrics.terminals.labels(state).set(n)
            self.metrics.queue_depth.labels("mqtt_outgoing").set(self.link.queue_depth)


def _alert_record(doc: dict[str, Any]) -> AlertRecord:
    """An alert journalled by an older or newer ebcd: what recovery needs, with safe defaults."""
    return AlertRecord(
        alert_id=doc["id"],
        ebmid=doc["ebmid"],
        request=doc["request"],
        revision=int(doc.get("revision", 1)),
        state=AState(doc.get("state", AState.DISPATCHING.value)),
        accepted_at=float(doc["accepted_at"]),
        expires_at=float(doc["expires_at"]),
        order=int(doc.get("order", 0)),
        source=str(doc.get("source", "")),
        actor=str(doc.get("actor", "")),
        reason=doc.get("reason"),
        closed=bool(doc.get("closed", doc.get("final", False))),
    )


def _signer(config: Config) -> Any:
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
    return signer


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
