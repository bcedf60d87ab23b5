"""The issue's findings, each replayed against the pure core with the simulated fleet.

Each test scripts its workload on `tests.delivery.sim.Sim` (a perfect network unless it says
otherwise), which also checks every invariant of the simulation after each action. Each one also
runs against a naive variant of the core (one rule changed, as the engine of the issue had it)
and must fail there: `xfail(strict=True)` turns a naive engine passing into a failure.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from ebcd.delivery.core import AlertSpec, Core, Policy, Refused
from ebcd.delivery.preemption import Holders
from ebcd.delivery.records import Play
from ebcd.delivery.state import AState, Bucket, DState, Progress
from ebcd.model.alert import AlertRequest, CodeTarget, Origin
from ebcd.model.backoff import Backoff
from ebcd.protocols.messages import AckStatus, Liveness, TerminalPresence, TerminalReport
from tests.delivery.sim import ROOMS, Scenario, Sim

PERFECT = Scenario(terminals=8, loss_pct=0, dup_pct=0, delay_pct=0, refuse_pct=0, fail_pct=0)

EMERGENCY, DAILY, TEST = "11B03", "20000", "00000"
FAILURES = (AssertionError, pytest.fail.Exception)  # what a naive engine must raise: a failed check


# -- naive engines: the core with one rule as the engine had it ----------------------
class DoneStillPlays(Core):
    """Naive: `done` does not free the terminal; the broadcast holds it until its play hold ends."""

    def _acknowledged(self, alert: Any, d: Any, progress: Progress, now: float) -> None:
        super()._acknowledged(alert, d, Progress.PLAYING if progress is Progress.DONE else progress, now)


class UncertainHolds(Core):
    """Naive: an unanswered terminal "may well be playing", so it stays held until the alert ends."""

    def _release(self, code: str, alert_id: str) -> None:
        alert = self.alerts[alert_id]
        d = alert.deliveries.get(code)
        if d is None or d.state is not DState.UNCERTAIN or alert.closed:
            super()._release(code, alert_id)


class CancelRewrites(Core):
    """Naive: a cancel makes every delivery cancelled, acknowledged or not."""

    def cancel(self, alert_id: str, why: str, now: float) -> Any:
        alert = super().cancel(alert_id, why, now)
        for d in alert.deliveries.values():
            d.acked, d.state = False, DState.CANCELLED
        alert.counts = {b: sum(d.bucket is b for d in alert.deliveries.values()) for b in Bucket}
        return alert


class CancelAnything(Core):
    """Naive: cancelling an alert whose time to live is over quietly succeeds."""

    def cancel(self, alert_id: str, why: str, now: float) -> Any:
        alert = self._get(alert_id)
        return alert if alert.closed else super().cancel(alert_id, why, now)


class StackHolders(Holders):
    def wait(self, terminal: str, alert_id: str, alert_rank: tuple[int, ...], order: int) -> None:
        super().wait(terminal, alert_id, alert_rank, -order)


class LastComeFirst(Core):
    """Naive: among equal alerts, the one accepted last gets a free terminal first (a stack)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holders = StackHolders()

    @staticmethod
    def _before(a: Any, b: Any) -> bool:
        return bool((a.rank, a.order) > (b.rank, b.order))


def naive(engine: type[Core]) -> Any:  # (a ParameterSet)
    return pytest.param(engine, id=engine.__name__, marks=pytest.mark.xfail(strict=True, raises=FAILURES))


