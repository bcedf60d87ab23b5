"""The two state tables read as the README's life cycle says, and the backoff rule."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebcd.delivery.state import (
    ALERT,
    DELIVERY,
    PEER_EVENTS,
    AEvent,
    AState,
    DEvent,
    DState,
    InvalidTransition,
    next_alert_state,
    next_delivery_state,
)
from ebcd.model.backoff import Backoff

DELIVERY_CELLS = [(s, e) for s in DState for e in DEvent]


@pytest.mark.parametrize(("state", "event"), DELIVERY_CELLS, ids=[f"{s}-{e}" for s, e in DELIVERY_CELLS])
def test_every_delivery_cell_follows_the_table(state: DState, event: DEvent) -> None:
    expected = DELIVERY[state].get(event)
    if expected is not None:
        assert next_delivery_state(state, event) is expected
    elif event in PEER_EVENTS:
        assert next_delivery_state(state, event) is None  # a report that does not apply is ignored
    else:
        with pytest.raises(InvalidTransition):
            next_delivery_state(state, event)


def test_nothing_is_ever_sent_from_a_final_or_acknowledged_state() -> None:
    for state in (DState.ACKNOWLEDGED, DState.REFUSED, DState.CANCELLED, DState.EXPIRED, DState.SENT):
        assert DEvent.SEND not in DELIVERY[state]


def test_only_acknowledgements_and_a_new_revision_leave_cancelled_and_expired() -> None:
    assert set(DELIVERY[DState.CANCELLED]) == {DEvent.ACK, DEvent.RENEW}
    assert set(DELIVERY[DState.EXPIRED]) == {DEvent.ACK}
    assert DELIVERY[DState.CANCELLED][DEvent.ACK] is DState.CANCELLED  # late ack: counted, state stays


def test_a_cancel_keeps_an_acknowledged_delivery_acknowledged() -> None:
    assert DELIVERY[DState.ACKNOWLEDGED][DEvent.CANCEL] is DState.ACKNOWLEDGED


ALERT_CELLS = [(s, e) for s in AState for e in AEvent]


@pytest.mark.parametrize(("state", "event"), ALERT_CELLS, ids=[f"{s}-{e}" for s, e in ALERT_CELLS])
def test_every_alert_cell_follows_the_table(state: AState, event: AEvent) -> None:
    expected = ALERT[state].get(event)
    if expected is not None:
        assert next_alert_state(state, event) is expected
    else:
        with pytest.raises(InvalidTransition):
            next_alert_state(state, event)


def test_ended_alerts_are_final_and_completed_only_cancels_updates_or_closes() -> None:
    for state in (AState.CANCELLED, AState.EXPIRED, AState.REJECTED):
        assert ALERT[state] == {}
    assert set(ALERT[AState.COMPLETED]) == {AEvent.UPDATE, AEvent.CANCEL, AEvent.CLOSE}


@given(attempt=st.integers(1, 50), seed=st.integers(0, 2**32))
def test_backoff_is_capped_and_jittered(attempt: int, seed: int) -> None:
    b = Backoff(initial_s=1.0, max_s=30.0, jitter=0.2)
    delay = b.delay(attempt, random.Random(seed))
    base = min(30.0, 2.0 ** (attempt - 1))
    assert base * 0.8 <= delay <= base * 1.2
