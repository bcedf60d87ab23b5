"""The invariants of the delivery simulation, checked after every step (`Checks`, mixed into Sim).

1. no (alert, revision) is commanded to a terminal after it reported it done (or was told to stop
   it); every command goes to a target of the current revision that is not finished;
2. every delivery with work ahead has a live timer, or waits (queued) on a named holder; PENDING
   only while its alert waits for approval;
3. every alert is settled and closed by its time to live;
4. the counts add up to the targets and match a recount; acked never falls within a revision, and
   every acknowledgement the core applied is counted;
5. a terminal is held by at most one broadcast, whose delivery holds it and whose rank is at least
   that of every alert waiting for it; what it was last sent is what holds it;
6. a rebuild from the journal gives the same alerts and deliveries (timers may differ);
and at the end of a run (`check_healed`), once the network is healed: every target acknowledged,
and every broadcast played to its end on every terminal ebcd never believed gone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ebcd.delivery.alerts import Alert, Delivery
from ebcd.delivery.core import Core, Policy
from ebcd.delivery.records import DeliveryRecord, Play
from ebcd.delivery.state import AState, Bucket, DState, Progress
from ebcd.tiers.rollup import Tally

if TYPE_CHECKING:
    from tests.delivery.sim import Key, Terminal


class _TownOf(dict[str, str]):
    """Simulated terminals in three made-up towns, by a fixed rule on their codes."""

    def __missing__(self, code: str) -> str:
        return f"town-{sum(map(ord, code)) % 3}"

    def get(self, code: str, default: str | None = None) -> str:  # type: ignore[override]
        return self[code]


TOWN_OF = _TownOf()


class Broken(AssertionError):
    """An invariant does not hold."""


@dataclass
class Snapshot:
    """What a rebuild must give back: alerts and deliveries (timers may differ)."""

    alerts: dict[str, tuple[Any, ...]]
    deliveries: dict[tuple[str, str], tuple[Any, ...]]
    holders: dict[str, str | None]


def snapshot(core: Core) -> Snapshot:
    """The comparable state of a core."""
    alerts = {}
    deliveries = {}
    for a in core.alerts.values():
        alerts[a.id] = (a.state, a.revision, a.closed, dict(a.counts), a.targets, a.open, a.reason)
        for d in a.deliveries.values():
            deliveries[(a.id, d.terminal)] = (
                d.state, d.progress, d.acked, d.finished, d.resume, d.attempts, d.budget_base, d.cause,
                d.state is DState.UNCERTAIN and d.due is not None,  # a retry armed
                d.state is DState.ACKNOWLEDGED and d.due is not None,  # still holding (playing)
            )  # fmt: skip
    held = core.holders.held()
    # A terminal that went away is released at once although an attempt to it is still in
    # flight; liveness is not journalled, so a rebuild may give that attempt the terminal back.
    adrift = {
        d.terminal
        for a in core.alerts.values()
        if not a.closed
        for d in a.deliveries.values()
        if d.holds and held.get(d.terminal) != a.id
    }
    return Snapshot(alerts, deliveries, {t: held.get(t) for t in core.liveness.terminals if t not in adrift})


def diff(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs between two snapshots, readably."""
    out = []
    for name in ("alerts", "deliveries", "holders"):
        b, a = getattr(before, name), getattr(after, name)
        for k in sorted(set(b) & set(a) if name == "holders" else set(b) | set(a), key=str):
            if b.get(k) != a.get(k):
                out.append(f"{name}[{k}]: before {b.get(k)} after {a.get(k)}")
    return out


