"""Bugs the simulation found in the delivery core, each as the shortest script that showed it.

Each script drives the pure core event by event (no fleet, no network), so that what it tests
reads from the script: what the terminals said and when, and what the core must decide.
"""

from __future__ import annotations

from collections.abc import Sequence

from ebcd.delivery.core import AlertSpec, Core, Policy
from ebcd.delivery.records import AlertRecord, DeliveryRecord, Outbox, Play, Stop
from ebcd.delivery.recovery import resend_in_flight, restore
from ebcd.delivery.state import AState, Bucket, DState, Progress
from ebcd.model.alert import AlertRequest, CodeTarget
from ebcd.model.backoff import Backoff
from ebcd.protocols.messages import AckStatus, Liveness, TerminalPresence, TerminalReport

EMERGENCY, DAILY = "11B03", "20000"
WALL = 1.7e9
CODES = ("T0", "T1", "T2")


def request(event_type: str = DAILY, level: int = 3, ttl_s: float = 600.0) -> AlertRequest:
    return AlertRequest(
        level=level, event_type=event_type, targets=[CodeTarget(kind="all")], text="广播", ttl_s=ttl_s
    )


class Rig:
    """The core with a clock and a journal kept as the runner keeps it."""

    def __init__(self, *, max_attempts: int = 3, max_play_s: float = 60.0, preempted: str = "resume") -> None:
        self.policy = Policy(
            ack_timeout_s=2.0,
            max_attempts=max_attempts,
            backoff=Backoff(initial_s=1.0, max_s=1.0, jitter=0.0),
            max_play_s=max_play_s,
            preempted=preempted,
        )
        self.now = 1000.0
        self.core = Core(CODES, self.policy, seed=0)
        self.alerts: dict[str, AlertRecord] = {}
        self.deliveries: dict[tuple[str, str], DeliveryRecord] = {}
        self.out = self.drain()

    def drain(self) -> Outbox:
        out = self.core.drain()
        for t in out.transitions:
            self.deliveries[(t.record.alert_id, t.record.terminal)] = t.record
        for alert_id in out.changed:
            self.alerts[alert_id] = self.core.alerts[alert_id].record()
        self.out = out
        return out

    def accept(
        self, alert_id: str, req: AlertRequest, codes: Sequence[str] = CODES, *, hold: bool = False
    ) -> Outbox:
        spec = AlertSpec(alert_id, alert_id, req, self.now + WALL)
        alert = self.core.accept(spec, codes, self.now, hold=hold, wall_now=self.now + WALL)
        self.alerts[alert_id] = alert.record()
        return self.drain()

    def report(self, code: str, alert_id: str, status: AckStatus, revision: int = 1) -> Outbox:
        self.core.report(TerminalReport(code, alert_id, revision, status), self.now)
        return self.drain()

    def presence(self, code: str, session: int, state: Liveness = Liveness.ONLINE) -> Outbox:
        self.core.presence(TerminalPresence(code, state, session), self.now)
        return self.drain()

    def wait(self, seconds: float) -> Outbox:
        self.now += seconds
        self.core.tick(self.now)
        return self.drain()

    def restart(self) -> list[Play]:
        self.core = Core(CODES, self.policy, seed=1)
        by_alert: dict[str, list[DeliveryRecord]] = {}
        for (alert_id, _), r in self.deliveries.items():
            by_alert.setdefault(alert_id, []).append(r)
        restore(self.core, self.alerts.values(), by_alert, now=self.now, wall_now=self.now + WALL)
        plays = resend_in_flight(self.core)
        self.drain()
        return plays

    def d(self, alert_id: str, code: str) -> tuple[DState, bool]:
        d = self.core.alerts[alert_id].deliveries[code]
        return d.state, d.acked


def plays(out: Outbox | list[Play]) -> list[tuple[str, tuple[str, ...], bool]]:
    effects = out.effects if isinstance(out, Outbox) else out
    return [(p.alert_id, p.terminals, p.resume) for p in effects if isinstance(p, Play)]


def stops(out: Outbox) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.alert_id, s.terminals) for s in out.effects if isinstance(s, Stop)]


def test_an_alert_held_for_review_keeps_its_targets_across_a_restart() -> None:
    rig = Rig()
    rig.accept("A", request(), hold=True)
    rig.restart()
    alert = rig.core.alerts["A"]
    assert alert.state is AState.PENDING_APPROVAL
    assert alert.targets == len(CODES)
    rig.core.approve("A", rig.now)
    assert plays(rig.drain()) == [("A", CODES, False)]


