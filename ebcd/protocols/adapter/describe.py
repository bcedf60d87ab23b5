"""Every field of a captured adapter frame, for a field engineer (`ebcd frame decode HEX`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from enum import IntEnum

from ebcd.protocols.adapter.bodies import (
    AdapterState,
    Heartbeat,
    Reply,
    StartStop,
    TaskStart,
    decode_body,
    result_meaning,
)
from ebcd.protocols.adapter.frame import (
    Frame,
    SignedData,
    decode_frame,
    frame_crc,
    parse_header,
    verify_frame,
)
from ebcd.protocols.errors import CrcError, RemoteProtocolError
from ebcd.protocols.serial.frame import FrameDescription
from ebcd.security.signing import SignatureError, Verifier, parse_signature

_TYPE_NAMES = {
    0x04: "broadcast start/stop",
    0x12: "general reply (adapter)",
    0x18: "task start report",
    0x19: "task end report",
    0x20: "heartbeat",
    0x21: "general reply (platform)",
    0x22: "task start report reply",
}

_DIRECTION = {0x49: "platform -> adapter", 0x50: "adapter -> platform"}


def _plain(value: object) -> object:
    if isinstance(value, IntEnum):
        return f"{int(value)} {value.name.lower()}"
    if isinstance(value, bytes):
        return value.hex(" ").upper()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _time(seconds: int) -> str:
    return f"{seconds} ({dt.datetime.fromtimestamp(seconds, dt.UTC):%Y-%m-%d %H:%M:%S} UTC)"


def describe(
    data: bytes, *, verifier: Verifier | None = None, variant: SignedData = SignedData.HEADER_BODY
) -> FrameDescription:
    """Every field of `data`, reading as far as the bytes allow, with CRC and signature verdicts."""
    fields: dict[str, object] = {"bytes_given": len(data)}
    try:
        header = parse_header(data)
    except RemoteProtocolError as exc:
        return FrameDescription(fields, errors=(f"not an adapter frame: {exc}",))
    ptype = header.protocol_type
    fields |= {
        "head": f"0x{header.head:02X} ({_DIRECTION[header.head]})",
        "version": f"0x{header.version:04X}",
        "protocol_type": f"0x{ptype:02X} {_TYPE_NAMES.get(ptype, 'not decoded by ebcd')}",
        "source": f"{header.source} ({ {1: 'platform', 2: 'device'}.get(header.source, 'unknown') })",
        "body_length": header.body_length,
    }
    total = header.total_length
    if len(data) < total:
        return FrameDescription(fields, errors=(f"the body length makes {total} bytes, {len(data)} given",))
    errors = [f"{len(data) - total} trailing bytes after the frame"] if len(data) > total else []
    expected, found = frame_crc(data[:total])
    try:
        frame = decode_frame(data[:total], check_crc=False)
    except RemoteProtocolError as exc:
        return FrameDescription(fields, expected, found, (str(exc), *errors))
    try:
        body = decode_body(ptype, frame.body)
    except RemoteProtocolError as exc:
        errors.insert(0, str(exc))
        body = None
    if body is not None:
        message = _plain(body)
        assert isinstance(message, dict)  # noqa: S101 - a dataclass becomes a dict
        message.pop("protocol_type", None)
        if isinstance(body, StartStop):
            message["start"], message["end"] = _time(body.start), _time(body.end)
        if isinstance(body, Reply):
            message["result"] = f"{body.result} {result_meaning(body.result)}"
        if isinstance(body, Heartbeat):
            states = {int(s): s.name.lower() for s in AdapterState}
            message["state"] = f"{body.state} {states.get(body.state, 'unknown')}"
        if isinstance(body, TaskStart):
            message["covered"] = len(body.codes)
        fields["message"] = message
    elif ptype not in _TYPE_NAMES:
        fields["body"] = frame.body.hex(" ").upper()
    fields["signature"] = _signature_verdict(frame, verifier, variant, errors)
    if expected != found:
        errors.append(str(CrcError(expected, found)))
    return FrameDescription(fields, expected, found, tuple(errors))


def _signature_verdict(
    frame: Frame, verifier: Verifier | None, variant: SignedData, errors: list[str]
) -> str:
    if frame.unsigned:
        return "all zero: not signed"
    try:
        info = parse_signature(frame.signature)
    except SignatureError as exc:
        errors.append(f"signature: {exc}")
        return "malformed"
    claimed = f"key serial {info.serial}, signed at {_time(info.time)}"
    if verifier is None:
        return f"{claimed}; not verified (no key given)"
    try:
        verify_frame(frame, verifier, variant=variant)
    except SignatureError as exc:
        errors.append(f"signature: {exc}")
        return f"{claimed}; REFUSED ({exc.reason})"
    return f"{claimed}; verified ({variant.value})"


def describe_hex(
    text: str, *, verifier: Verifier | None = None, variant: SignedData = SignedData.HEADER_BODY
) -> FrameDescription:
    """`describe` for hex text as engineers paste it (spaces, colons, dashes and 0x prefixes allowed)."""
    cleaned = "".join(c for c in text.replace("0x", "").replace("0X", "") if c not in " \t\r\n:-,")
    try:
        data = bytes.fromhex(cleaned)
    except ValueError:
        return FrameDescription({}, errors=("not hex: odd number of digits or a character that is not hex",))
    return describe(data, verifier=verifier, variant=variant)


def is_adapter_hex(text: str) -> bool:
    """Whether pasted hex starts with an adapter frame's head byte (0x49 or 0x50)."""
    cleaned = "".join(c for c in text.replace("0x", "").replace("0X", "") if c not in " \t\r\n:-,")
    return cleaned[:2].lower() in ("49", "50")


def render(desc: FrameDescription) -> list[str]:
    """Human text lines, one field a line."""
    lines = [f"adapter frame: {'valid' if desc.valid else 'INVALID'}"]
    for key, value in desc.fields.items():
        if key == "message" and isinstance(value, dict):
            lines.append("  message")
            for k, v in value.items():
                if k == "codes" and isinstance(v, list):
                    lines.append(f"    {'codes':<16}{len(v)}")
                    lines += [f"      [{i}] {code}" for i, code in enumerate(v, 1)]
                elif k == "languages" and isinstance(v, list):
                    for i, lang in enumerate(v, 1):
                        lines.append(f"    language {i}")
                        lines += [f"      {lk:<14}{lv!r}" for lk, lv in lang.items()]
                else:
                    lines.append(f"    {k:<16}{v!r}")
        else:
            lines.append(f"  {key.replace('_', ' '):<16}{value}")
    if desc.crc_expected is not None:
        ok = desc.crc_expected == desc.crc_found
        verdict = (
            f"0x{desc.crc_found:08X} ok"
            if ok
            else f"MISMATCH: found 0x{desc.crc_found:08X}, expected 0x{desc.crc_expected:08X}"
        )
        lines.append(f"  {'CRC-32/MPEG-2':<16}{verdict}")
    lines += [f"error: {e}" for e in desc.errors]
    return lines
