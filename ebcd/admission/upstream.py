"""Upstream messages on `alerts/in`: journalled raw, acknowledged to the broker, judged, answered.

Write-ahead, then acknowledge, then judge: a message is journalled (raw bytes, time, topic)
before anything judges it, and the broker's PUBACK waits for that journal write, so a broker
redelivers whatever ebcd did not keep. Judging then runs one message at a time, in order: parsed,
vouched for and submitted, or refused on the rejection topic (and on its MQTT 5 response topic)
with a reason, in the log and in `ebcd_rejected_messages_total{reason}`. A message journalled but
not judged when the daemon stopped (or crashed) is judged at the next start, before new ones.
An EDXL-DE 1.0 envelope is judged part by part (ingest/edxl.py): each enclosed alert is accepted
or refused on its own, and the message's one journal verdict lists them all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog

from ebcd.admission.admission import Admission, is_xml
from ebcd.admission.authority import UpstreamAuthority
from ebcd.delivery.alerts import Alert
from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap import EndingUpdate
from ebcd.ingest.edxl import Envelope, read_envelope
from ebcd.journal.journal import Journal, JournalError
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest
from ebcd.protocols.mqtt.codec import Topics
from ebcd.protocols.mqtt.link import Ack, MqttLink, response_properties, response_target

RECENT_REJECTIONS = 20  # refusals kept for `ebcd top` ([duty_room] recent_rejections)
log = structlog.get_logger("ebcd.daemon")
UPDATE_ENDS = "update-ends"  # what an expired Update did when it ended the alert it references


class _Arrival(NamedTuple):
    topic: str
    payload: bytes
    retain: bool
    properties: Any
    ack: Ack | None


class _Journalled(NamedTuple):
    row: int
    payload: bytes
    retain: bool
    properties: Any


class UpstreamIngest:
    """Upstream messages from arrival to verdict: journal, acknowledge, judge (in order)."""

    def __init__(
        self,
        *,
        admission: Admission,
        upstream: UpstreamAuthority,
        topics: Topics,
        link: MqttLink,
        metrics: Metrics,
        journal: Callable[[], Journal],
        queue_size: int,
        recent_rejections: int = RECENT_REJECTIONS,
    ) -> None:
        self.admission = admission
        self.upstream = upstream
        self.topics = topics
        self.link = link
        self.metrics = metrics
        self._journal = journal
        self._queue_size = queue_size
        # unbounded by us, bounded by the broker: it sends no more than its in-flight window of
        # messages we have not acknowledged yet, and we acknowledge only after journalling
        self._arrivals: asyncio.Queue[_Arrival] = asyncio.Queue()
        self._judge: asyncio.Queue[_Journalled] = asyncio.Queue()
        self.idle = asyncio.Event()
        self.recent_rejections: deque[dict[str, Any]] = deque(maxlen=recent_rejections)
        self.idle.set()

    def offer(
        self, topic: str, payload: bytes, retain: bool, properties: Any, ack: Ack | None = None
    ) -> None:
        """A message from `alerts/in`; `ack` tells the broker it is kept (called once journalled)."""
        self.idle.clear()
        self._arrivals.put_nowait(_Arrival(topic, payload, retain, properties, ack))

    @property
    def waiting(self) -> int:
        """Messages journalled or arriving, not judged yet."""
        return self._arrivals.qsize() + self._judge.qsize()

    async def recover(self) -> int:
        """Queue, before anything new, every message journalled but never judged; returns how many."""
        rows = await self._journal().unjudged(source="mqtt")
        for r in rows:
            self._judge.put_nowait(_Journalled(r.row_id, bytes(r.payload), False, None))
        if rows:
            self.idle.clear()
            log.warning(
                "ingest.recovered", messages=len(rows), hint="journalled but not judged before the stop"
            )
        return len(rows)

    async def run(self) -> None:
        """Journal arrivals and judge them, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._keep(), name="ingest-journal")
            tg.create_task(self._judge_loop(), name="ingest-judge")

    async def _keep(self) -> None:
        """Journal every arrival (all waiting at once, group-committed), then acknowledge each, in order."""
        while True:
            batch = [await self._arrivals.get()]
            while not self._arrivals.empty():
                batch.append(self._arrivals.get_nowait())
            journal = self._journal()
            now = time.time()
            rows = await asyncio.gather(
                *(journal.record_received(a.topic, a.payload, now, source="mqtt") for a in batch),
                return_exceptions=True,
            )
            for a, row in zip(batch, rows, strict=True):
                if isinstance(row, BaseException):
                    if not isinstance(row, JournalError):
                        raise row
                    self.metrics.journal_failures.labels("received").inc()
                    # not kept: refused, and not acknowledged, so the broker offers it again
                    self.reject(
                        a.payload,
                        IngestError(Reason.JOURNAL, f"could not journal the message: {row}"),
                        a.properties,
                    )
                    continue
                if a.ack is not None:
                    a.ack()
                self._judge.put_nowait(_Journalled(row, a.payload, a.retain, a.properties))
            self.metrics.queue_depth.labels("ingest").set(self._judge.qsize())

    async def _judge_loop(self) -> None:
        while True:
            if self._judge.empty() and self._arrivals.empty():
                self.idle.set()
            item = await self._judge.get()
            self.metrics.queue_depth.labels("ingest").set(self._judge.qsize())
            if self._judge.qsize() >= self._queue_size:
                self.metrics.dropped.labels("ingest_queue").inc()
                await self._refuse(
                    item,
                    IngestError(
                        Reason.OVERLOADED,
                        f"more than {self._queue_size} messages wait to be judged: send again later",
                    ),
                )
                continue
            await self.judge(item)

    async def judge(self, item: _Journalled) -> None:
        """Accept or refuse one journalled message."""
        payload, properties = item.payload, item.properties
        if item.retain:
            await self._refuse(
                item,
                IngestError(
                    Reason.RETAINED,
                    "a retained message on alerts/in is replayed at every subscribe: "
                    "publish alerts without the retain flag",
                ),
            )
            return
        try:
            envelope = read_envelope(payload, self.admission.limits) if is_xml(payload) else None
            if envelope is not None:
                await self._judge_envelope(item, envelope)
                return
            request, alert, what = await self._admit(payload)
        except IngestError as e:
            await self._refuse(item, e)
            return
        await self._verdict(item.row, outcome="accepted", detail=what, alert_id=alert.id)
        self.respond(properties, self._accepted(request, alert, what))

    async def _admit(self, payload: bytes) -> tuple[AlertRequest, Alert, str]:
        """Parse, vouch for, scope and submit one alert (or update, or cancel); IngestError if refused.
        Returns the request, its alert and what it did (its msgType, or `update-ends`).

        An Update whose expires has passed ends the active alert of its sender it references."""
        try:
            request = self.admission.parse_upstream(payload)
        except EndingUpdate as ending:
            scope = self.upstream.scope(ending.request)
            alert = await self.admission.end_by_update(ending, scope=scope, payload=payload)
            return ending.request, alert, UPDATE_ENDS
        scope = self.upstream.scope(request)
        alert = await self.admission.submit(
            request, source="mqtt", actor=request.sender or "upstream", scope=scope, payload=payload
        )
        return request, alert, request.msg_type.value

    def _accepted(self, request: AlertRequest, alert: Alert, what: str) -> dict[str, Any]:
        return {
            "status": "accepted",
            "msg_type": what,
            "id": alert.id,
            "identifier": request.identifier,
            "state": alert.state.value,
            "state_topic": self.topics.alert_state(alert.id),
        }

    async def _judge_envelope(self, item: _Journalled, envelope: Envelope) -> None:
        """Judge each part of an EDXL-DE envelope on its own; one verdict row that lists them all."""
        accepted: list[str] = []
        said: list[str] = []
        for part in envelope.parts:
            where = {
                "distribution_id": envelope.distribution_id,
                "sender_id": envelope.sender_id,
                "part": part.index,
                "parts": len(envelope.parts),
                "path": part.path,
                "sha256": part.sha256,
            }
            try:
                if part.payload is None:
                    raise part.error or IngestError(Reason.SCHEMA, "no enclosed alert")
                request, alert, what = await self._admit(part.payload)
            except IngestError as e:
                detail = f"EDXL-DE {part.path}: {e.detail}"
                self.reject(item.payload, IngestError(e.reason, detail, e.identifier), item.properties, where)
                said.append(f"{part.path} rejected {e.reason.value}: {e.detail}")
                continue
            accepted.append(alert.id)
            said.append(f"{part.path} accepted {what} as {alert.id}")
            self.respond(item.properties, {**self._accepted(request, alert, what), "envelope": where})
        outcome = "rejected" if not accepted else "accepted" if len(accepted) == len(said) else "partial"
        log.info(
            "ingest.envelope",
            distribution_id=envelope.distribution_id,
            parts=len(envelope.parts),
            accepted=len(accepted),
            alert_ids=accepted,
        )
        head = f"EDXL-DE {envelope.distribution_id!r}, {len(envelope.parts)} part(s): "
        await self._verdict(
            item.row, outcome=outcome, detail=head + "; ".join(said), alert_id=",".join(accepted) or None
        )

    async def _refuse(self, item: _Journalled, err: IngestError) -> None:
        self.reject(item.payload, err, item.properties)
        await self._verdict(
            item.row, outcome="rejected", detail=f"{err.reason.value}: {err.detail}", alert_id=None
        )

    async def _verdict(self, row: int, *, outcome: str, detail: str, alert_id: str | None) -> None:
        try:
            await self._journal().mark_received(row, outcome=outcome, detail=detail, alert_id=alert_id)
        except JournalError as e:
            self.metrics.journal_failures.labels("verdict").inc()
            log.error("journal.verdict_failed", row=row, outcome=outcome, error=str(e))

    def reject(
        self, payload: bytes, err: IngestError, properties: Any = None, envelope: dict[str, Any] | None = None
    ) -> None:
        """Refuse a message (or, with `envelope`, one part of an EDXL-DE envelope): rejection topic,
        response topic, log, metric."""
        self.metrics.rejected.labels(err.reason.value).inc()
        doc: dict[str, Any] = {
            "reason": err.reason.value,
            "detail": err.detail,
            "identifier": err.identifier,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        if envelope is not None:
            doc["envelope"] = envelope
        self.link.enqueue(self.topics.rejected, json.dumps(doc, ensure_ascii=False).encode())
        self.recent_rejections.append({"at": time.time(), **doc})  # for the duty room's view
        self.respond(properties, {"status": "rejected", **doc})
        log.warning("ingest.rejected", reason=err.reason.value, detail=err.detail, identifier=err.identifier)

    def respond(self, properties: Any, doc: dict[str, Any]) -> None:
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