def engines(*naive_ones: type[Core]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("engine", [pytest.param(Core, id="core"), *map(naive, naive_ones)])


def request(
    event_type: str = DAILY, level: int = 3, *, ttl_s: float = 600.0, origin: Origin = Origin.DISTRICT
) -> AlertRequest:
    return AlertRequest(
        level=level,
        event_type=event_type,
        targets=[CodeTarget(kind="all")],
        text="测试广播",
        test=event_type == TEST,
        ttl_s=ttl_s,
        origin=origin,
        origin_room=ROOMS.get(origin),
    )


def plays_of(sim: Sim, alert_id: str, since: float = float("-inf")) -> list[Play]:
    return [p for at, p in sim.plays if p.alert_id == alert_id and at >= since]


def counts(sim: Sim, alert_id: str) -> dict[str, int]:
    return {b.value: n for b, n in sim.core.alerts[alert_id].counts.items()}


@engines(DoneStillPlays)
def test_f1_a_finished_broadcast_is_never_played_again(engine: type[Core]) -> None:
    sim = Sim(PERFECT._replace(play_ms=1000), engine=engine)
    a = sim.accept(request(DAILY, 4))
    sim.advance(3.0)
    alert_a = sim.core.alerts[a]
    assert alert_a.state is AState.COMPLETED
    assert all(d.progress is not None and d.finished for d in alert_a.deliveries.values())
    done_at = sim.now

    b = sim.accept(request(EMERGENCY, 1), sim.codes[:4])  # higher: it would pre-empt A if A still held
    assert [p.terminals for p in plays_of(sim, b)] == [tuple(sim.codes[:4])]  # at once, nothing to wait for
    sim.advance(30.0)

    assert sim.core.alerts[b].state is AState.COMPLETED
    assert plays_of(sim, a, since=done_at) == []  # never sent again, neither resumed nor re-played
    assert alert_a.state is AState.COMPLETED
    assert alert_a.counts[Bucket.ACKED] == alert_a.targets == len(sim.codes)
    assert all(d.state is DState.ACKNOWLEDGED for d in alert_a.deliveries.values())


@engines(DoneStillPlays)
def test_f1_what_a_preemption_interrupted_resumes_and_only_that(engine: type[Core]) -> None:
    """A higher alert arrives while A plays on some terminals and has finished on others."""
    sim = Sim(PERFECT._replace(play_ms=3000), engine=engine)
    a = sim.accept(request(DAILY, 4), sim.codes[:4])
    sim.advance(4.0)  # finished on the first four
    late = sim.accept(request(DAILY, 4), sim.codes[4:])
    sim.advance(1.0)  # playing on the other four
    b = sim.accept(request(EMERGENCY, 1))
    start_b = sim.now
    sim.advance(60.0)

    assert plays_of(sim, a, since=start_b) == []
    resumed = plays_of(sim, late, since=start_b)  # each as soon as B is done on its terminal
    assert sorted(c for p in resumed for c in p.terminals) == sim.codes[4:]
    assert all(p.resume for p in resumed)
    for alert_id in (a, late, b):
        assert sim.core.alerts[alert_id].state is AState.COMPLETED
    assert all((late, 1) in sim.terms[c].done for c in sim.codes[4:])  # played to the end, once


@engines(UncertainHolds)
def test_f2_an_alert_to_terminals_that_are_down_does_not_hold_them(engine: type[Core]) -> None:
    sim = Sim(PERFECT._replace(ack_timeout_ms=1000, max_attempts=2), engine=engine)
    down = sim.codes[:3]
    for code in down:  # they die; their last wills reach ebcd
        sim.terms[code].online = False
        sim.send(TerminalPresence(code, Liveness.OFFLINE, sim.terms[code].session), sim.now)
    sim.advance(1.0)

    a = sim.accept(request(DAILY, 3))
    sim.advance(30.0)  # every attempt to the dead ones goes unanswered
    alert_a = sim.core.alerts[a]
    assert alert_a.state is AState.PARTIAL
    assert counts(sim, a) == {"acked": 5, "failed": 0, "uncertain": 3, "pending": 0, "cancelled": 0}
    assert all(alert_a.deliveries[c].attempts == 2 for c in down)  # retries exhausted

    b = sim.accept(request(DAILY, 3))  # same priority, accepted later: it would wait if A still held them
    first = plays_of(sim, b)
    assert len(first) == 1
    assert set(first[0].terminals) == set(sim.codes)  # sent at once, to the dead ones too
    assert not [d for d in sim.core.alerts[b].deliveries.values() if d.state is DState.WAITING]


@engines(CancelRewrites)
def test_f3_cancel_keeps_what_was_acknowledged_and_counts_the_rest_cancelled(engine: type[Core]) -> None:
    sim = Sim(PERFECT, engine=engine)
    for code in sim.codes[5:]:  # these never answer in time (they went silently away)
        sim.terms[code].online = False
    a = sim.accept(request(DAILY, 3))
    sim.advance(0.3)
    alert = sim.core.alerts[a]
    acked_before = alert.counts[Bucket.ACKED]
    assert 0 < acked_before < alert.targets

    sim.core.cancel(a, "cancelled by the duty officer", sim.now)
    sim.handle()
    sim.check()
    assert alert.state is AState.CANCELLED
    assert alert.counts[Bucket.ACKED] == acked_before
    assert alert.counts[Bucket.CANCELLED] == alert.targets - acked_before
    assert alert.counts[Bucket.PENDING] == alert.counts[Bucket.UNCERTAIN] == alert.counts[Bucket.FAILED] == 0
    sim.advance(10.0)  # late acknowledgements of attempts that went out may add, never take away
    assert alert.counts[Bucket.ACKED] >= acked_before
    assert alert.counts[Bucket.ACKED] + alert.counts[Bucket.CANCELLED] == alert.targets


@engines(CancelRewrites)
def test_f3_cancelling_a_completed_alert_keeps_its_coverage(engine: type[Core]) -> None:
    sim = Sim(PERFECT._replace(play_ms=500), engine=engine)
    a = sim.accept(request(DAILY, 3, ttl_s=120))
    sim.advance(5.0)
    alert = sim.core.alerts[a]
    assert alert.state is AState.COMPLETED

    sim.core.cancel(a, "cancelled after the fact", sim.now)
    sim.handle()
    sim.advance(1.0)
    assert alert.state is AState.CANCELLED
    assert counts(sim, a) == {"acked": 8, "failed": 0, "uncertain": 0, "pending": 0, "cancelled": 0}
    assert alert.counts[Bucket.ACKED] / alert.targets == 1.0  # coverage


@engines(CancelAnything)
def test_f3_cancelling_a_closed_alert_is_refused(engine: type[Core]) -> None:
    sim = Sim(PERFECT, engine=engine)
    a = sim.accept(request(DAILY, 3, ttl_s=15))
    sim.advance(20.0)
    assert sim.core.alerts[a].closed
    with pytest.raises(Refused) as refused:
        sim.core.cancel(a, "too late", sim.now)
    assert refused.value.code == "ended"
    assert sim.core.alerts[a].state is AState.COMPLETED


@engines(DoneStillPlays)
def test_f7_alerts_three_seconds_apart_each_complete_within_seconds(engine: type[Core]) -> None:
    sim = Sim(PERFECT._replace(play_ms=200), engine=engine)
    sent: dict[str, float] = {}
    for _ in range(12):
        alert_id = sim.accept(request(DAILY, 3))
        sent[alert_id] = sim.now
        sim.advance(3.0)
    sim.advance(5.0)
    for alert_id, at in sent.items():
        completed = sim.settled_at(alert_id, AState.COMPLETED)
        assert completed is not None, f"{alert_id} is {sim.core.alerts[alert_id].state}"
        assert completed - at < 1.5
    waiting = [
        (a.id, d.terminal)
        for a in sim.core.alerts.values()
        for d in a.deliveries.values()
        if d.state in (DState.WAITING, DState.PREEMPTED)
    ]
    assert waiting == []


@engines(LastComeFirst)
def test_f8_same_level_alerts_complete_in_order_one_play_time_apart(engine: type[Core]) -> None:
    play_s = 2.0
    sim = Sim(PERFECT._replace(play_ms=int(play_s * 1000)), engine=engine)
    ids = []
    for _ in range(5):
        ids.append(sim.accept(request(DAILY, 3)))
        sim.advance(0.5)
    sim.advance(20.0)
    completed = [sim.settled_at(i, AState.COMPLETED) for i in ids]
    assert None not in completed
    times = [t for t in completed if t is not None]
    assert times == sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(play_s - 0.5 < g < play_s + 0.7 for g in gaps), gaps
    for alert_id in ids:  # each waited, and was sent once to each terminal, when it was free
        sent_to = [c for p in plays_of(sim, alert_id) for c in p.terminals]
        assert sorted(sent_to) == sim.codes


class Counting(Core):
    """The core, counting its moves and how often it looks at a waiting alert."""

    moves = 0
    looks = 0

    def _move(self, *args: Any, **kwargs: Any) -> bool:
        Counting.moves += 1
        return super()._move(*args, **kwargs)

    def _waits(self, *args: Any, **kwargs: Any) -> bool:
        Counting.looks += 1
        return super()._waits(*args, **kwargs)


class ScansWaiters(Counting):
    """Naive: every release looks at every alert still targeting the terminal."""

    def _finish(self, now: float) -> None:
        for code in self._freed:
            for alert_id in self._by_terminal.get(code, ()):
                self._waits(alert_id, self.alerts[alert_id].rank, code=code, now=now)
        super()._finish(now)


@pytest.mark.parametrize(
    ("engine", "n_alerts", "rounds"),
    [
        pytest.param(Counting, 1000, 20, id="core"),
        pytest.param(
            ScansWaiters, 60, 3, id="ScansWaiters",
            marks=pytest.mark.xfail(strict=True, raises=FAILURES),
        ),
    ],
)  # fmt: skip
def test_f8_waiting_costs_nothing_until_the_terminal_is_released(
    engine: type[Counting], n_alerts: int, rounds: int
) -> None:
    """1,000 alerts for 769 terminals in a burst: each delivery moves once to wait, then once per
    release of its terminal, however many alerts wait behind it (no scan, no re-ranking)."""
    n_terminals = 769
    codes = [f"T{i:03d}" for i in range(n_terminals)]
    policy = Policy(ack_timeout_s=5.0, max_attempts=3, backoff=Backoff(), max_play_s=600.0)
    core = engine(codes, policy, seed=0)
    Counting.moves = Counting.looks = 0
    now = 1000.0
    req = request(DAILY, 3, ttl_s=7 * 24 * 3600)
    burst = []
    for n in range(n_alerts):
        before = Counting.moves
        spec = AlertSpec(f"A{n}", f"E{n}", req, now, "bench", "bench")
        core.accept(spec, codes, now, hold=False, wall_now=now)
        burst.append(Counting.moves - before)
        assert len(core.drain().transitions) == n_terminals  # sent (the first alert) or waiting
    assert burst == [n_terminals] * n_alerts  # the thousandth costs what the first did
    assert Counting.looks == 0  # nobody looked at a waiting alert

    # Terminals report `done` for what they were last sent; each release sends the next alert.
    playing = dict.fromkeys(codes, "A0")
    for n in range(rounds):
        moves, looks = Counting.moves, Counting.looks
        for code, alert_id in playing.items():
            core.report(TerminalReport(code, alert_id, 1, AckStatus.DONE), now)
        now += 1.0
        sent = {c: p.alert_id for p in core.drain().effects if isinstance(p, Play) for c in p.terminals}
        assert sent == dict.fromkeys(codes, f"A{n + 1}")  # in acceptance order, among equals
        playing = sent
        # per terminal: its done (1 move) and the next one's send (1 move), with n_alerts - n - 2
        # alerts still waiting; the waiting queue is looked at twice (take the best, check the next)
        assert Counting.moves - moves == 2 * n_terminals
        assert Counting.looks - looks <= 2 * n_terminals
    assert core.alerts["A0"].state is AState.COMPLETED
    waiting = sum(d.state is DState.WAITING for a in core.alerts.values() for d in a.deliveries.values())
    assert waiting == (n_alerts - rounds - 1) * n_terminals
