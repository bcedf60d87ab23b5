"""The platform above, as ebcd sees it: packages judged in order, broadcasts reported up from the journal.

Theory of operation. A POST is journalled raw (`received`, source `ebd`) before anything looks at
it; then, one package at a time and in arrival order, it is unpacked, its signature verified, its
SRC checked against `upstream_code`, its EBDID claimed (a second package with the same EBDID is a
replay), and acted on; the verdict goes to the journal, the log, the metric and the answer (a
signed EBDResponse). A package journalled but not judged when ebcd stopped is judged at the next
start, before anything new. An EBM whose StartTime lies ahead keeps its verdict open until it
starts, so a restart judges it again and it still starts on time.

What goes up (state reports, logs, inventory, heartbeats) is `ebcd.platform.reporting`, through
the journal's outbox: a platform above that is down, or an ebcd that restarts, loses nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import structlog

from ebcd.admission.admission import Admission
from ebcd.admission.authority import AuthorityError, Scope, UpstreamAuthority
from ebcd.config import Config, UpstreamConfig, UpstreamSender
from ebcd.delivery.alerts import Alert
from ebcd.delivery.core import Core
from ebcd.delivery.runner import Runner
from ebcd.delivery.state import AState
from ebcd.ingest import IngestError, Reason
from ebcd.journal.journal import Journal, JournalError
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest
from ebcd.platform import reports
from ebcd.platform.mapping import to_request
from ebcd.platform.metrics import EbdMetrics
from ebcd.platform.reporting import Reporting
from ebcd.protocols.ebd import EbdError, ResultCode
from ebcd.protocols.ebd.documents import child_text, parse_ebm, response_body
from ebcd.protocols.ebd.envelope import Received, open_package, seal
from ebcd.protocols.ebd.package import tar_of_body
from ebcd.protocols.ebd.signature import TrustedKey, load_public_keys
from ebcd.security.signing import Signer
from ebcd.tiers.district import District

log = structlog.get_logger("ebcd.platform")

TOPIC_PREFIX = "ebd "  # received.topic: "ebd <content type>" (what judging needs again after a crash)
SCHEDULE_TICK_S = 0.25
LOOP_RESTART_S = 1.0
ENDED = frozenset({AState.COMPLETED, AState.PARTIAL, AState.CANCELLED, AState.EXPIRED, AState.REJECTED})


@dataclass(slots=True)
class _Waiting:
    """An EBM accepted for a StartTime ahead: submitted when it comes."""

    row: int
    ebdid: str
    request: AlertRequest
    scope: Scope
    starts_at: float
    ebdb: bytes


class EbdPlatform:
    """The EBD link with the platform above: judge what comes down; `up` reports what happens."""

    def __init__(
        self,
        *,
        config: Config,
        district: District,
        admission: Admission,
        runner: Runner,
        core: Core,
        metrics: Metrics,
        journal: Callable[[], Journal],
        signer: Signer | None,
    ) -> None:
        cfg = config.ebd
        assert cfg.upstream_code is not None  # noqa: S101 -- EbdConfig requires it with listen
        self.cfg = cfg
        self.config = config
        self.district = district
        self.admission = admission
        self.runner = runner
        self.core = core
        self.metrics = metrics
        ebd_metrics = self.ebd_metrics = EbdMetrics(metrics.registry)
        self._journal = journal
        self.signer = signer
        self.upstream_code: str = cfg.upstream_code
        self.zone = ZoneInfo(cfg.timezone)
        paths = [Path(p) if Path(p).is_absolute() else config.base_dir / p for p in cfg.verify_with]
        self.keys: list[TrustedKey] = load_public_keys(paths)
        sender = UpstreamSender(
            sender=self.upstream_code, levels=cfg.levels, event_types=cfg.event_types, area=cfg.area
        )
        try:
            self.authority = UpstreamAuthority(
                config.model_copy(update={"upstream": UpstreamConfig(senders=[sender])}), district
            )
        except AuthorityError as e:  # it names the entry as [[upstream.senders]] #1: say where it is
            raise AuthorityError(f"[ebd] levels/event_types/area: {e}") from None
        self.up = Reporting(
            cfg,
            upstream_code=self.upstream_code,
            district=district,
            runner=runner,
            core=core,
            metrics=metrics,
            ebd_metrics=ebd_metrics,
            journal=journal,
            signer=signer,
            keys=self.keys,
        )
        self.uplink = self.up.uplink
        self._lock = asyncio.Lock()  # one package judged at a time, in arrival order
        self._waiting: dict[str, _Waiting] = {}  # EBMID -> broadcast waiting for its StartTime
        self.started = asyncio.Event()
        if signer is None:
            log.warning(
                "ebd.unsigned",
                hint="[security] scheme = none: the platform above will refuse ebcd's packages as unsigned",
            )

    # -- life cycle ------------------------------------------------------------------------
    async def recover(self) -> None:
        """Outbox numbering, broadcasts still to report, and packages never judged (judged now, in order)."""
        journal = self._journal()
        await self.up.load()
        rows = await journal.unjudged(source="ebd")
        for r in rows:
            content_type = r.topic.removeprefix(TOPIC_PREFIX)
            async with self._lock:
                await self._judge(r.row_id, bytes(r.payload), content_type, too_large=None)
        if rows:
            log.warning("ebd.recovered", packages=len(rows), hint="journalled but not judged before the stop")
        await self.up.resume()
        self.started.set()

    async def run(self) -> None:
        """Send up, report, heartbeat and start waiting broadcasts, until cancelled."""
        loops = {
            "ebd-outbox": self.up.send_loop,
            "ebd-reports": self.up.report_loop,
            "ebd-heartbeat": self.up.heartbeat_loop,
            "ebd-terminal-states": self.up.terminal_loop,
            "ebd-start-times": self._start_loop,
        }
        try:
            async with asyncio.TaskGroup() as tg:
                for name, loop in loops.items():
                    tg.create_task(self._forever(name, loop), name=name)
        finally:
            await self.up.close()

    async def _forever(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop; if it fails (the journal, a bug), log it and start it again a second later:
        the link to the platform above never takes the daemon down with it."""
        while True:
            try:
                await loop()
                return
            except Exception:  # logged with its traceback, counted, retried; CancelledError passes
                self.ebd_metrics.loop_failures.labels(name).inc()
                log.exception("ebd.loop_failed", loop=name, retry_in_s=LOOP_RESTART_S)
                await asyncio.sleep(LOOP_RESTART_S)

    # -- what comes down -------------------------------------------------------------------
    async def receive(self, body: bytes, content_type: str, too_large: int | None = None) -> bytes:
        """One POST: journalled raw, judged in order, answered with a signed EBDResponse (a tar)."""
        try:
            row = await self._journal().record_received(
                TOPIC_PREFIX + content_type[:200], body, time.time(), source="ebd"
            )
        except JournalError as e:
            self.metrics.journal_failures.labels("received").inc()
            err = EbdError(
                ResultCode.OTHER, Reason.JOURNAL, f"could not journal the package: {e}; send it again"
            )
            self._count_refusal(err)
            return self.answer(None, err.code, err.detail, seq=0)
        async with self._lock:
            code, desc, their = await self._judge(row, body, content_type, too_large=too_large)
        return self.answer(their, code, desc, seq=2 * row + 1)

    def answer(self, their: str | None, code: ResultCode, desc: str, *, seq: int) -> bytes:
        """The EBDResponse tar answering a package (its EBDID in RelatedEBD when known)."""
        ebdid = self.up.ebdid(seq)
        return seal(self.signer, self.up.header(ebdid, "EBDResponse", their), response_body(code, desc))

    async def _judge(
        self, row: int, body: bytes, content_type: str, *, too_large: int | None
    ) -> tuple[ResultCode, str, str | None]:
        their: str | None = None
        try:
            if too_large is not None:
                raise EbdError(
                    ResultCode.OTHER,
                    Reason.TOO_LARGE,
                    f"request body larger than {too_large} bytes ([ebd] max_package_bytes)",
                )
            tar = tar_of_body(body, content_type)
            rec = open_package(
                tar, self.keys, max_files=self.cfg.max_files, max_bytes=self.cfg.max_package_bytes
            )
            h = rec.document.header
            their = h.ebdid
            if h.src != self.upstream_code:
                raise EbdError(
                    ResultCode.OTHER,
                    Reason.NOT_ALLOWED,
                    f"SRC/EBRID {h.src} is not the platform above ({self.upstream_code})",
                    their,
                )
            if h.dest and h.dest != self.district.code:
                raise EbdError(
                    ResultCode.OTHER,
                    Reason.NOT_ALLOWED,
                    f"DEST/EBRID {h.dest} is not this platform ({self.district.code})",
                    their,
                )
            first = await self._journal().ebd_claim(h.ebdid, row)
            if first is not None:
                raise EbdError(
                    ResultCode.OTHER,
                    Reason.REPLAYED,
                    f"EBDID {h.ebdid} was received before (journal row {first[0]}, "
                    f"{reports.local(first[1], self.zone)}): not judged again",
                    their,
                )
            desc, settled = await self._act(rec, row)
        except EbdError as e:
            await self._refuse(row, e)
            return e.code, e.detail, e.ebdid or their
        except IngestError as e:
            code = ResultCode.SIGNATURE_FAILURE if e.reason is Reason.BAD_SIGNATURE else ResultCode.OTHER
            err = EbdError(code, e.reason, e.detail, their)
            await self._refuse(row, err)
            return err.code, err.detail, their
        except JournalError as e:
            self.metrics.journal_failures.labels("received").inc()
            err = EbdError(ResultCode.OTHER, Reason.JOURNAL, f"could not journal: {e}; send it again", their)
            await self._refuse(row, err)
            return err.code, err.detail, their
        except Exception as e:  # a bug here must not stop the daemon, nor its next start (logged)
            log.exception("ebd.judge_failed", row=row, ebdid=their)
            err = EbdError(
                ResultCode.OTHER, Reason.UNSUPPORTED, f"ebcd could not judge the package: {e!r}"[:300], their
            )
            await self._refuse(row, err)
            return err.code, err.detail, their
        self.ebd_metrics.received.labels(str(int(ResultCode.OK))).inc()
        log.info("ebd.accepted", ebdid=their, type=rec.document.header.ebd_type, detail=desc)
        if settled:
            await self._verdict(row, "accepted", desc, None)
        return ResultCode.OK, desc, their

    def _count_refusal(self, err: EbdError) -> None:
        self.metrics.rejected.labels(err.reason.value).inc()
        self.ebd_metrics.received.labels(str(int(err.code))).inc()
        log.warning(
            "ebd.rejected",
            result_code=int(err.code),
            reason=err.reason.value,
            detail=err.detail,
            ebdid=err.ebdid,
        )

    async def _refuse(self, row: int, err: EbdError) -> None:
        self._count_refusal(err)
        await self._verdict(row, "rejected", f"{err.reason.value}: {err.detail}", None)

    async def _verdict(self, row: int, outcome: str, detail: str, alert_id: str | None) -> None:
        try:
            await self._journal().mark_received(row, outcome=outcome, detail=detail, alert_id=alert_id)
        except JournalError as e:
            self.metrics.journal_failures.labels("verdict").inc()
            log.error("journal.verdict_failed", row=row, outcome=outcome, error=str(e))

    async def _act(self, rec: Received, row: int) -> tuple[str, bool]:
        """Do what an accepted package asks; (what was done, whether the verdict is final now)."""
        h, body = rec.document.header, rec.document.body
        if h.ebd_type == "EBM":
            return await self._ebm(rec, row)
        if h.ebd_type == "EBMStateRequest":
            ebmid = (
                (child_text(body, "EBM", "EBMID") or child_text(body, "EBMID")) if body is not None else None
            )
            return await self._state_request(ebmid, h.ebdid), True
        if h.ebd_type == "OMDRequest":
            return await self._omd_request(rec), True
        if h.ebd_type in ("ConnectionCheck", "EBDResponse"):
            return f"{h.ebd_type} received", True
        raise EbdError(
            ResultCode.OTHER, Reason.UNSUPPORTED, f"ebcd does not act on EBDType {h.ebd_type}", h.ebdid
        )

    async def _ebm(self, rec: Received, row: int) -> tuple[str, bool]:
        ebdid = rec.document.header.ebdid
        ebm = parse_ebm(rec.document.body, ebdid)
        for aux in ebm.auxiliaries:
            if aux.desc.startswith("EBDR_") and aux.desc not in rec.package.resources:
                raise EbdError(
                    ResultCode.MISSING_CONTENT,
                    Reason.MISSING_CONTENT,
                    f"EBM {ebm.ebmid} names {aux.desc[:100]}, which the package does not hold",
                    ebdid,
                )
        mapped = to_request(
            ebm,
            sender=self.upstream_code,
            ebdid=ebdid,
            zone=self.zone,
            now=time.time(),
            district_area=self.district.area,
            default_ttl_s=self.config.delivery.default_ttl_s,
            start_slack_s=self.cfg.start_slack_s,
        )
        request = mapped.request
        scope = self.authority.scope(request)
        if ebm.msg_type == 2 and ebm.related_ebmid in self._waiting:
            gone = self._waiting.pop(ebm.related_ebmid)
            await self._verdict(
                gone.row, "rejected", f"cancelled before its StartTime by EBM {ebm.ebmid}", None
            )
            await self.up.enqueue(
                "EBMStateResponse",
                reports.waiting_state_response(
                    ebm.related_ebmid, 5, time.time(), self.zone, self.cfg.state_codes
                ),
            )
            return f"EBM {ebm.related_ebmid} cancelled before its StartTime", True
        if mapped.starts_at is not None:
            if ebm.ebmid in self._waiting or self.admission._seen((self.upstream_code, ebm.ebmid)):
                raise IngestError(Reason.DUPLICATE, f"EBM {ebm.ebmid} was accepted before", ebm.ebmid)
            self._waiting[ebm.ebmid] = _Waiting(
                row, ebdid, request, scope, mapped.starts_at, rec.package.ebdb
            )
            await self.up.enqueue(
                "EBMStateResponse",
                reports.waiting_state_response(ebm.ebmid, 1, time.time(), self.zone, self.cfg.state_codes),
            )
            return f"EBM {ebm.ebmid} waits for its StartTime {ebm.start} ({self.zone.key})", False
        alert = await self._submit(request, scope, rec.package.ebdb, ebm.ebmid)
        if ebm.msg_type == 2:
            return f"EBM {ebm.related_ebmid} (alert {alert.id}) cancelled", True
        kind = "drill (test broadcast)" if request.test else "broadcast"
        return f"EBM {ebm.ebmid} accepted as {kind} {alert.id} to {alert.targets} terminals", True

    async def _submit(self, request: AlertRequest, scope: Scope, ebdb: bytes, ebmid: str) -> Alert:
        actor = f"platform above {self.upstream_code}"
        alert = await self.admission.submit(request, source="ebd", actor=actor, scope=scope, payload=ebdb)
        if request.msg_type.value == "alert":
            await self.up.track(alert, ebmid)
        return alert

    async def _state_request(self, ebmid: str | None, ebdid: str) -> str:
        if not ebmid:
            raise EbdError(
                ResultCode.MISSING_CONTENT, Reason.MISSING_CONTENT, "EBMStateRequest names no EBMID", ebdid
            )
        if ebmid in self._waiting:
            await self.up.enqueue(
                "EBMStateResponse",
                reports.waiting_state_response(ebmid, 1, time.time(), self.zone, self.cfg.state_codes),
            )
            return f"state of EBM {ebmid} (waiting) sent up"
        for alert in self.runner.alerts.values():
            if alert.request.identifier == ebmid and alert.request.sender == self.upstream_code:
                await self.up.report(alert, ebmid, force=True)
                return f"state of EBM {ebmid} (alert {alert.id}) sent up"
        raise EbdError(ResultCode.OTHER, Reason.UNKNOWN_REFERENCE, f"no broadcast with EBMID {ebmid}", ebdid)

    async def _omd_request(self, rec: Received) -> str:
        body = rec.document.body
        wanted = ""
        if body is not None:
            wanted = child_text(body, "OMDType") or child_text(body, "RptType") or ""
        now = time.time()
        if wanted == "EBRDTInfo":
            await self.up.enqueue(
                "EBRDTInfo", reports.terminal_info(self.district.terminals(), now, self.zone)
            )
        elif wanted == "EBRDTState":
            states = {t.code: self.core.liveness.state(t.code).value for t in self.district.terminals()}
            await self.up.enqueue("EBRDTState", reports.terminal_state(states, now, self.zone))
        else:
            raise EbdError(
                ResultCode.OTHER,
                Reason.UNSUPPORTED,
                f"OMDRequest for {wanted[:40]!r}: ebcd answers EBRDTInfo and EBRDTState",
                rec.document.header.ebdid,
            )
        return f"{wanted} sent up"

    async def _start_loop(self) -> None:
        while True:
            await asyncio.sleep(SCHEDULE_TICK_S)
            now = time.time()
            for ebmid, w in list(self._waiting.items()):
                if w.starts_at > now:
                    continue
                del self._waiting[ebmid]
                async with self._lock:
                    await self._start_waiting(ebmid, w)

    async def _start_waiting(self, ebmid: str, w: _Waiting) -> None:
        ttl = w.request.ttl_s - max(0.0, time.time() - w.starts_at)
        request = w.request.model_copy(update={"ttl_s": max(ttl, 1.0)})
        try:
            alert = await self._submit(request, w.scope, w.ebdb, ebmid)
        except IngestError as e:
            self.metrics.rejected.labels(e.reason.value).inc()
            log.warning("ebd.start_refused", ebmid=ebmid, reason=e.reason.value, detail=e.detail)
            await self._verdict(w.row, "rejected", f"{e.reason.value}: {e.detail}", None)
            await self.up.enqueue(
                "EBMStateResponse",
                reports.waiting_state_response(
                    ebmid, 4, time.time(), self.zone, self.cfg.state_codes, e.detail[:200]
                ),
            )
            return
        log.info("ebd.started", ebmid=ebmid, alert_id=alert.id)
        await self._verdict(w.row, "accepted", f"EBM {ebmid} started as {alert.id}", alert.id)
