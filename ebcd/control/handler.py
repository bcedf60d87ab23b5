"""The daemon's answers on its control socket: the duty officer's requests, op by op.

`control.serve` frames the requests and knows the peer; this module decides what each op does.
send, cancel, approve and reject are commands: journalled with who asked and refused outside the
operator's scope. status, list, watch, report and terminals only read the engine's state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import structlog

from ebcd.admission.admission import Admission
from ebcd.admission.authority import OperatorAuthority, Scope, as_room
from ebcd.admission.schedule import TestOutcome
from ebcd.alert_run import AlertRun, AlertState
from ebcd.control.socket import ControlError, Peer
from ebcd.delivery import DState
from ebcd.engine import Engine
from ebcd.ingest import IngestError, Reason
from ebcd.journal.journal import Journal
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
        engine: Engine,
        admission: Admission,
        operators: OperatorAuthority,
        journal: Callable[[], Journal],
        stopping: asyncio.Event,
        test_outcomes: Mapping[str, TestOutcome],
    ) -> None:
        self.district = district
        self.engine = engine
        self.admission = admission
        self.operators = operators
        self._journal = journal
        self.stopping = stopping
        self.test_outcomes = test_outcomes

    async def handle(self, req: dict[str, Any], peer: Peer) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """Answer one request: a document, or an async iterator of them (watch)."""
        op = req["op"]
        if op in ("send", "cancel", "approve", "reject"):
            return await self._command(op, req, peer)
        if op == "status":
            return {"state": self._run(req).state_doc(self.district, self.engine.clock())}
        if op == "list":
            now = self.engine.clock()
            return {"alerts": [r.state_doc(self.district, now) for r in self.engine.runs.values()]}
        if op == "watch":
            return self.watch(self._run(req))
        if op == "report":
            return self.report(self._run(req))
        if op == "terminals":
            return {"terminals": self.terminals()}
        raise ControlError("bad_request", f"unknown op {op!r}")

    async def _command(self, op: str, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """send, cancel, approve, reject: journalled with who asked, refused outside their scope."""
        journal = self._journal()
        token = req.get("token")
        detail = {k: v for k, v in req.items() if k not in ("op", "token")}  # never journal a secret
        who = peer.user if token is None else f"{peer.user} (token)"
        log.info("control.command", op=op, user=who, uid=peer.uid, pid=peer.pid)
        await journal.record_audit(who, op, detail)
        try:
            scope = self.operators.scope_of(
                uid=peer.uid, gid=peer.gid, user=peer.user, token=token if isinstance(token, str) else None
            )
            return await self._command_in_scope(op, req, scope, who)
        except IngestError as e:
            if e.reason is Reason.NOT_ALLOWED:
                log.warning("control.refused", op=op, user=who, uid=peer.uid, detail=e.detail)
                await journal.record_audit(
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
            run = await self.admission.submit(as_room(request, scope), source="cli", actor=who, scope=scope)
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

    async def watch(self, run: AlertRun) -> AsyncIterator[dict[str, Any]]:
        """The alert's state now and at each change, until it settles (the last has more=False)."""
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

    def report(self, run: AlertRun) -> dict[str, Any]:
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

    def terminals(self) -> list[dict[str, Any]]:
        """Every terminal of the district with its place, link and liveness."""
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
