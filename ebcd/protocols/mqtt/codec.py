"""The MQTT wire protocol between ebcd and its IP/4G terminals: topics and JSON payloads.

Pure: no I/O. Topics (`{d}` the district platform's EBRID, `{t}` a terminal's EBRID,
`{g}` a room's EBRID):

    ebc/v1/{d}/t/{t}/cmd        ebcd -> one terminal       QoS 1, never retained
    ebc/v1/{d}/g/{g}/cmd        ebcd -> every terminal of a village, a town, or the district
    ebc/v1/{d}/t/{t}/report     terminal -> ebcd           acknowledgements and refusals
    ebc/v1/{d}/t/{t}/presence   terminal -> ebcd           birth, heartbeat, last will

Commands carry ebcd's signature block as "sig" (hex); reports and presence may carry their
terminal's (ebcd.security.reports), which decoding hands over as `signature`, unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ebcd.protocols.messages import (
    AckStatus,
    Command,
    Liveness,
    PlayCommand,
    StopCommand,
    TerminalPresence,
    TerminalReport,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024


class CodecError(ValueError):
    """Bytes from a peer that are not a valid message of this protocol."""


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one district."""

    district: str

    @property
    def prefix(self) -> str:
        """`ebc/v1/{d}`."""
        return f"ebc/v1/{self.district}"

    @property
    def alerts_in(self) -> str:
        """Where upstream systems publish alerts."""
        return f"{self.prefix}/alerts/in"

    @property
    def rejected(self) -> str:
        """Where ebcd publishes rejections of upstream messages."""
        return f"{self.prefix}/alerts/rejected"

    @property
    def replies(self) -> str:
        """Under which ebcd answers MQTT 5 requests (replies/{account}/..., as the ACL confines)."""
        return f"{self.prefix}/replies/"

    @property
    def status(self) -> str:
        """ebcd's own retained online/offline status."""
        return f"{self.prefix}/status"

    def alert_state(self, alert_id: str) -> str:
        """The retained state of one alert."""
        return f"{self.prefix}/alerts/{alert_id}"

    def terminal_cmd(self, terminal: str) -> str:
        """Commands for one terminal."""
        return f"{self.prefix}/t/{terminal}/cmd"

    def group_cmd(self, room: str) -> str:
        """Commands for every terminal under a room (village, town or the district itself)."""
        return f"{self.prefix}/g/{room}/cmd"

    def report(self, terminal: str) -> str:
        """A terminal's acknowledgements."""
        return f"{self.prefix}/t/{terminal}/report"

    def presence(self, terminal: str) -> str:
        """A terminal's birth, heartbeat and last will."""
        return f"{self.prefix}/t/{terminal}/presence"

    @property
    def all_reports(self) -> str:
        """Subscription for every terminal's reports."""
        return f"{self.prefix}/t/+/report"

    @property
    def all_presence(self) -> str:
        """Subscription for every terminal's presence."""
        return f"{self.prefix}/t/+/presence"

    def terminal_of(self, topic: str) -> str | None:
        """The terminal code in a `t/{t}/...` topic, or None."""
        parts = topic.split("/")
        if len(parts) == 6 and parts[3] == "t" and "/".join(parts[:3]) == self.prefix:
            return parts[4]
        return None


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _PlayWire(_Wire):
    v: int = PROTOCOL_VERSION
    op: Literal["play"]
    alert: str = Field(max_length=64)
    ebmid: str = Field(max_length=35)
    rev: int = Field(ge=1)
    seq: int = Field(ge=0)
    level: int = Field(ge=0, le=15)
    event: str = Field(min_length=5, max_length=5)
    text: str = Field(max_length=4000)
    ttl_s: float = Field(ge=0)
    volume: int = Field(default=0xFF, ge=0, le=0xFF)
    test: bool = False
    issued: float = 0.0
    targets: tuple[str, ...] = ()
    resume: bool = False
    sig: str = Field(default="", max_length=512, pattern=r"^([0-9a-fA-F]{2})*$")


class _StopWire(_Wire):
    v: int = PROTOCOL_VERSION
    op: Literal["stop"]
    alert: str = Field(max_length=64)
    ebmid: str = Field(max_length=35)
    rev: int = Field(ge=1)
    seq: int = Field(ge=0)
    reason: str = Field(max_length=200)
    issued: float = 0.0
    targets: tuple[str, ...] = ()
    sig: str = Field(default="", max_length=512, pattern=r"^([0-9a-fA-F]{2})*$")