def test_nothing_is_sent_for_an_alert_past_its_time_to_live_when_the_clock_jumps() -> None:
    rig = Rig()
    rig.accept("A", request(ttl_s=15))
    rig.accept("B", request(ttl_s=15))  # waits for A
    out = rig.wait(100)  # one late wake-up: A's expiry frees the terminals while B's is due too
    assert plays(out) == []
    assert rig.core.alerts["B"].closed


def test_nothing_is_sent_past_time_to_live_when_a_report_comes_before_the_timer() -> None:
    rig = Rig()
    rig.accept("A", request(ttl_s=15))
    rig.accept("B", request(ttl_s=15))
    rig.now += 100  # the reports are read before the expiry timers fire
    for code in CODES:
        assert plays(rig.report(code, "A", AckStatus.DONE)) == []
    rig.wait(0)
    assert rig.core.alerts["B"].state is AState.EXPIRED


def test_an_update_that_lowers_an_alert_hands_its_terminals_to_a_higher_waiter() -> None:
    rig = Rig()
    rig.accept("A", request(EMERGENCY, 2))
    rig.accept("B", request(DAILY, 1))  # waits for A
    rig.core.update("A", request(DAILY, 4), CODES, rig.now)
    out = rig.drain()
    assert plays(out) == [("B", CODES, False)]
    assert all(rig.core.holders.holder_of(c) == "B" for c in CODES)
    assert all(rig.d("A", c) == (DState.WAITING, False) for c in CODES)


def test_a_late_acknowledgement_of_a_preempted_broadcast_does_not_cancel_its_resume() -> None:
    rig = Rig()
    rig.accept("A", request(DAILY, 3))
    rig.accept("B", request(EMERGENCY, 1))  # pre-empts A before A's acknowledgements arrive
    rig.report("T0", "A", AckStatus.PLAYING)  # A had started on T0
    assert rig.d("A", "T0") == (DState.PREEMPTED, True)  # counted, and still to be resumed
    assert rig.core.alerts["A"].counts[Bucket.ACKED] == 1
    out = rig.report("T0", "B", AckStatus.DONE)
    assert plays(out) == [("A", ("T0",), True)]


def test_a_play_hold_that_ended_is_not_taken_back_by_a_restart() -> None:
    rig = Rig(max_play_s=30)
    rig.accept("A", request())
    for code in CODES:
        rig.report(code, "A", AckStatus.PLAYING)
    rig.wait(31)  # no `done` in time: the terminals are free again
    rig.restart()
    assert rig.core.holders.held() == {}
    assert plays(rig.accept("B", request())) == [("B", CODES, False)]  # not waiting on A


def test_a_rebuild_gives_a_terminal_to_what_it_plays_not_to_an_attempt_that_outlived_it() -> None:
    rig = Rig()
    rig.presence("T0", 1)
    rig.accept("A", request(EMERGENCY, 1), ["T0"])
    rig.core.terminals_unknown(["T0"], rig.now, "room link down")  # A's attempt goes nowhere
    rig.drain()
    assert plays(rig.accept("B", request(DAILY, 3), ["T0"])) == [("B", ("T0",), False)]
    rig.report("T0", "B", AckStatus.PLAYING)  # the room is back: T0 plays B
    resent = rig.restart()
    assert rig.core.holders.holder_of("T0") == "B"
    # A is not re-sent over B (it asks again when its timer runs out); B, which was playing, gets a
    # copy, answered `done` by a terminal whose `done` the crash lost, and never played twice
    assert plays(resent) == [("B", ("T0",), False)]


def test_a_returning_terminal_is_asked_for_by_priority_and_gets_one_command() -> None:
    rig = Rig(max_attempts=1)
    rig.accept("A", request(DAILY, 3), ["T0"])
    rig.wait(2.5)  # unanswered: uncertain, no retry left
    rig.accept("B", request(EMERGENCY, 1), ["T0"])
    rig.wait(2.5)
    out = rig.presence("T0", 2)  # a new session: both are sent again, the higher first
    assert plays(out) == [("B", ("T0",), False)]
    assert rig.d("A", "T0") == (DState.WAITING, False)


