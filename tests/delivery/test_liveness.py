"""Liveness: births, heartbeats and wills by session, and the bound on how far a session may jump."""

from __future__ import annotations

import pytest

from ebcd.delivery.liveness import MAX_SESSION_STEP, SESSION_JUMP_AFTER_SILENCE_S, Heard, Live, Liveness
from ebcd.protocols.messages import Liveness as Said
from ebcd.protocols.messages import TerminalPresence

T = "63415231020050314010401"


def birth(session: int) -> TerminalPresence:
    return TerminalPresence(T, Said.ONLINE, session)


def beat(session: int) -> TerminalPresence:
    return TerminalPresence(T, Said.ONLINE, session, heartbeat=True)


def will(session: int) -> TerminalPresence:
    return TerminalPresence(T, Said.OFFLINE, session)


def online(session: int = 5, now: float = 100.0) -> Liveness:
    live = Liveness([T])
    assert live.on_presence(birth(session), now) is Heard.RETURNED
    return live


def test_a_forged_will_with_a_huge_session_is_refused_and_the_terminal_stays_online() -> None:
    # The attack: {"state":"offline","session":1000000000000} on the terminal's presence topic.
    live = online(session=5)
    assert live.on_presence(will(1_000_000_000_000), 110.0) is Heard.REFUSED
    assert live.state(T) is Live.ONLINE
    assert live.terminals[T].session == 5
    # its real heartbeats still count: not stale, and it stays online through a sweep
    assert live.on_presence(beat(5), 130.0) is Heard.STAYED
    assert live.sweep(150.0, silent_after_s=95.0) == []
    assert live.state(T) is Live.ONLINE


def test_a_forged_birth_with_a_huge_session_is_refused() -> None:
    live = online(session=5)
    assert live.on_presence(birth(5 + MAX_SESSION_STEP + 1), 110.0) is Heard.REFUSED
    assert live.terminals[T].session == 5
    assert live.on_presence(beat(5), 120.0) is Heard.STAYED


def test_sessions_within_the_step_are_accepted() -> None:
    live = online(session=5)
    assert live.on_presence(will(5), 110.0) is Heard.WENT_OFFLINE
    assert live.on_presence(birth(6), 111.0) is Heard.RETURNED
    assert live.on_presence(birth(6 + MAX_SESSION_STEP), 112.0) is Heard.RETURNED  # exactly the step
    assert live.terminals[T].session == 6 + MAX_SESSION_STEP


def test_any_session_is_accepted_when_none_is_known() -> None:
    # -1: never heard since ebcd started (a real counter may stand anywhere)
    live = Liveness([T])
    assert live.on_presence(beat(1_000_000_000_000), 1.0) is Heard.RETURNED
    assert live.state(T) is Live.ONLINE
    other = Liveness([T])
    assert other.on_presence(will(10**9), 1.0) is Heard.WENT_OFFLINE


def test_a_jump_is_accepted_once_the_known_session_is_silent_long_enough() -> None:
    # a terminal whose counter really jumped (a simulator restarted much later): believed once its
    # old session has been quiet; a live one (heartbeats refreshing it) never is
    live = online(session=5, now=100.0)
    jumped = 5 + 10 * MAX_SESSION_STEP
    assert live.on_presence(birth(jumped), 100.0 + SESSION_JUMP_AFTER_SILENCE_S) is Heard.REFUSED
    assert live.on_presence(beat(jumped), 100.0 + SESSION_JUMP_AFTER_SILENCE_S + 1) is Heard.RETURNED
    assert live.terminals[T].session == jumped


def test_the_silence_counts_from_the_last_will() -> None:
    live = online(session=5, now=100.0)
    assert live.on_presence(will(5), 1000.0) is Heard.WENT_OFFLINE
    assert live.on_presence(birth(5 + 2 * MAX_SESSION_STEP), 1100.0) is Heard.REFUSED
    assert live.state(T) is Live.OFFLINE
    assert live.on_presence(birth(5 + 2 * MAX_SESSION_STEP), 1000.0 + SESSION_JUMP_AFTER_SILENCE_S + 1) is (
        Heard.RETURNED
    )


def test_older_sessions_are_still_stale() -> None:
    live = online(session=5)
    assert live.on_presence(will(4), 110.0) is Heard.STALE
    assert live.state(T) is Live.ONLINE


def test_the_step_is_a_constructor_argument() -> None:
    live = Liveness([T], max_session_step=1, jump_after_silence_s=10.0)
    assert live.on_presence(birth(5), 0.0) is Heard.RETURNED
    assert live.on_presence(birth(7), 1.0) is Heard.REFUSED
    assert live.on_presence(birth(6), 2.0) is Heard.RETURNED
    with pytest.raises(ValueError, match="max_session_step"):
        Liveness([T], max_session_step=0)


def test_unknown_terminals_are_still_unknown() -> None:
    live = Liveness([T])
    assert live.on_presence(TerminalPresence("6" * 23, Said.OFFLINE, 10**12), 1.0) is Heard.UNKNOWN_TERMINAL
