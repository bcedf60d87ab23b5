"""The bytes a command is signed over, and the terminal-side replay guard (pure: no I/O, no clock).

Canonical bytes. A command is signed over `canonical_command_bytes(cmd)`, whatever link carries
it: the command's fields under their MQTT names (`resume` only when true), without `targets`
(so one signature serves every terminal and every topic), `v` = 1, as compact JSON with sorted
keys in UTF-8. Every value is a string, an integer (below 2**53) or a boolean: `ttl_s` in whole
seconds (rounded up), `issued` in whole unix seconds (rounded down). So the bytes are RFC 8785
(JCS) canonical JSON, and a terminal in any language can rebuild them. `issued` equals the
signature block's time field: `sign_command` signs with it, and `verify_command` rebuilds the
bytes from the block's time, so the time is authenticated even on links that do not carry it
(the serial frame does not). Sign and send `quantize_command(cmd)`, so that every link carries
the signed `ttl_s` exactly. Neither the targets nor the topic are signed: within the replay
window a captured command can be re-sent to terminals outside the alert's area, until commands
carry a signed scope.

Replay guard, for terminals (the simulators', and what real terminals should do):
1. verify the signature first (`verify_command`): only verified commands may touch the guard,
   or forged ones could push its window forward;
2. `guard.check(info.serial, cmd.seq, info.time, now)` with `now` the terminal's unix time:
   - `stale` if the authenticated time is more than `window_s` away from `now`, either way
     (inclusive bounds: exactly `window_s` old passes);
   - `replayed` if that sender's `seq` was seen before or is below `highest - reorder`: an
     unseen seq at most `reorder` below the highest passes (MQTT group and terminal topics may
     deliver out of order; `reorder=0` demands strictly rising seqs), anything older is
     refused, as are repeats;
   - otherwise the seq is recorded and the command may be acted on.
   A `replayed` command must not be played again; the terminal may still re-send its report
   for an (alert, rev) it already handled.
Memory is bounded: at most `max_entries` seqs per sender (forgetting the lowest raises the
floor, so a forgotten seq is refused, never accepted again) and `max_senders` senders (least
recently heard dropped first; senders are verified key serials, so they are few). After a
reboot the guard is empty and only the time window protects, so it needs a synchronised clock:
a terminal whose clock reads 1970 refuses everything as stale, which is the safe side.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar

from ebcd.protocols.messages import Command, PlayCommand, StopCommand
from ebcd.security.signing import (
    SecurityError,
    SignatureError,
    SignatureFailure,
    SignedInfo,
    Signer,
    Verifier,
    parse_signature,
)

REPLAY_WINDOW_S = 300.0  # how far a command's signed issue time may be from the terminal's clock
REPLAY_REORDER_SEQS = 1024  # how far below the highest seq an unseen seq is still accepted
REPLAY_MAX_ENTRIES = 4096  # seqs remembered per sender
REPLAY_MAX_SENDERS = 64  # senders (key serials) remembered
CANONICAL_VERSION = 1

_Cmd = TypeVar("_Cmd", bound=PlayCommand | StopCommand)


class ReplayReason(StrEnum):
    """Why the replay guard refused a command."""

    STALE = "stale"
    REPLAYED = "replayed"


class ReplayError(SecurityError):
    """A command the replay guard refused: `stale` (time outside the window) or `replayed`."""

    def __init__(self, reason: ReplayReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical_ttl_s(ttl_s: float) -> int:
    """A time to live as the whole seconds the canonical bytes carry (milliseconds, then rounded up)."""
    return math.ceil(round(ttl_s, 3))


def canonical_time_s(t: float) -> int:
    """A unix time as the whole seconds the canonical bytes and the signature block carry."""
    return math.floor(t)


def canonical_command_bytes(cmd: Command) -> bytes:
    """The bytes a command is signed over: deterministic, the same for every link, without targets."""
    fields: dict[str, Any]
    if isinstance(cmd, PlayCommand):
        fields = {
            "op": "play",
            "alert": cmd.alert_id,
            "ebmid": cmd.ebmid,
            "rev": cmd.revision,
            "seq": cmd.seq,
            "level": cmd.level,
            "event": cmd.event_type,
            "text": cmd.text,
            "ttl_s": canonical_ttl_s(cmd.ttl_s),
            "volume": cmd.volume,
            "test": cmd.test,
        }
        if cmd.resume:  # only when set, as on MQTT: the bytes of every other command stay as they were
            fields["resume"] = True
    else:
        fields = {"op": "stop", "alert": cmd.alert_id, "ebmid": cmd.ebmid, "rev": cmd.revision}
        fields |= {"seq": cmd.seq, "reason": cmd.reason}
    fields["issued"] = canonical_time_s(cmd.issued_at)
    fields["v"] = CANONICAL_VERSION
    text = json.dumps(fields, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate


def quantize_command(cmd: _Cmd) -> _Cmd:
    """`cmd` with `ttl_s` and `issued_at` in the whole seconds that get signed, for every link to carry."""
    cmd = replace(cmd, issued_at=float(canonical_time_s(cmd.issued_at)))
    if isinstance(cmd, PlayCommand):
        return replace(cmd, ttl_s=float(canonical_ttl_s(cmd.ttl_s)))
    return cmd


def sign_command(signer: Signer, cmd: Command) -> bytes:
    """The 74-byte block for `cmd`, timed at its issue time: sign once per command, not per terminal."""
    return signer.sign(canonical_command_bytes(cmd), now=canonical_time_s(cmd.issued_at))


def verify_command(verifier: Verifier, cmd: Command, signature: bytes) -> SignedInfo:
    """The verified time and serial of `cmd`'s block; the time is the issue time (ignore `cmd.issued_at`)."""
    claimed = parse_signature(signature)
    try:
        message = canonical_command_bytes(replace(cmd, issued_at=float(claimed.time)))
    except (ValueError, OverflowError) as exc:  # a lone surrogate, a NaN or infinite ttl_s
        raise SignatureError(SignatureFailure.MALFORMED, f"command has no canonical form: {exc}") from None
    return verifier.verify(message, signature)


