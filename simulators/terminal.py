"""What a loudspeaker terminal does with commands, whatever link it is on (sans-IO).

It plays a broadcast once per (alert, revision) however often the command arrives, acknowledges
every copy (so a lost acknowledgement is repaired by a re-send), refuses retained commands, and
keeps a log of what it played. It plays one broadcast at a time: a new one replaces the current
one (the platform decides priority), and a command marked `resume` plays a pre-empted one again,
never one it played to the end (it answers `done` again).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ebcd.protocols.messages import AckStatus, Command, PlayCommand, StopCommand, TerminalReport
from ebcd.security.replay import ReplayError, ReplayGuard, ReplayReason, verify_command
from ebcd.security.signing import SignatureError, SignedInfo, Verifier
from simulators.faults import Fault

SLOW_EXTRA_S = 3.0
REFUSE_CAUSE = "simulated fault: amplifier failure"


@dataclass(slots=True)
class Step:
    """A report to send after `delay_s` seconds."""

    delay_s: float
    report: TerminalReport


@dataclass
class TerminalBehaviour:
    """One simulated terminal's decisions."""

    code: str
    play_time_s: float = 1.0
    fault: Fault | None = None
    plays: Counter[tuple[str, int]] = field(default_factory=Counter)
    copies: Counter[tuple[str, int]] = field(default_factory=Counter)
    stopped: set[str] = field(default_factory=set)
    refused: list[tuple[str, str]] = field(default_factory=list)
    resumes: Counter[tuple[str, int]] = field(default_factory=Counter)
    current: tuple[str, int] | None = None  # what the loudspeaker plays now
    finished: set[tuple[str, int]] = field(default_factory=set)  # played to the end ('done' reported)
    check: CommandCheck | None = None  # None: obeys unsigned commands (a bench without keys)

    def on_command(self, cmd: Command, *, retained: bool = False) -> list[Step]:
        """Decide what to report for a command addressed to this terminal."""
        if cmd.targets and self.code not in cmd.targets:
            return []
        if self.check is not None:
            key = (cmd.alert_id, cmd.revision)
            verdict = self.check(cmd, handled=key == self.current and cmd.alert_id not in self.stopped)
            if verdict is not None and verdict != DUPLICATE:
                self.refused.append((cmd.alert_id, verdict))
                return [
                    Step(0.0, self._report(cmd.alert_id, cmd.revision, AckStatus.REFUSED, cmd.seq, verdict))
                ]
        if isinstance(cmd, StopCommand):
            self.stopped.add(cmd.alert_id)
            if self.current is not None and self.current[0] == cmd.alert_id:
                self.current = None
            return [Step(0.0, self._report(cmd.alert_id, cmd.revision, AckStatus.STOPPED, cmd.seq))]
        key = (cmd.alert_id, cmd.revision)
        self.copies[key] += 1
        if retained:
            self.refused.append((cmd.alert_id, "retained command"))
            return [
                Step(
                    0.0,
                    self._report(cmd.alert_id, cmd.revision, AckStatus.REFUSED, cmd.seq, "retained command"),
                )
            ]
        if self.fault is Fault.REFUSE:
            self.refused.append((cmd.alert_id, REFUSE_CAUSE))
            return [
                Step(0.0, self._report(cmd.alert_id, cmd.revision, AckStatus.REFUSED, cmd.seq, REFUSE_CAUSE))
            ]
        if self.fault is Fault.LOSE_ACKS and self.copies[key] == 1:
            self._play(cmd)
            return []
        delay = SLOW_EXTRA_S if self.fault is Fault.SLOW else 0.0
        if key in self.finished:  # played to the end already: a resume never plays it twice
            return [Step(delay, self._report(cmd.alert_id, cmd.revision, AckStatus.DONE, cmd.seq))]
        if self.plays[key] and not (cmd.resume and self.current != key):
            # a re-sent copy: acknowledge again, never play twice
            return [Step(delay, self._report(cmd.alert_id, cmd.revision, AckStatus.RECEIVED, cmd.seq))]
        if self.plays[key]:
            self.resumes[key] += 1
        self._play(cmd)
        return [
            Step(delay, self._report(cmd.alert_id, cmd.revision, AckStatus.RECEIVED, cmd.seq)),
            Step(delay, self._report(cmd.alert_id, cmd.revision, AckStatus.PLAYING, cmd.seq)),
            Step(delay + self.play_time_s, self._report(cmd.alert_id, cmd.revision, AckStatus.DONE, cmd.seq)),
        ]

    def reported(self, report: TerminalReport) -> None:
        """A report went out: after 'done' the broadcast is over on this loudspeaker."""
        key = (report.alert_id, report.revision)
        if report.status is AckStatus.DONE:
            self.finished.add(key)
            if self.current == key:
                self.current = None

    def _play(self, cmd: PlayCommand) -> None:
        key = (cmd.alert_id, cmd.revision)
        self.current = key
        if not self.plays[key]:
            self.plays[key] += 1

    def _report(
        self, alert: str, rev: int, status: AckStatus, seq: int, cause: str | None = None
    ) -> TerminalReport:
        return TerminalReport(self.code, alert, rev, status, cause, seq)


DUPLICATE = "duplicate"  # a copy of a command already handled: acknowledge again, never play again


class CommandCheck:
    """What a terminal checks before it obeys: a valid signature, then a fresh, unseen sequence.

    Returns None (obey), DUPLICATE (a repeated copy of a command it already handled) or the reason
    for refusing: "unsigned", "signature: bad_signature|unknown_key|malformed", "replayed", "stale".
    """

    def __init__(
        self, verifier: Verifier, *, window_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._verifier = verifier
        self._guard = ReplayGuard(window_s)
        self._clock = clock

    def __call__(self, cmd: Command, *, handled: bool) -> str | None:
        """Judge `cmd`; `handled` says whether this terminal already acted on its (alert, revision)."""
        if not cmd.signature:
            return "unsigned"
        try:
            info = verify_command(self._verifier, cmd, cmd.signature)
        except SignatureError as e:
            return f"signature: {e.reason.value}"
        try:
            self._guard.check(info.serial, cmd.seq, info.time, self._clock())
        except ReplayError as e:
            if e.reason is ReplayReason.REPLAYED and handled:
                return DUPLICATE
            return e.reason.value
        return None


class CachingVerifier(Verifier):
    """A verifier that remembers what it verified: one simulator process holds hundreds of terminals
    that all check the same group command, and SM2 in pure Python costs ~12 ms a verification."""

    def __init__(self, inner: Verifier, max_entries: int = 256) -> None:
        super().__init__(inner.keys)
        self._inner = inner
        self._cache: dict[tuple[bytes, bytes], SignedInfo] = {}
        self._max = max_entries

    def verify(self, message: bytes, signature: bytes) -> SignedInfo:
        """As Verifier.verify, answered from the cache for a (message, signature) seen before."""
        key = (message, signature)
        found = self._cache.get(key)
        if found is None:
            found = self._inner.verify(message, signature)  # raises SignatureError: not cached
            if len(self._cache) >= self._max:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = found
        return found
