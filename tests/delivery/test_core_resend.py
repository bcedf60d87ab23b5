"""Resending an alert that ended partial: who gets a new attempt, who never does, when it is refused.

Scripts on the pure core (the Rig of `tests.delivery.test_core_regressions`); the seeded
simulation adds resends to its random workloads as well (`tests.delivery.sim`).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from ebcd.delivery.core import Refused
from ebcd.delivery.records import Play
from ebcd.delivery.state import AState, DEvent, DState
from ebcd.protocols.messages import AckStatus
from tests.delivery.test_core_regressions import Rig, request

WHO = "resent by duty (uid 1000)"


def plays(rig: Rig) -> list[str]:
    return [code for e in rig.out.effects if isinstance(e, Play) for code in e.terminals]


def partial(rig: Rig) -> str:
    """An alert to T0, T1, T2: T0 acknowledged and played it, T1 refused, T2 never answered."""
    rig.accept("A", request())
    rig.report("T0", "A", AckStatus.DONE)
    rig.report("T1", "A", AckStatus.REFUSED)
    for _ in range(10):  # T2: every attempt times out
        rig.wait(2.5)
    alert = rig.core.alerts["A"]
    assert alert.state is AState.PARTIAL
    assert [alert.deliveries[c].state for c in ("T0", "T1", "T2")] == [
        DState.ACKNOWLEDGED, DState.REFUSED, DState.UNCERTAIN,
    ]  # fmt: skip
    return "A"


def test_resend_goes_to_the_refused_and_uncertain_never_to_the_one_that_played() -> None:
    rig = Rig()
    partial(rig)
    attempts_t2 = rig.core.alerts["A"].deliveries["T2"].attempts
    assert rig.core.resend("A", ["uncertain", "failed", "refused"], WHO, rig.now) == ["T1", "T2"]
    rig.drain()
    assert sorted(plays(rig)) == ["T1", "T2"]
    alert = rig.core.alerts["A"]
    assert alert.state is AState.DISPATCHING
    assert alert.revision == 1  # the same revision: a new attempt, not an update
    assert alert.deliveries["T2"].attempts == attempts_t2 + 1
    resends = [t for t in rig.out.transitions if t.event is DEvent.RESEND]
    assert {t.record.terminal for t in resends} == {"T1", "T2"}
    assert all(t.record.cause == WHO for t in resends)  # the journal keeps who asked
    rig.report("T1", "A", AckStatus.RECEIVED)
    rig.report("T2", "A", AckStatus.RECEIVED)
    assert alert.state is AState.COMPLETED


def test_resend_only_uncertain_leaves_the_refused_alone() -> None:
    rig = Rig()
    partial(rig)
    assert rig.core.resend("A", ["uncertain"], WHO, rig.now) == ["T2"]
    rig.drain()
    assert plays(rig) == ["T2"]
    assert rig.core.alerts["A"].deliveries["T1"].state is DState.REFUSED


def test_a_resent_terminal_gets_a_fresh_retry_budget() -> None:
    rig = Rig(max_attempts=2)
    partial(rig)
    rig.core.resend("A", ["uncertain"], WHO, rig.now)
    rig.drain()
    sent = 0
    for _ in range(10):
        rig.wait(2.5)
        sent += plays(rig).count("T2")
    assert sent == 1  # the resend, then one retry: two attempts, as the policy allows
    assert rig.core.alerts["A"].state is AState.PARTIAL


def test_resend_of_a_cancelled_alert_is_refused_saying_it_ended() -> None:
    rig = Rig()
    partial(rig)
    rig.core.cancel("A", "cancelled by duty", rig.now)
    rig.drain()
    with pytest.raises(Refused) as e:
        rig.core.resend("A", ["uncertain"], WHO, rig.now)
    assert e.value.code == "ended"
    assert "cancelled" in e.value.detail


def test_resend_past_the_time_to_live_is_refused_even_before_the_expiry_fired() -> None:
    rig = Rig()
    partial(rig)
    rig.now += 700.0  # past the 600 s time to live; the core's timer has not run yet
    with pytest.raises(Refused) as e:
        rig.core.resend("A", ["uncertain"], WHO, rig.now)
    assert e.value.code == "expired"
    assert "time to live" in e.value.detail
    assert rig.core.drain().effects == []


def test_resend_with_nothing_to_resend_is_refused() -> None:
    rig = Rig()
    rig.accept("A", request())
    for code in ("T0", "T1", "T2"):
        rig.report(code, "A", AckStatus.RECEIVED)
    assert rig.core.alerts["A"].state is AState.COMPLETED
    with pytest.raises(Refused) as e:
        rig.core.resend("A", ["uncertain", "failed"], WHO, rig.now)
    assert e.value.code == "nothing_to_resend"


def test_resend_of_an_alert_waiting_for_approval_is_refused() -> None:
    rig = Rig()
    rig.accept("A", request(), hold=True)
    with pytest.raises(Refused) as e:
        rig.core.resend("A", ["uncertain"], WHO, rig.now)
    assert e.value.code == "not_approved"


def test_resend_waits_for_a_terminal_another_alert_holds() -> None:
    rig = Rig()
    partial(rig)
    rig.accept("B", request(event_type="11B03", level=1), codes=["T2"])  # an emergency takes T2
    rig.core.resend("A", ["uncertain"], WHO, rig.now)
    rig.drain()
    assert plays(rig) == []
    d = rig.core.alerts["A"].deliveries["T2"]
    assert d.state is DState.WAITING
    rig.report("T2", "B", AckStatus.DONE)
    assert plays(rig) == ["T2"]  # B is done: A's resend goes out


def test_a_resend_journalled_but_not_sent_when_the_daemon_died_goes_out_after_the_restart() -> None:
    rig = Rig()
    partial(rig)
    for code in ("T1", "T2"):  # what the runner journals before the core moves (Runner.resend)
        r = rig.deliveries[("A", code)]
        rig.deliveries[("A", code)] = replace(
            r, state=DState.PENDING, cause=WHO, budget_base=r.attempts, retry=False
        )
    rig.alerts["A"] = replace(rig.alerts["A"], state=AState.DISPATCHING)
    rig.restart()
    sent = sorted(code for e in rig.out.effects if isinstance(e, Play) for code in e.terminals)
    assert sent == ["T1", "T2"]  # and not T0, which played it
    assert rig.core.alerts["A"].state is AState.DISPATCHING
