"""Admission: how an upstream message or an operator's request becomes an accepted alert.

Parses upstream JSON alerts and CAP 1.2 documents, refuses duplicates, resolves the targets to
terminals, checks them against the asker's scope and an originating room's area, numbers the
alert, journals it durably and hands it to the engine; an update or cancel is applied to the alert
it references. The dedupe map and the per-day sequence counters live here and are rebuilt from
the journal on recovery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import structlog

from ebcd.admission.authority import DISTRICT_WIDE, Scope, UpstreamAuthority
from ebcd.alert_run import AlertRun
from ebcd.config import Config
from ebcd.engine import Engine
from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap import parse_cap
from ebcd.ingest.json_alert import parse_json_alert
from ebcd.journal.journal import Journal, JournalError
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest, MsgType, Origin
from ebcd.model.codes import ebmid as make_ebmid
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal

log = structlog.get_logger("ebcd.admission")


class Admission:
    """Turns alert requests into accepted, journalled alert runs, or raises IngestError."""

    def __init__(
        self,
        *,
        config: Config,
        district: District,
        engine: Engine,
        upstream: UpstreamAuthority,
        metrics: Metrics,
        journal: Callable[[], Journal],
    ) -> None:
        self.config = config
        self.district = district
        self.engine = engine
        self.upstream = upstream
        self.metrics = metrics
        self._journal = journal
        self._seq: dict[str, int] = {}  # per day (YYYYMMDD): the last alert number given out
        self._dedupe: dict[tuple[str, str], str] = {}  # (sender, identifier) -> alert id

    def remember(self, alerts: Iterable[dict[str, Any]]) -> None:
        """Rebuild the per-day sequence counters and the dedupe map from journalled alert docs."""
        for alert in alerts:
            day, _, seq = alert["id"].partition("-")
            if seq.isdigit():
                self._seq[day] = max(self._seq.get(day, 0), int(seq))
            req = alert.get("request", {})
            if req.get("sender") and req.get("identifier"):
                self._dedupe.setdefault((req["sender"], req["identifier"]), alert["id"])

    def parse_upstream(self, payload: bytes) -> AlertRequest:
        """JSON alert or CAP 1.2 document -> AlertRequest, or IngestError. The sender is vouched
        for (listed, signature verified) as soon as it is known, before the content is judged."""
        if not is_xml(payload):
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
        try:
            await self._journal().save_alert(run.id, alert_doc(run, self.engine.last_seq), dedupe_key=key)
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


def alert_doc(run: AlertRun, last_seq: int) -> dict[str, Any]:
    """The journal's document of an alert; `last_seq` is the engine's command sequence so far."""
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
        "last_seq": last_seq,
        "source": run.source,
        "actor": run.actor,
        "reason": run.reason,
    }


def is_xml(payload: bytes) -> bool:
    """A CAP document (XML) rather than a JSON alert."""
    return payload[:64].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")
