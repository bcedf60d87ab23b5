"""The daemon's answers on its control socket: the duty officer's requests, op by op.

`control.serve` frames the requests and knows the peer; this module decides what each op does.
send, cancel, approve, reject and resend are commands: journalled with who asked and refused outside the
operator's scope. status, list, watch, report, terminals and top only read the delivery core's state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import structlog

from ebcd.admission.admission import Admission
from ebcd.admission.authority import OperatorAuthority, Scope, as_room
from ebcd.admission.schedule import TestOutcome
from ebcd.config import DutyRoomConfig
from ebcd.control.duty import Links, Rejections, duty_doc
from ebcd.control.progress import progress_doc
from ebcd.control.requests import COMMANDS, RESEND_ONLY, Op, Request, parse
from ebcd.control.socket import ControlError, Peer
from ebcd.delivery.alerts import Alert, Delivery
from ebcd.delivery.core import Refused
from ebcd.delivery.runner import Runner
from ebcd.delivery.state import AState, Bucket, DState
from ebcd.ingest import IngestError, Reason
from ebcd.journal.attempts import RESENT_BY, attempt_history, ledger_link
from ebcd.journal.journal import Journal, JournalError
from ebcd.model.alert import AlertRequest
from ebcd.tiers.district import District
from ebcd.tiers.rollup import Tally

log = structlog.get_logger("ebcd.control")


class ControlHandler:
    """Answers control-socket requests from the engine's state, within each operator's scope."""

    def __init__(
        self,
        *,
        district: District,
        runner: Runner,
        admission: Admission,
        operators: OperatorAuthority,
        journal: Callable[[], Journal],
        stopping: asyncio.Event,
        test_outcomes: Mapping[str, TestOutcome],
        links: Links | None = None,
        rejections: Rejections | None = None,
        duty_room: DutyRoomConfig | None = None,
    ) -> None:
        self.district = district
        self.runner = runner
        self.admission = admission
        self.operators = operators
        self._journal = journal
        self.stopping = stopping
        self.test_outcomes = test_outcomes
        self.links = links
        self.rejections = rejections
        self.duty_room = duty_room or DutyRoomConfig()

    async def handle(self, req: dict[str, Any], peer: Peer) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """Answer one request: a document, or an async iterator of them (watch)."""
        request = parse(req)
        op = request.op
        if op in COMMANDS:
            return await self._command(request, peer)
        if op is Op.STATUS:
            return {"state": self._alert(request.id).state_doc(self.district, self.runner.clock())}
        if op is Op.LIST:
            now = self.runner.clock()
            return {"alerts": [a.state_doc(self.district, now) for a in self.runner.alerts.values()]}
        if op is Op.WATCH:
            return self.watch(self._alert(request.id))
        if op is Op.TOP:
            return self.top()
        if op is Op.REPORT:
            run = self._alert(request.id)
            report = self.report(run)
            await self._add_history(report, run)
            return report
        return {"terminals": self.terminals()}

    async def _command(self, request: Request, peer: Peer) -> dict[str, Any]:
        """send, cancel, approve, reject, resend: journalled with who asked, refused outside their scope."""
        journal = self._journal()
        op, token = request.op.value, request.token
        detail = request.detail()  # never journal a secret
        who = peer.user if token is None else f"{peer.user} (token)"
        log.info("control.command", op=op, user=who, uid=peer.uid, pid=peer.pid)
        try:
            await journal.record_audit(who, op, detail)
        except JournalError as e:  # nothing is done that the journal cannot remember
            log.error("control.journal_failed", op=op, user=who, error=str(e))
            raise ControlError("journal", f"the journal cannot be written, nothing was done: {e}") from None
        try:
            scope = self.operators.scope_of(uid=peer.uid, gid=peer.gid, user=peer.user, token=token)
            return await self._command_in_scope(request, scope, who)
        except IngestError as e:
            if e.reason is Reason.NOT_ALLOWED:
                log.warning("control.refused", op=op, user=who, uid=peer.uid, detail=e.detail)
                with contextlib.suppress(JournalError):  # the refusal stands either way
                    await journal.record_audit(
                        who, f"{op} refused", {**detail, "reason": e.reason.value, "detail": e.detail}
                    )
            raise ControlError(e.reason.value, e.detail) from None

    async def _command_in_scope(self, request: Request, scope: Scope, who: str) -> dict[str, Any]:
        now = self.runner.clock
        op = request.op
        if op is Op.SEND:
            if self.stopping.is_set():
                raise ControlError("stopping", "the daemon is stopping and takes no new alerts")
            try:
                asked = AlertRequest.model_validate(request.alert or {})
            except ValueError as e:
                raise ControlError("invalid", str(e)) from None
            alert = await self.admission.submit(as_room(asked, scope), source="cli", actor=who, scope=scope)
            return {"id": alert.id, "state": alert.state_doc(self.district, now())}
        alert = self._alert(request.id)
        scope.check(alert.deliveries, alert.request.identifier, f"{op} alerts of")
        try:
            if op is Op.RESEND:
                kinds = list(request.only or RESEND_ONLY)
                codes = await self.runner.resend(alert.id, kinds, f"{RESENT_BY}{who}")
                log.info("control.resent", alert_id=alert.id, user=who, only=kinds, terminals=len(codes))
                return {"state": alert.state_doc(self.district, now()), "resent": codes}
            if op is Op.CANCEL:
                await self.runner.cancel(alert.id, f"cancelled by {who}")
            elif op is Op.APPROVE:
                await self.runner.approve(alert.id)
            else:
                await self.runner.reject(alert.id, f"rejected in review by {who}")
        except Refused as e:
            raise ControlError(e.code, e.detail) from None
        except JournalError as e:
            raise ControlError("journal", f"could not journal the {op}: {e}") from None
        return {"state": alert.state_doc(self.district, now())}

    def _alert(self, alert_id: str | None) -> Alert:
        alert = self.runner.alerts.get(alert_id) if alert_id is not None else None
        if alert is None:
            raise ControlError("unknown_alert", f"no alert with id {alert_id!r} (ebcd alert list shows them)")
        return alert

    async def watch(self, run: Alert) -> AsyncIterator[dict[str, Any]]:
        """The alert's state now and at each change, until it settles (the last has more=False),
        with why its pending wait and the villages it names (`ebcd.control.progress`)."""
        q = self.runner.watch(run.id)
        try:
            doc = run.state_doc(self.district, self.runner.clock())
            while True:
                settled = run.state is not AState.DISPATCHING
                if settled:  # a queued state may predate the change that settled the alert
                    doc = run.state_doc(self.district, self.runner.clock())
                progress = progress_doc(run, self.district, self.runner.core.holders)
                yield {"state": doc, "more": not settled, "progress": progress}
                if settled:
                    return
                doc = await q.get()
        finally:
            self.runner.unwatch(run.id, q)

    async def top(self) -> AsyncIterator[dict[str, Any]]:
        """The duty room now, again at each publication of alert states, and at least every
        `[duty_room] refresh_s` (liveness and links change without one); until the client goes."""
        room = self.duty_room
        changed = self.runner.watch_room()
        try:
            while True:
                changed.clear()
                yield {
                    "room": duty_doc(
                        self.runner.core, self.district, self.runner.clock(), links=self.links,
                        rejections=self.rejections, recent_alerts=room.recent_alerts,
                    ),
                    "more": True,
                }  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(room.refresh_s):
                        await changed.wait()
                await asyncio.sleep(room.min_interval_s)  # at most a few snapshots a second
        finally:
            self.runner.unwatch_room(changed)

    def web_doc(self, alert_id: str | None) -> dict[str, Any]:
        """The wall screen's snapshot: the room, every terminal's liveness, and the picked alert's
        state per terminal (`alert_id`, else the newest in flight, else the newest)."""
        room = self.duty_room
        doc = duty_doc(
            self.runner.core, self.district, self.runner.clock(), links=self.links,
            rejections=self.rejections, recent_alerts=room.recent_alerts,
        )  # fmt: skip
        alert = self.runner.alerts.get(alert_id) if alert_id else None
        if alert is None and doc["alerts"]:
            alert = self.runner.alerts.get(doc["alerts"][0]["state"]["id"])
        live = self.runner.core.liveness
        selected = None
        if alert is not None:
            state = alert.state_doc(self.district, self.runner.clock())
            selected = {k: state[k] for k in ("id", "state", "coverage", "towns", "acked", "targets")}
            selected["buckets"] = alert.buckets()
        return {
            "room": doc,
            "liveness": {t.code: live.state(t.code).value for t in self.district.terminals()},
            "selected": selected,
        }

    def report(self, run: Alert) -> dict[str, Any]:
        """The alert's state, tallies per town and village, and every terminal that did not ack."""
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
        live = self.runner.core.liveness
        for code, d in run.deliveries.items():
            if d.bucket is not Bucket.ACKED:
                term = self.district.terminal(code)
                problems.append(
                    {
                        "terminal": code,
                        "name": term.name if term else "",
                        "state": d.state.value,
                        "cause": self._cause(alert_id=run.id, code=code, d=d),
                        "attempts": d.attempts,
                        "liveness": live.state(code).value,
                        "room": term.room if term else None,  # its village (or town) room
                    }
                )
        report: dict[str, Any] = {
            "state": run.state_doc(self.district, self.runner.clock()),
            "towns": towns,
            "problems": problems,
            "buckets": buckets,  # terminal -> how it counts, for the map
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

    async def _add_history(self, report: dict[str, Any], run: Alert) -> None:
        """`history`: the attempts (ebcd.journal.attempts) of every terminal without acknowledgement
        or resent (none from a daemon without a journal); `history_error` if it cannot be read."""
        journal = self._journal()
        problems = {p["terminal"] for p in report["problems"]}
        try:
            await journal.flush()
            rows = await journal.history(run.id)
        except JournalError as e:
            log.warning("control.history_unavailable", alert_id=run.id, error=str(e))
            report["history"], report["history_error"] = {}, f"the journal cannot be read: {e}"
            return
        history = attempt_history(rows, ledger_link(self.district))
        report["history"] = {code: h for code, h in history.items() if code in problems or h["resent"]}

    def _cause(self, *, alert_id: str, code: str, d: Delivery) -> str | None:
        """Why a delivery stands where it does; for one that waits, what holds the terminal now
        (the holder changes as terminals are released, the delivery is not touched until then)."""
        if d.state not in (DState.WAITING, DState.PREEMPTED):
            return d.cause
        holder = self.runner.core.holders.holder_of(code)
        free = holder is None or holder == alert_id
        now = "the terminal is free" if free else f"the terminal plays alert {holder}"
        if d.state is DState.PREEMPTED:
            return f"{d.cause}; {now}" if d.cause else now
        return f"waiting: {now}"

    def terminals(self) -> list[dict[str, Any]]:
        """Every terminal of the district with its place, link, liveness and when it was last heard."""
        out = []
        now = self.runner.clock()
        for t in self.district.terminals():
            live = self.runner.core.liveness.terminals[t.code]
            never = live.session < 0 and live.last_seen == 0.0  # not heard since the daemon started
            out.append(
                {
                    "code": t.code,
                    "name": t.name,
                    "town": t.town,
                    "village": t.village,
                    "link": t.link,
                    "state": live.state.value,
                    "session": live.session,
                    "last_seen_s": None if never else round(max(0.0, now - live.last_seen), 1),
                }
            )
        return out