class _ReportWire(_Wire):
    alert: str = Field(max_length=64)
    rev: int = Field(ge=0)
    status: AckStatus
    cause: str | None = Field(default=None, max_length=200)
    seq: int = 0
    sig: str = Field(default="", max_length=512, pattern=r"^([0-9a-fA-F]{2})*$")


class _PresenceWire(_Wire):
    state: Liveness
    session: int = Field(ge=0)
    heartbeat: bool = False
    playing: tuple[str, ...] = ()
    sig: str = Field(default="", max_length=512, pattern=r"^([0-9a-fA-F]{2})*$")


def _dump(d: dict[str, Any]) -> bytes:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode()


def _load(payload: bytes) -> Any:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return json.loads(payload)
    except RecursionError:
        raise CodecError("not JSON: nesting too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"not JSON: {e}") from None


def encode_command(cmd: Command) -> bytes:
    """A command as the bytes of its MQTT payload."""
    common: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "alert": cmd.alert_id,
        "ebmid": cmd.ebmid,
        "rev": cmd.revision,
        "seq": cmd.seq,
    }
    if cmd.signature:
        common["sig"] = cmd.signature.hex()
    if isinstance(cmd, StopCommand):
        return _dump(
            {
                **common,
                "op": "stop",
                "reason": cmd.reason,
                "issued": cmd.issued_at,
                "targets": list(cmd.targets),
            }
        )
    play: dict[str, Any] = {
        **common, "op": "play", "level": cmd.level, "event": cmd.event_type, "text": cmd.text,
        "ttl_s": round(cmd.ttl_s, 3), "volume": cmd.volume, "test": cmd.test, "issued": cmd.issued_at,
        "targets": list(cmd.targets),
    }  # fmt: skip
    if cmd.resume:
        play["resume"] = True
    return _dump(play)


def decode_command(payload: bytes) -> Command:
    """Parse a command payload; raise CodecError saying what is wrong."""
    raw = _load(payload)
    op = raw.get("op") if isinstance(raw, dict) else None
    try:
        if op == "play":
            p = _PlayWire.model_validate(raw)
            return PlayCommand(
                p.alert,
                p.ebmid,
                p.rev,
                p.seq,
                p.level,
                p.event,
                p.text,
                p.ttl_s,
                p.volume,
                p.test,
                p.issued,
                p.targets,
                p.resume,
                bytes.fromhex(p.sig),
            )
        if op == "stop":
            s = _StopWire.model_validate(raw)
            return StopCommand(
                s.alert, s.ebmid, s.rev, s.seq, s.reason, s.issued, s.targets, bytes.fromhex(s.sig)
            )
    except ValidationError as e:
        raise CodecError(_first_error(e)) from None
    raise CodecError(f"unknown op {op!r}")


def encode_report(report: TerminalReport) -> bytes:
    """A terminal report as the bytes of its MQTT payload (the terminal is in the topic)."""
    d: dict[str, Any] = {"alert": report.alert_id, "rev": report.revision, "status": report.status.value}
    if report.cause:
        d["cause"] = report.cause
    if report.seq:
        d["seq"] = report.seq
    if report.signature:
        d["sig"] = report.signature.hex()
    return _dump(d)


def decode_report(terminal: str, payload: bytes) -> TerminalReport:
    """Parse a terminal's report published on its own report topic."""
    r = _parse(_ReportWire, payload)
    return TerminalReport(terminal, r.alert, r.rev, r.status, r.cause, r.seq, bytes.fromhex(r.sig))


def encode_presence(p: TerminalPresence) -> bytes:
    """Birth, heartbeat or last will payload."""
    d: dict[str, Any] = {"state": p.state.value, "session": p.session}
    if p.heartbeat:
        d["heartbeat"] = True
    if p.playing:
        d["playing"] = list(p.playing)
    if p.signature:
        d["sig"] = p.signature.hex()
    return _dump(d)


def decode_presence(terminal: str, payload: bytes) -> TerminalPresence:
    """Parse a terminal's presence message."""
    p = _parse(_PresenceWire, payload)
    return TerminalPresence(terminal, p.state, p.session, p.heartbeat, p.playing, bytes.fromhex(p.sig))


_W = TypeVar("_W", bound=BaseModel)


def _parse(model: type[_W], payload: bytes) -> _W:
    """A message of a terminal's own topics, parsed and checked in one pass (pydantic's JSON
    parser: the reports of every terminal come through here, three an alert each)."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise CodecError(f"not JSON: {err['msg']}") from None
        raise CodecError(_first_error(e)) from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "message"
    return f"{loc}: {err['msg']}"