def test_a_terminal_returning_past_time_to_live_does_not_lose_an_acknowledgement() -> None:
    rig = Rig()
    rig.accept("A", request(ttl_s=15), ["T0"])
    rig.now += 20  # a late wake-up: presence and report are read before the expiry timer
    assert plays(rig.presence("T0", 2)) == []
    rig.report("T0", "A", AckStatus.PLAYING)
    rig.wait(0)
    assert rig.d("A", "T0") == (DState.ACKNOWLEDGED, True)
    assert rig.core.alerts["A"].counts[Bucket.ACKED] == 1
    assert rig.core.alerts["A"].closed


def test_a_resume_that_never_got_through_is_sent_again_when_the_terminal_returns() -> None:
    rig = Rig(max_attempts=1)
    rig.accept("A", request(DAILY, 3), ["T0"])
    rig.report("T0", "A", AckStatus.PLAYING)
    rig.accept("B", request(EMERGENCY, 1), ["T0"])
    assert plays(rig.report("T0", "B", AckStatus.DONE)) == [("A", ("T0",), True)]
    rig.wait(2.5)  # the resume is lost: uncertain, no retry left
    assert plays(rig.presence("T0", 2)) == [("A", ("T0",), True)]


def test_a_late_acknowledgement_after_the_terminal_was_given_to_another_alert_resumes() -> None:
    rig = Rig(max_attempts=1)
    rig.accept("A", request(EMERGENCY, 1), ["T0"])
    rig.accept("B", request(DAILY, 3), ["T0"])  # waits for A
    out = rig.wait(2.5)  # A unanswered in time: uncertain, no retry; B gets the terminal
    assert plays(out) == [("B", ("T0",), False)]
    rig.report("T0", "B", AckStatus.DONE)
    out = rig.report("T0", "A", AckStatus.PLAYING)  # A's answer, late: T0 played A, then B over it
    assert plays(out) == [("A", ("T0",), True)]
    assert rig.core.alerts["A"].counts[Bucket.ACKED] == 1


def test_a_rebuild_leaves_an_expired_alert_as_it_was() -> None:
    rig = Rig()
    rig.accept("A", request(ttl_s=4))
    rig.report("T0", "A", AckStatus.PLAYING)
    for _ in range(6):  # expired with T0 acknowledged (it plays on) and the others still retried
        rig.wait(1)
    assert rig.core.alerts["A"].state is AState.EXPIRED
    rig.restart()
    d = rig.core.alerts["A"].deliveries["T0"]
    assert (d.state, d.progress, d.finished) == (DState.ACKNOWLEDGED, Progress.PLAYING, False)
    assert stops(rig.out) == []


def test_an_update_to_an_area_without_terminals_settles_and_expires() -> None:
    rig = Rig()
    rig.accept("A", request(ttl_s=15))
    for code in CODES:
        rig.report(code, "A", AckStatus.DONE)
    rig.core.update("A", request(ttl_s=15), [], rig.now)
    rig.drain()
    assert rig.core.alerts["A"].state is AState.COMPLETED  # nothing left to send
    rig.wait(20)  # and its time to live ends without an invalid transition
    assert rig.core.alerts["A"].closed


def test_a_late_acknowledgement_of_a_cancelled_alert_stops_it_and_resumes_nothing() -> None:
    rig = Rig()
    rig.accept("A", request(DAILY, 3), ["T0"])
    rig.report("T0", "A", AckStatus.REFUSED)
    assert plays(rig.accept("B", request(DAILY, 3), ["T0"])) == [("B", ("T0",), False)]
    rig.core.cancel("A", "cancelled by the duty officer", rig.now)
    rig.drain()
    out = rig.report("T0", "A", AckStatus.RECEIVED)  # it did start A after all (reordered reports)
    d = rig.core.alerts["A"].deliveries["T0"]
    assert (d.state, d.acked, d.progress, d.finished) == (DState.ACKNOWLEDGED, True, Progress.STOPPED, True)
    assert stops(out) == [("A", ("T0",))]
    assert plays(out) == []
    assert rig.core.holders.holder_of("T0") == "B"


def test_a_terminal_an_update_takes_out_of_the_area_is_journalled_as_gone() -> None:
    rig = Rig()
    rig.accept("A", request(), ["T0", "T1"])
    rig.report("T0", "A", AckStatus.DONE)  # finished: nothing about it moves in the update
    rig.core.update("A", request(), ["T1", "T2"], rig.now)
    rig.drain()
    row = rig.deliveries[("A", "T0")]
    assert row.left  # a reader of the journal no longer counts it among the alert's targets
    rig.restart()
    assert set(rig.core.alerts["A"].deliveries) == {"T1", "T2"}
