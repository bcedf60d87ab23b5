"""Admission: how an upstream message or an operator's request becomes an accepted alert.

Parses upstream JSON alerts and CAP 1.2 documents, refuses duplicates, resolves the targets to
terminals, checks them against the asker's scope and an originating room's area, numbers the
alert, journals it durably and hands it to the delivery runner; an update or cancel is applied to the alert
it references. The dedupe map and the per-day sequence counters live here and are rebuilt from
the journal on recovery.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

import structlog

from ebcd.admission.authority import DISTRICT_WIDE, Scope, UpstreamAuthority
from ebcd.config import Config
from ebcd.delivery.alerts import Alert
from ebcd.delivery.core import AlertSpec, Refused
from ebcd.delivery.runner import Runner
from ebcd.delivery.state import AState
from ebcd.ingest import IngestError, Limits, Reason
from ebcd.ingest.cap import CapAlert, EndingUpdate, parse_cap
from ebcd.ingest.json_alert import parse_json_alert
from ebcd.journal.journal import Journal, JournalError
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest, MsgType, Origin
from ebcd.model.codes import ebmid as make_ebmid
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal

log = structlog.get_logger("ebcd.admission")
_ENDED = frozenset({AState.CANCELLED, AState.EXPIRED, AState.REJECTED})


class Admission:
    """Turns alert requests into accepted, journalled alert runs, or raises IngestError."""

    def __init__(
        self,
        *,
        config: Config,
        district: District,
        runner: Runner,
        upstream: UpstreamAuthority,
        metrics: Metrics,
        journal: Callable[[], Journal],
    ) -> None:
        self.config = config
        self.district = district
        self.runner = runner
        self.upstream = upstream
        self.metrics = metrics
        self._journal = journal
        self.limits = Limits(**config.ingest.model_dump())
        self._seq: dict[str, int] = {}  # per day (YYYYMMDD): the last alert number given out
        self._dedupe: dict[tuple[str, str], tuple[str, float]] = {}  # key -> (alert id, when claimed)

    def remember(self, alerts: Iterable[dict[str, Any]]) -> None:
        """Rebuild the per-day sequence counters and the dedupe map from journalled alert docs."""
        for alert in alerts:
            day, _, seq = alert["id"].partition("-")
            if seq.isdigit():
                self._seq[day] = max(self._seq.get(day, 0), int(seq))
            req = alert.get("request", {})
            if req.get("identifier"):
                self._dedupe.setdefault((req.get("sender") or "", req["identifier"]), (alert["id"], 0.0))

    def remember_claims(self, claims: Iterable[tuple[str, str, str, float]]) -> None:
        """Take back the journal's de-duplication claims (sender, identifier, alert id, when)."""
        for sender, identifier, alert_id, at in claims:
            self._dedupe.setdefault((sender, identifier), (alert_id, at))

    def _seen(self, key: tuple[str, str] | None) -> str | None:
        """The alert id a key was claimed for, if it still counts (digests only within their window)."""
        if key is None or key not in self._dedupe:
            return None
        alert_id, at = self._dedupe[key]
        if key[0] == DIGEST and time.time() - at > self.config.upstream.digest_window_s:
            return None
        return alert_id

    def parse_upstream(self, payload: bytes) -> AlertRequest:
        """JSON alert or CAP 1.2 document -> AlertRequest, or IngestError. The sender is vouched
        for (listed, signature verified) as soon as it is known, before the content is judged."""
        if not is_xml(payload):
            request = parse_json_alert(payload, self.limits.max_payload_bytes)
            self.upstream.vouch(request.sender, request.identifier, payload, is_cap=False)
            return request
        try:
            cap = parse_cap(
                payload,
                district_area=self.district.area,
                default_ttl_s=self.config.delivery.default_ttl_s,
                vouch=lambda m: self.upstream.vouch(m.sender, m.identifier, payload, is_cap=True),
                limits=self.limits,
            )
        except EndingUpdate as e:  # vouched for already: the sender may end what it references
            raise EndingUpdate(e.detail, e.cap, _as_upstream(e.cap)) from None
        return _as_upstream(cap)

    async def end_by_update(
        self, ending: EndingUpdate, *, scope: Scope = DISTRICT_WIDE, payload: bytes | None = None
    ) -> Alert:
        """End, as a Cancel would, the active alert of the same sender an expired Update references;
        refuse it `expired` (re-raise `ending`) when it references none."""
        request = ending.request
        key = dedupe_key(request, payload)
        if (seen := self._seen(key)) is not None:
            raise IngestError(Reason.DUPLICATE, f"already accepted as alert {seen}", request.identifier)
        run = self._active_of_sender(request)
        if run is None:
            detail = f"{ending.detail}, and it references no active alert of {request.sender!r} to end"
            raise IngestError(Reason.EXPIRED, detail, request.identifier)
        scope.check(run.deliveries, request.identifier, "change alerts of")
        why = f"ended by Update {request.identifier} of {request.sender} (its expires has passed)"
        with _refused_as(request, "cancel", f"alert {run.id} has already ended ({run.state.value})"):
            await self.runner.cancel(run.id, why)
        log.info(
            "alert.ended_by_update", alert_id=run.id, identifier=request.identifier, sender=request.sender
        )
        if key:
            self._dedupe[key] = (run.id, time.time())
            await self._save(run, key)
        return run

    def _active_of_sender(self, request: AlertRequest) -> Alert | None:
        """The first alert `request` references that is of its sender and not ended."""
        for ref in request.references:
            alert_id = self._resolve_reference(ref, request.sender)
            run = self.runner.alerts.get(alert_id) if alert_id is not None else None
            if run is None or run.request.sender != request.sender:
                continue
            if not run.closed and run.state not in _ENDED:
                return run
        return None

    async def submit(
        self,
        request: AlertRequest,
        *,
        source: str,
        actor: str,
        scope: Scope = DISTRICT_WIDE,
        payload: bytes | None = None,
    ) -> Alert:
        """Accept an alert (or an update or cancel of one) durably, or raise IngestError.

        `scope` is what the asking sender or operator may address; the alert's terminals (and,
        for an update or cancel, those of the alert it changes) must all lie within it. An
        upstream message is de-duplicated on (sender, identifier), on its identifier alone when it
        names no sender, and on the digest of its `payload` when it names neither."""
        key = dedupe_key(request, payload)
        if (seen := self._seen(key)) is not None:
            raise IngestError(Reason.DUPLICATE, f"already accepted as alert {seen}", request.identifier)
        if request.msg_type is MsgType.CANCEL:
            run = await self._cancel_referenced(request, actor, scope, source)
        elif request.msg_type is MsgType.UPDATE:
            run = await self._update_referenced(request, scope, source)
        else:
            return await self._accept(request, source=source, actor=actor, key=key, scope=scope)
        if key:  # an update or cancel is itself a message that must not be applied twice
            self._dedupe[key] = (run.id, time.time())
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
    ) -> Alert:
        terminals = self._resolve(request)
        scope.check(terminals, request.identifier, "alert")
        self._check_origin(request, terminals)
        alert_id, ebmid = self._next_id()
        hold = self.config.review.holds(request.level, request.sender, source)
        spec = AlertSpec(alert_id, ebmid, request, accepted_at=time.time(), source=source, actor=actor)
        try:
            alert = await self.runner.accept(spec, [t.code for t in terminals], hold=hold, dedupe_key=key)
        except JournalError as e:
            raise IngestError(
                Reason.JOURNAL, f"could not journal the alert: {e}", request.identifier
            ) from None
        if key:
            self._dedupe[key] = (alert_id, time.time())
        if hold:
            log.info(
                "alert.awaiting_approval",
                alert_id=alert_id,
                level=request.level,
                sender=request.sender,
                source=source,
            )
        self.metrics.alerts.labels(str(request.level), source).inc()
        return alert

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

    async def _save(self, alert: Alert, key: tuple[str, str] | None) -> None:
        try:
            await self._journal().save_alert(alert.id, self.runner.doc(alert), dedupe_key=key)
        except JournalError as e:
            raise IngestError(
                Reason.JOURNAL, f"could not journal the alert: {e}", alert.request.identifier
            ) from None

    async def _update_referenced(self, request: AlertRequest, scope: Scope, source: str) -> Alert:
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
        with _refused_as(request, "update", f"alert {run.id} cannot be updated ({run.state.value})"):
            await self.runner.update(run.id, merged, [t.code for t in terminals])
        return run

    def _referenced(self, request: AlertRequest, scope: Scope, source: str) -> Alert:
        """The alert an update or cancel names, if the asker may change it."""
        for ref in request.references:
            alert_id = self._resolve_reference(ref, request.sender if source == "mqtt" else None)
            if alert_id is not None and alert_id in self.runner.alerts:
                run = self.runner.alerts[alert_id]
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

    async def _cancel_referenced(self, request: AlertRequest, actor: str, scope: Scope, source: str) -> Alert:
        run = self._referenced(request, scope, source)
        with _refused_as(request, "cancel", f"alert {run.id} has already ended ({run.state.value})"):
            await self.runner.cancel(run.id, f"cancelled by {actor}")
        return run

    def _resolve_reference(self, ref: str, sender: str | None = None) -> str | None:
        """The alert id a reference names: an ebcd id, or a claimed (sender, identifier). Some feeds
        name themselves differently in <references> than in <sender> (the tsunami centres write
        their office code, PAAQ, beside a URL): the identifier is then looked up under the
        message's own sender too, which still finds only that sender's alerts."""
        if ref in self.runner.alerts:
            return ref
        parts = ref.split(",")
        if len(parts) >= 2:
            seen = self._dedupe.get((parts[0], parts[1]))
            if seen is None and sender:
                seen = self._dedupe.get((sender, parts[1]))
            return seen[0] if seen else None
        return None

    def _next_id(self) -> tuple[str, str]:
        day = datetime.now().strftime("%Y%m%d")
        seq = self._seq.get(day, 0) + 1
        self._seq[day] = seq
        return f"{day}-{seq:04d}", make_ebmid(self.district.code, day, seq % 10_000)


