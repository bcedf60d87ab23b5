"""What ebcd knows about each terminal being there: unknown until it speaks (pure).

Births and heartbeats make a terminal ONLINE, its last will OFFLINE; a presence of an older
session than the one known is stale and ignored (a late will must not mark a live terminal
offline). Silence for long enough, or a room whose link is down, makes it UNKNOWN again.

Sessions are bounded as well as ordered. A terminal counts its connections (a counter it keeps
across reboots; the simulators start theirs from the clock in seconds), so between two presences
it heard the session grows by 1 per reconnect, rarely by more. A presence whose session is more
than `max_session_step` above the known one is REFUSED, and the known session and state stay:
else one forged presence with a huge session (unsigned, on a broker without the ACL) would make
every real presence of the terminal stale for good. Accepted anyway: any session when none is
known (-1, never heard since ebcd started), and a jump after the terminal has been silent for
`jump_after_silence_s` (a terminal whose counter really jumped, such as a simulator restarted
much later, is believed once its old session is quiet; a live terminal never is). The bound is
no authentication: a forged presence within the step still gets through, and only terminal
signatures (`ebcd.security.reports`) stop that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from ebcd.protocols.messages import Liveness as Said
from ebcd.protocols.messages import TerminalPresence

MAX_SESSION_STEP = 1000  # how far a presence's session may be ahead of the known one
SESSION_JUMP_AFTER_SILENCE_S = 300.0  # a terminal silent this long may come back with any session


class Live(StrEnum):
    """A terminal's liveness as ebcd sees it."""

    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"


class Heard(StrEnum):
    """What a presence message changed."""

    RETURNED = "returned"  # a birth, or a heartbeat of a session not seen before: send it what it missed
    STAYED = "stayed"  # a heartbeat of the known session
    WENT_OFFLINE = "went_offline"
    STALE = "stale"  # from an older session than the one known
    REFUSED = "refused"  # a session too far ahead of the one known: ignored, nothing changes
    UNKNOWN_TERMINAL = "unknown_terminal"


@dataclass(slots=True)
class TerminalLiveness:
    """One terminal's liveness, session and when it was last heard (monotonic seconds)."""

    state: Live = Live.UNKNOWN
    session: int = -1
    last_seen: float = 0.0


class Liveness:
    """Every terminal's liveness."""

    def __init__(
        self,
        terminals: Iterable[str],
        *,
        max_session_step: int = MAX_SESSION_STEP,
        jump_after_silence_s: float = SESSION_JUMP_AFTER_SILENCE_S,
    ) -> None:
        if max_session_step < 1:
            raise ValueError(f"max_session_step must be at least 1, got {max_session_step}")
        self.terminals: dict[str, TerminalLiveness] = {code: TerminalLiveness() for code in terminals}
        self.max_session_step = max_session_step
        self.jump_after_silence_s = jump_after_silence_s

    def __contains__(self, terminal: str) -> bool:
        return terminal in self.terminals

    def state(self, terminal: str) -> Live:
        """The terminal's liveness (UNKNOWN for a code not in the ledger)."""
        live = self.terminals.get(terminal)
        return live.state if live else Live.UNKNOWN

    def on_presence(self, p: TerminalPresence, now: float) -> Heard:
        """Apply a birth, heartbeat or last will."""
        live = self.terminals.get(p.terminal)
        if live is None:
            return Heard.UNKNOWN_TERMINAL
        if p.session < live.session:
            return Heard.STALE
        if (
            live.session >= 0
            and p.session - live.session > self.max_session_step
            and not now - live.last_seen > self.jump_after_silence_s
        ):
            return Heard.REFUSED
        if p.state is Said.OFFLINE:
            # last_seen too: the silence that lets a session jump counts from the end of the session
            live.state, live.session, live.last_seen = Live.OFFLINE, p.session, now
            return Heard.WENT_OFFLINE
        returning = live.state is not Live.ONLINE or p.session > live.session
        live.state, live.session, live.last_seen = Live.ONLINE, p.session, now
        return Heard.RETURNED if returning else Heard.STAYED

    def heard(self, terminal: str, now: float) -> None:
        """The terminal spoke (a report): it is there."""
        live = self.terminals.get(terminal)
        if live is not None:
            live.last_seen = now
            live.state = Live.ONLINE

    def sweep(self, now: float, silent_after_s: float) -> list[str]:
        """Terminals online but silent for longer than `silent_after_s`: now UNKNOWN."""
        gone = []
        for code, live in self.terminals.items():
            if live.state is Live.ONLINE and now - live.last_seen > silent_after_s:
                live.state = Live.UNKNOWN
                gone.append(code)
        return gone

    def mark_unknown(self, terminals: Iterable[str]) -> list[str]:
        """A room went silent: its terminals' liveness is unknown; returns those that changed."""
        changed = []
        for code in terminals:
            live = self.terminals.get(code)
            if live is not None and live.state is not Live.UNKNOWN:
                live.state = Live.UNKNOWN
                changed.append(code)
        return changed

    def counts(self) -> dict[str, int]:
        """Terminals per liveness state."""
        out = {s.value: 0 for s in Live}
        for live in self.terminals.values():
            out[live.state.value] += 1
        return out