@dataclass(slots=True)
class _Sender:
    """One sender's seqs: every seq <= floor is refused, `seen` holds those above it."""

    high: int
    floor: int
    seen: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)  # the same seqs as `seen`, lowest first


class ReplayGuard:
    """Refuses commands whose time is outside the window or whose seq is repeated or too old."""

    def __init__(
        self,
        window_s: float = REPLAY_WINDOW_S,
        *,
        max_entries: int = REPLAY_MAX_ENTRIES,
        reorder: int = REPLAY_REORDER_SEQS,
        max_senders: int = REPLAY_MAX_SENDERS,
    ) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s}")
        if max_entries < 1 or max_senders < 1 or reorder < 0:
            raise ValueError("max_entries and max_senders must be at least 1, reorder at least 0")
        self.window_s = window_s
        self.max_entries = max_entries
        self.reorder = reorder
        self.max_senders = max_senders
        self._senders: OrderedDict[str, _Sender] = OrderedDict()

    @property
    def entries(self) -> int:
        """Seqs remembered, over all senders."""
        return sum(len(s.seen) for s in self._senders.values())

    @property
    def senders(self) -> int:
        """Senders remembered."""
        return len(self._senders)

    def check(self, sender_serial: str, seq: int, issued_at: float, now: float) -> None:
        """Record a verified command's seq, or raise ReplayError (stale, replayed) recording nothing."""
        # written as "inside" so that a NaN time is refused, not let through
        if not (now - self.window_s <= issued_at <= now + self.window_s):
            when = f"{issued_at - now:.1f} s ahead" if issued_at > now else f"{now - issued_at:.1f} s ago"
            raise ReplayError(ReplayReason.STALE, f"issued {when}, outside the ±{self.window_s:g} s window")
        sender = self._senders.get(sender_serial)
        if sender is None:
            sender = self._senders[sender_serial] = _Sender(high=seq, floor=seq - self.reorder - 1)
            if len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
        elif seq <= sender.floor:
            raise ReplayError(
                ReplayReason.REPLAYED,
                f"seq {seq} is too old: the highest is {sender.high}, seqs up to {sender.floor} are refused",
            )
        elif seq in sender.seen:
            raise ReplayError(ReplayReason.REPLAYED, f"seq {seq} was seen before")
        self._senders.move_to_end(sender_serial)
        self._record(sender, seq)

    def _record(self, sender: _Sender, seq: int) -> None:
        if seq > sender.high:
            sender.high = seq
            sender.floor = max(sender.floor, seq - self.reorder - 1)
        sender.seen.add(seq)
        heapq.heappush(sender.heap, seq)
        while sender.heap and (sender.heap[0] <= sender.floor or len(sender.heap) > self.max_entries):
            oldest = heapq.heappop(sender.heap)
            sender.seen.discard(oldest)
            sender.floor = max(sender.floor, oldest)