@contextlib.contextmanager
def _refused_as(request: AlertRequest, what: str, ended: str) -> Iterator[None]:
    """The core's refusal or the journal's failure of an update or cancel, as the sender's IngestError."""
    try:
        yield
    except Refused:
        raise IngestError(Reason.UNKNOWN_REFERENCE, ended, request.identifier) from None
    except JournalError as e:
        raise IngestError(Reason.JOURNAL, f"could not journal the {what}: {e}", request.identifier) from None


def _as_upstream(cap: CapAlert) -> AlertRequest:
    """The request of a CAP alert, its references as (sender, identifier), as dedupe claims name them."""
    refs = [f"{r.sender},{r.identifier}" for r in cap.references]
    return cap.request.model_copy(update={"references": refs, "sender": cap.sender})


DIGEST = "#sha256"  # the "sender" of a claim on a payload's digest (no sender can start with #)


def dedupe_key(request: AlertRequest, payload: bytes | None) -> tuple[str, str] | None:
    """What an upstream message is de-duplicated on, None for an operator's request."""
    if request.identifier:
        return (request.sender or "", request.identifier)
    if payload is not None:
        return (DIGEST, hashlib.sha256(payload).hexdigest())
    return None


def is_xml(payload: bytes) -> bool:
    """A CAP document (XML) rather than a JSON alert."""
    return payload[:64].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")