class Checks:
    """The checks, over the driver's state (declared here, kept by `Sim`)."""

    core: Core
    now: float
    step_no: int
    policy: Policy
    terms: dict[str, Terminal]
    dirty: set[str]
    expiry: dict[str, float]
    since: dict[str, float]
    done: set[tuple[str, int, str]]
    stopped: set[tuple[str, int, str]]
    acks: set[tuple[str, int, str]]
    ambiguous: set[tuple[str, int, str]]
    acked_max: dict[Key, int]
    last_play: dict[str, Key]
    attempts: Counter[tuple[str, int, str]]
    plays: list[tuple[float, Play]]
    stats: Counter[str]
    journal_deliveries: dict[str, dict[str, DeliveryRecord]]

    def fail(self, why: str) -> Broken:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def check_play(self, p: Play) -> None:
        self.plays.append((self.now, p))
        alert = self.core.alerts[p.alert_id]
        if p.revision != alert.revision or alert.closed or alert.state is AState.PENDING_APPROVAL:
            raise self.fail(f"{p} for alert in {alert.state} revision {alert.revision} closed={alert.closed}")
        for code in p.terminals:
            key3 = (p.alert_id, p.revision, code)
            if key3 in self.done:
                raise self.fail(f"{p}: {code} already reported {p.alert_id}/{p.revision} done")  # 1
            if key3 in self.stopped:
                raise self.fail(f"{p}: {code} was told to stop {p.alert_id}/{p.revision}")
            d = alert.deliveries.get(code)
            if d is None or d.finished:
                raise self.fail(f"{p}: {code} is not a target, or its delivery is finished: {d}")
            self.last_play[code] = (p.alert_id, p.revision)
            self.stats["resumed" if p.resume else "sent"] += 1
            self.attempts[key3] += 1
        self.stats["plays"] += len(p.terminals)

    def check(self) -> None:
        """Every invariant, after a step (closed alerts only when they changed)."""
        self.flush()
        core = self.core
        live_timers = {(alert_id, code, gen) for due, _, alert_id, code, gen in core._timers}
        held = core.holders.held()
        waiting: dict[str, list[Alert]] = {}
        for alert in core.alerts.values():
            if alert.closed and alert.id not in self.dirty and self.step_no % 8:
                continue
            self.check_alert(alert, live_timers)
            if alert.closed:
                continue
            for d in alert.deliveries.values():
                if d.state in (DState.WAITING, DState.PREEMPTED) and not d.finished:
                    waiting.setdefault(d.terminal, []).append(alert)
                if d.holds and held.get(d.terminal) != alert.id and d.state is DState.ACKNOWLEDGED:
                    raise self.fail(f"{alert.id}/{d.terminal} plays ({d.state}) but does not hold it")
        for code, holder_id in held.items():  # 5
            holder = core.alerts.get(holder_id)
            hd = holder.deliveries.get(code) if holder else None
            if holder is None or holder.closed or hd is None or not hd.holds:
                raise self.fail(f"{code} is held by {holder_id}, whose delivery does not hold it: {hd}")
            for w in waiting.get(code, ()):
                if w.rank > holder.rank:
                    raise self.fail(f"{w.id} {w.rank} waits for {code} held by the lower {holder_id}")
        self.dirty.clear()
        for code, key in self.last_play.items():
            if (owner := held.get(code)) is not None:
                hd = core.alerts[owner].deliveries[code]
                rev = core.alerts[owner].revision
                if hd.state is DState.SENT and key != (owner, rev):
                    raise self.fail(f"{code} is held by {owner}/{rev} (sent) but was last sent {key}")

    def check_alert(self, alert: Alert, live_timers: set[tuple[str, str | None, int]]) -> None:
        # recount what changed in this step, and everything now and then (a change that bypassed
        # the core's one door would not mark its alert changed)
        if alert.id in self.dirty or self.step_no % 8 == 0:
            self.check_counts(alert)
        if self.now >= self.expiry[alert.id] + 1e-6 and (  # 3
            not alert.closed or alert.state in (AState.DISPATCHING, AState.PENDING_APPROVAL)
        ):
            raise self.fail(f"{alert.id} is {alert.state} closed={alert.closed} past its time to live")
        if alert.closed:
            for d in alert.deliveries.values():
                if d.due is not None or d.state in (
                    DState.PENDING,
                    DState.WAITING,
                    DState.SENT,
                    DState.PREEMPTED,
                ):
                    raise self.fail(f"{alert.id} is closed but {d.terminal} has work: {d}")
            return
        if (alert.id, None, alert.gen) not in live_timers:
            raise self.fail(f"{alert.id} has no time-to-live timer")
        pending = alert.state is AState.PENDING_APPROVAL
        for d in alert.deliveries.values():
            self.check_delivery(alert, d, pending, live_timers)
        if not pending:
            all_acked = alert.counts[Bucket.ACKED] == alert.targets
            want = AState.DISPATCHING if alert.open else AState.COMPLETED if all_acked else AState.PARTIAL
            if alert.state is not want:
                raise self.fail(f"{alert.id} is {alert.state}, its deliveries say {want}: {alert.counts}")

    def check_counts(self, alert: Alert) -> None:
        counts: Counter[Bucket] = Counter(d.bucket for d in alert.deliveries.values())
        if any(alert.counts[b] != counts[b] for b in Bucket):  # 4
            raise self.fail(f"{alert.id} counts {alert.counts} but its deliveries count {dict(counts)}")
        if sum(alert.counts.values()) != alert.targets:
            raise self.fail(f"{alert.id} counts {alert.counts} for {alert.targets} targets")
        towns: dict[str, Tally] = {}  # the roll-up by town, kept from the moves, against a recount
        for code, d in alert.deliveries.items():
            towns.setdefault(TOWN_OF[code], Tally()).add(d.bucket.value)
        if (kept := alert.town_tallies(TOWN_OF)) != towns:
            raise self.fail(f"{alert.id} rolls up to {kept} by town, its deliveries to {towns}")
        opened = sum(d.open for d in alert.deliveries.values())
        if alert.open != opened:
            raise self.fail(f"{alert.id} keeps open={alert.open} but {opened} deliveries are open")
        key = (alert.id, alert.revision)
        acked = alert.counts[Bucket.ACKED]
        if acked < self.acked_max.get(key, 0):
            raise self.fail(f"{alert.id} acked fell from {self.acked_max[key]} to {acked}")
        self.acked_max[key] = acked
        for d in alert.deliveries.values():
            if (alert.id, alert.revision, d.terminal) in self.acks and not d.acked:
                raise self.fail(f"{alert.id}/{d.terminal} acknowledged, yet not acked: {d}")
        for code, r in self.journal_deliveries.get(alert.id, {}).items():  # the journal's rows
            d = alert.deliveries.get(code)
            if (d is None and not r.left) or (d is not None and r != d.record(alert.id, alert.revision)):
                raise self.fail(f"the journal's row of {alert.id}/{code} is {r}, the delivery {d}")

    def check_delivery(
        self, alert: Alert, d: Delivery, pending: bool, live_timers: set[tuple[str, str | None, int]]
    ) -> None:
        where = f"{alert.id}/{d.terminal} {d.state}"
        if pending != (d.state is DState.PENDING):  # 2
            raise self.fail(f"{where} in an alert {alert.state}")
        if d.due is not None and (alert.id, d.terminal, d.gen) not in live_timers:
            raise self.fail(f"{where} due {d.due} has no live timer")
        if d.state is DState.SENT and d.due is None:
            raise self.fail(f"{where} without an acknowledgement timer")
        if d.state in (DState.WAITING, DState.PREEMPTED) and not d.finished:
            holder_id = self.core.holders.holder_of(d.terminal)
            if holder_id is None or holder_id == alert.id:
                raise self.fail(f"{where} waits for nobody (holder {holder_id})")
            if alert.id not in set(self.core.holders.waiters(d.terminal)):
                raise self.fail(f"{where} is not queued for {d.terminal}")

    def check_healed(self) -> None:
        """After the network healed and every terminal came back: nothing may be left undone."""
        for alert in self.core.alerts.values():
            if alert.closed or alert.state is AState.PENDING_APPROVAL:
                continue
            for d in alert.deliveries.values():
                if d.state is DState.CANCELLED:
                    continue  # pre-empted under policy "end"
                if not d.acked:
                    raise self.fail(f"healed, yet {alert.id}/{d.terminal} is not acknowledged: {d}")
                t = self.terms[d.terminal]
                key = (alert.id, alert.revision)
                undisturbed = t.disturbed_at < self.since[alert.id]
                stale = (alert.id, alert.revision, d.terminal) in self.ambiguous
                unfinished = key not in t.done and t.playing != key and d.progress is not Progress.STOPPED
                if self.policy.preempted == "resume" and undisturbed and not stale and unfinished:
                    raise self.fail(f"healed, yet {d.terminal} never played {key} to the end: {d}")
