"""The delivery state machine and the alert's timers, driven by a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebcd.alert_run import AlertRun, AlertState, RetryPolicy
from ebcd.delivery import TRANSITIONS, Backoff, Delivery, DState, InvalidTransition, Progress
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.protocols.messages import AckStatus, TerminalReport

ALL_PAIRS = [(a, b) for a in DState for b in DState]


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_every_transition_follows_the_table(old: DState, new: DState) -> None:
    d = Delivery("t", state=old)
    if new in TRANSITIONS[old]:
        d.to(new, 1.0)
        assert d.state is new
        assert d.history[-1][:2] == (1.0, new)
    else:
        with pytest.raises(InvalidTransition):
            d.to(new, 1.0)
        assert d.state is old


def test_ack_progress_only_moves_forward() -> None:
    d = Delivery("t")
    d.sent(0.0, 5.0)
    assert d.acknowledged(0.1, Progress.PLAYING)
    assert not d.acknowledged(0.2, Progress.RECEIVED)  # a late 'received' after 'playing' changes nothing
    assert d.acknowledged(0.3, Progress.DONE)
    assert (d.state, d.progress, d.acked_at) == (DState.ACKNOWLEDGED, Progress.DONE, 0.1)


def test_late_ack_upgrades_an_uncertain_delivery() -> None:
    d = Delivery("t")
    d.sent(0.0, 5.0)
    d.timed_out(5.0, retry_at=None)
    assert d.state is DState.UNCERTAIN
    assert d.bucket == "uncertain"
    assert d.final
    assert d.acknowledged(9.0, Progress.RECEIVED)
    assert d.state is DState.ACKNOWLEDGED
    assert d.bucket == "acked"


def test_ack_after_cancel_changes_nothing() -> None:
    d = Delivery("t")
    d.sent(0.0, 5.0)
    d.to(DState.CANCELLED, 1.0, "cancelled")
    assert not d.acknowledged(2.0, Progress.RECEIVED)
    assert d.state is DState.CANCELLED


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 10, 30])
def test_backoff_is_capped_and_jittered(attempt: int) -> None:
    b = Backoff(initial_s=1.0, max_s=8.0, jitter=0.2)
    rng = random.Random(attempt)
    delays = [b.delay(attempt, rng) for _ in range(200)]
    base = min(8.0, 2 ** (attempt - 1))
    assert all(base * 0.8 <= x <= base * 1.2 for x in delays)
    assert len({round(x, 6) for x in delays}) > 100  # jittered, not a constant


def _run(n: int = 3, ttl: float = 100.0) -> AlertRun:
    req = AlertRequest(level=2, event_type="11B03", targets=[parse_target("all")], text="x", ttl_s=ttl)
    return AlertRun(
        "a1",
        "e" * 35,
        req,
        {f"t{i}": Delivery(f"t{i}") for i in range(n)},
        accepted_at=0.0,
        started=0.0,
        expires=ttl,
        rng=random.Random(7),
    )


OPS = ["send", "timers", "received", "done", "refused", "reopen", "preempt", "resume"]
POLICY = RetryPolicy(ack_timeout_s=5.0, max_attempts=3, backoff=Backoff(1.0, 4.0, 0.2))


def test_retry_timing_with_a_fake_clock() -> None:
    run = _run(1)
    assert run.to_send(0.0) == ["t0"]
    run.mark_sent(["t0"], 0.0, POLICY)
    assert run.check_timers(4.99, POLICY) == []
    assert run.next_wake() == 5.0
    assert run.check_timers(5.0, POLICY) == ["t0"]
    d = run.deliveries["t0"]
    assert d.state is DState.UNCERTAIN
    assert d.retry_at is not None
    assert 5.0 + 0.8 <= d.retry_at <= 5.0 + 1.2  # first retry after ~initial_s
    assert run.to_send(d.retry_at - 0.01) == []
    assert run.to_send(d.retry_at) == ["t0"]
    sent_at = d.retry_at
    run.mark_sent(["t0"], sent_at, POLICY)
    t = sent_at + 5.0
    assert run.check_timers(t, POLICY) == ["t0"]
    assert d.retry_at is not None
    assert t + 1.6 <= d.retry_at <= t + 2.4
    run.mark_sent(["t0"], d.retry_at, POLICY)
    assert d.attempts == 3
    run.check_timers(d.deadline or 0.0, POLICY)
    assert d.state is DState.UNCERTAIN
    assert d.retry_at is None
    assert run.settle(30.0)
    assert run.state is AlertState.PARTIAL


def test_no_retry_is_scheduled_past_the_time_to_live() -> None:
    run = _run(1, ttl=5.5)
    run.mark_sent(["t0"], 0.0, POLICY)
    run.check_timers(5.0, POLICY)
    assert run.deliveries["t0"].retry_at is None


def test_alert_rolls_up_from_its_deliveries() -> None:
    run = _run(3)
    run.mark_sent(run.to_send(0.0), 0.0, POLICY)
    assert run.counts == {"acked": 0, "failed": 0, "uncertain": 0, "pending": 3}
    run.on_report(TerminalReport("t0", "a1", 1, AckStatus.RECEIVED), 0.1)
    run.on_report(TerminalReport("t1", "a1", 1, AckStatus.REFUSED, "busy"), 0.1)
    assert not run.settle(0.2)
    assert run.state is AlertState.DISPATCHING
    run.on_report(TerminalReport("t2", "a1", 1, AckStatus.DONE), 0.3)
    assert run.settle(0.3)
    assert run.state is AlertState.PARTIAL
    assert run.counts == {"acked": 2, "failed": 1, "uncertain": 0, "pending": 0}
    assert run.deliveries["t1"].cause == "busy"


def test_all_acked_completes_and_cancel_stops_everyone() -> None:
    run = _run(2)
    run.mark_sent(run.to_send(0.0), 0.0, POLICY)
    for t in ("t0", "t1"):
        run.on_report(TerminalReport(t, "a1", 1, AckStatus.PLAYING), 0.5)
    assert run.settle(0.5)
    assert run.state is AlertState.COMPLETED
    assert sorted(run.end(AlertState.CANCELLED, 1.0, "by duty officer")) == ["t0", "t1"]
    assert run.state is AlertState.CANCELLED
    assert all(d.state is DState.CANCELLED for d in run.deliveries.values())


def test_expiry_ends_unacknowledged_deliveries() -> None:
    run = _run(2, ttl=10)
    run.mark_sent(run.to_send(0.0), 0.0, POLICY)
    run.on_report(TerminalReport("t0", "a1", 1, AckStatus.RECEIVED), 0.5)
    run.end(AlertState.EXPIRED, 10.0, "time to live ended")
    assert run.deliveries["t1"].state is DState.EXPIRED
    assert run.deliveries["t0"].state is DState.ACKNOWLEDGED
    assert run.state is AlertState.EXPIRED


def test_a_returning_terminal_is_sent_again() -> None:
    run = _run(1)
    run.mark_sent(["t0"], 0.0, POLICY)
    run.check_timers(5.0, POLICY)
    run.deliveries["t0"].retry_at = None
    assert run.reopen("t0", 20.0, "back online")
    assert run.to_send(20.0) == ["t0"]
    assert run.deliveries["t0"].attempts == 0


def test_a_terminal_returning_while_an_attempt_is_in_flight_is_sent_again() -> None:
    # the attempt may have gone out before the terminal's new session subscribed (broker restart)
    run = _run(1)
    run.mark_sent(["t0"], 0.0, POLICY)
    assert run.deliveries["t0"].state is DState.SENT
    assert run.reopen("t0", 0.5, "terminal back online (session 7)")
    assert run.to_send(0.5) == ["t0"]
    assert run.deliveries["t0"].deadline is None  # the old attempt's timer no longer runs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 4), st.floats(0, 3)), max_size=60))
def test_counts_and_settled_follow_every_sequence_of_events(steps: list[tuple[str, int, float]]) -> None:
    # `settled` answers from the counts; both must agree with the deliveries themselves
    run = _run(5)
    now = 0.0
    for op, i, dt in steps:
        now += dt
        t = f"t{i}"
        if op == "send":
            run.mark_sent(run.to_send(now), now, POLICY)
        elif op == "timers":
            run.check_timers(now, POLICY)
        elif op in ("received", "done", "refused"):
            status = {"received": AckStatus.RECEIVED, "done": AckStatus.DONE, "refused": AckStatus.REFUSED}[
                op
            ]
            run.on_report(TerminalReport(t, "a1", 1, status, "signature: unknown_key"), now)
        elif op == "reopen":
            run.reopen(t, now, "back online")
        elif op == "preempt":
            run.preempt(t, now, "a2", end=False)
        elif op == "resume":
            run.resume(t, now)
        run.settle(now)
        counts = dict(run.counts)
        run.recount()
        assert counts == run.counts
        assert run.settled == all(d.final for d in run.deliveries.values())
