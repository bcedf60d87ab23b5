"""What a loudspeaker terminal does with commands, whatever link it is on (sans-IO).

It plays a broadcast once per (alert, revision) however often the command arrives, acknowledges
every copy (so a lost acknowledgement is repaired by a re-send), refuses retained commands, and
keeps a log of what it played.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ebcd.protocols.messages import AckStatus, Command, PlayCommand, StopCommand, TerminalReport
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

    def on_command(self, cmd: Command, *, retained: bool = False) -> list[Step]:
        """Decide what to report for a command addressed to this terminal."""
        if cmd.targets and self.code not in cmd.targets:
            return []
        if isinstance(cmd, StopCommand):
            self.stopped.add(cmd.alert_id)
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
        if self.plays[key]:
            # a re-sent copy: acknowledge again, never play twice
            return [Step(delay, self._report(cmd.alert_id, cmd.revision, AckStatus.RECEIVED, cmd.seq))]
        self._play(cmd)
        return [
            Step(delay, self._report(cmd.alert_id, cmd.revision, AckStatus.RECEIVED, cmd.seq)),
            Step(delay, self._report(cmd.alert_id, cmd.revision, AckStatus.PLAYING, cmd.seq)),
            Step(delay + self.play_time_s, self._report(cmd.alert_id, cmd.revision, AckStatus.DONE, cmd.seq)),
        ]

    def _play(self, cmd: PlayCommand) -> None:
        key = (cmd.alert_id, cmd.revision)
        if not self.plays[key]:
            self.plays[key] += 1

    def _report(
        self, alert: str, rev: int, status: AckStatus, seq: int, cause: str | None = None
    ) -> TerminalReport:
        return TerminalReport(self.code, alert, rev, status, cause, seq)
