"""The frame codec's edges: BCD, message conversions, what it refuses to encode or decode, `describe`."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from ebcd.protocols.bcd import BcdError, pack_digits, pack_ebrid, unpack_digits, unpack_ebrid
from ebcd.protocols.crc import crc32_mpeg2
from ebcd.protocols.messages import AckStatus, PlayCommand, StopCommand, TerminalReport
from ebcd.protocols.serial.frame import (
    MAX_FRAME_BYTES,
    BroadcastResult,
    BroadcastStart,
    BroadcastStop,
    CrcError,
    Frame,
    FrameError,
    FrameType,
    Heartbeat,
    LocalProtocolError,
    MalformedFrameError,
    OversizeFrameError,
    Query,
    RemoteProtocolError,
    ResultStatus,
    TruncatedFrameError,
    body_command,
    command_body,
    decode_frame,
    describe,
    describe_hex,
    encode_frame,
    max_targets_per_frame,
    render_description,
    report_result,
    result_report,
)
from ebcd.security.bench import bench_signer
from ebcd.security.replay import quantize_command, sign_command, verify_command
from ebcd.security.signing import SignatureError

SOURCE = "43415230000000314010301"
T1 = "63415231010010314010401"
EBMID = SOURCE + "202406010001"


def play(**changes: object) -> PlayCommand:
    fields: dict[str, object] = {
        "alert_id": "a-1", "ebmid": EBMID, "revision": 2, "seq": 9, "level": 1, "event_type": "11B03",
        "text": "请立即转移", "ttl_s": 600.0, "volume": 100, "test": True,
    }  # fmt: skip
    fields.update(changes)
    return PlayCommand(**fields)  # type: ignore[arg-type]


def with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", crc32_mpeg2(body))


def test_bcd_round_trip_and_fill_nibble() -> None:
    assert pack_ebrid(SOURCE)[0] >> 4 == 0xF
    assert unpack_ebrid(pack_ebrid(SOURCE)) == SOURCE
    assert pack_digits("123", 3) == bytes.fromhex("ffF123")
    assert unpack_digits(bytes.fromhex("fff123"), 3) == "123"


@pytest.mark.parametrize(
    ("data", "digits", "why"),
    [
        (bytes.fromhex("0123"), 3, "fill nibble"),
        (bytes.fromhex("f12a"), 3, "non-digit nibble 0xA"),
        (bytes.fromhex("f1"), 3, "cannot hold"),
    ],
)
def test_bcd_rejects_non_digits(data: bytes, digits: int, why: str) -> None:
    with pytest.raises(BcdError, match=why):
        unpack_digits(data, digits)


@pytest.mark.parametrize(
    "code", ["4341523000000031401030", "4341523000000031401030x", "٤3415230000000314010301"]
)
def test_bcd_rejects_bad_codes(code: str) -> None:
    with pytest.raises(BcdError):
        pack_ebrid(code)


@pytest.mark.parametrize(("test", "resume"), [(False, False), (True, False), (False, True), (True, True)])
def test_play_command_round_trips_through_bytes(test: bool, resume: bool) -> None:
    cmd = play(targets=(T1,), test=test, resume=resume)
    frame = Frame(SOURCE, (T1,), command_body(cmd), session=77)
    decoded = decode_frame(encode_frame(frame))
    assert isinstance(decoded.body, BroadcastStart)
    assert decoded.body.resume is resume
    assert body_command(decoded.body, decoded.targets) == cmd


FLAGS_AT = 11 + 12 + 2 + 12 + 3 + 18 + 6 + 1 + 5 + 1 + 4  # a broadcast start to one target: its flags byte


def test_resume_is_bit_2_of_the_flags_byte_and_costs_no_byte() -> None:
    plain = encode_frame(Frame(SOURCE, (T1,), command_body(play(test=False))))
    resumed = encode_frame(Frame(SOURCE, (T1,), command_body(play(test=False, resume=True))))
    assert len(resumed) == len(plain)
    assert (plain[FLAGS_AT], resumed[FLAGS_AT]) == (0x00, 0x04)
    assert plain[:FLAGS_AT] == resumed[:FLAGS_AT]
    assert plain[FLAGS_AT + 1 : -4] == resumed[FLAGS_AT + 1 : -4]


def test_frames_of_older_encoders_decode_as_before_and_unknown_flags_are_ignored() -> None:
    wire = encode_frame(Frame(SOURCE, (T1,), command_body(play(test=True))))
    older = decode_frame(wire).body  # flags 0x01: what an encoder without the resume bit sends
    assert isinstance(older, BroadcastStart)
    assert (older.test, older.resume) == (True, False)
    future = with_crc(wire[:FLAGS_AT] + bytes([wire[FLAGS_AT] | 0x80]) + wire[FLAGS_AT + 1 : -4])
    assert decode_frame(future).body == older  # a flag this codec does not know changes nothing


def test_a_signed_resume_carried_by_a_frame_verifies_and_its_flag_is_authenticated() -> None:
    signer = bench_signer("ed25519")
    cmd = quantize_command(play(resume=True, issued_at=1_780_000_000.0))
    block = sign_command(signer, cmd)
    decoded = decode_frame(encode_frame(Frame(SOURCE, (T1,), command_body(cmd), signature=block)))
    assert isinstance(decoded.body, BroadcastStart)
    assert decoded.signature == block
    received = body_command(decoded.body, decoded.targets)
    assert verify_command(signer.verifier(), received, block).time == 1_780_000_000
    with pytest.raises(SignatureError):  # a resume flag cleared (or set) on the line no longer verifies
        verify_command(signer.verifier(), dataclasses.replace(received, resume=False), block)


def test_play_ttl_is_rounded_up_to_whole_seconds() -> None:
    rounded = [command_body(play(ttl_s=ttl)) for ttl in (0.2, 600.0, -5.0)]
    assert [body.ttl_s for body in rounded if isinstance(body, BroadcastStart)] == [1, 600, 0]


def test_stop_command_round_trips_through_bytes() -> None:
    cmd = StopCommand("a-1", EBMID, revision=2, seq=10, reason="cancelled", targets=(T1,))
    decoded = decode_frame(encode_frame(Frame(SOURCE, (T1,), command_body(cmd))))
    assert isinstance(decoded.body, BroadcastStop)
    assert body_command(decoded.body, decoded.targets) == cmd


@pytest.mark.parametrize("status", list(AckStatus))
def test_report_round_trips_through_result(status: AckStatus) -> None:
    report = TerminalReport(
        T1, "a-1", 2, status, cause="no power" if status is AckStatus.REFUSED else None, seq=9
    )
    frame = Frame(T1, (SOURCE,), report_result(report, EBMID), session=5, frame_type=FrameType.REPLY)
    decoded = decode_frame(encode_frame(frame))
    assert isinstance(decoded.body, BroadcastResult)
    assert result_report(decoded.source, decoded.body) == report


def test_never_received_result_is_no_report() -> None:
    assert result_report(T1, BroadcastResult(EBMID, "a-1", 1, 0, ResultStatus.UNKNOWN)) is None


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (Frame("123", (), Heartbeat()), "bad address"),
        (Frame(SOURCE, (T1,), Heartbeat(), session=1 << 32), "session"),
        (Frame(SOURCE, (), command_body(play(event_type="11B0"))), "event type"),
        (Frame(SOURCE, (), command_body(play(level=256))), "level"),
        (Frame(SOURCE, (), command_body(play(alert_id="警报"))), "alert id"),
        (Frame(SOURCE, (), command_body(play(text="x" * MAX_FRAME_BYTES))), "exceeds MAX_FRAME_BYTES"),
        (Frame(SOURCE, (), Query("1234", "a", 1)), "EBMID"),
    ],
)
def test_encode_refuses_what_the_format_cannot_carry(frame: Frame, why: str) -> None:
    with pytest.raises(LocalProtocolError, match=why):
        encode_frame(frame)


def test_max_targets_per_frame_is_exact() -> None:
    body = command_body(play())
    count = max_targets_per_frame(len(encode_frame(Frame(SOURCE, (), body))) - 32)
    encode_frame(Frame(SOURCE, (T1,) * count, body))
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(SOURCE, (T1,) * (count + 1), body))


GOOD = encode_frame(Frame(SOURCE, (T1,), Query(EBMID, "a-1", 1), session=3))


@pytest.mark.parametrize(
    ("data", "error", "why"),
    [
        (GOOD[:8], TruncatedFrameError, "needs at least"),
        (GOOD[:20], TruncatedFrameError, "20 bytes, the frame declares 68"),
        (GOOD[:-1], TruncatedFrameError, "declares"),
        (GOOD + b"\x00", MalformedFrameError, "trailing"),
        (b"\xfe\xfc" + GOOD[2:], MalformedFrameError, "header"),
        (GOOD[:2] + b"\x02\x00" + GOOD[4:], MalformedFrameError, "version 0x0200"),
        (GOOD[:8] + b"\x03" + GOOD[9:], MalformedFrameError, "frame type 0x03"),
        (GOOD[:9] + b"\x10\x01" + GOOD[11:], OversizeFrameError, "exceeds"),
        (GOOD[:-1] + bytes([GOOD[-1] ^ 1]), CrcError, "CRC mismatch"),
        # CRC right, but the source's fill nibble is a digit
        (with_crc(GOOD[:11] + b"\x04" + GOOD[12:-4]), MalformedFrameError, "fill nibble"),
        # CRC right, but the data length runs past the CRC
        (with_crc(GOOD[:38] + b"\x00\x40" + GOOD[40:-4]), MalformedFrameError, "runs past"),
        # CRC right, but the query body has one trailing byte inside a longer data length
        (
            with_crc(GOOD[:9] + b"\x00\x45" + GOOD[11:38] + b"\x00\x19" + GOOD[40:-4] + b"\x00"),
            MalformedFrameError,
            "trailing data",
        ),
    ],
)
def test_decode_says_why_bytes_are_not_a_frame(
    data: bytes, error: type[RemoteProtocolError], why: str
) -> None:
    with pytest.raises(error, match=why) as caught:
        decode_frame(data)
    assert isinstance(caught.value, FrameError)


def test_crc_error_carries_both_values() -> None:
    bad = GOOD[:-4] + b"\x00\x00\x00\x00"
    with pytest.raises(CrcError) as caught:
        decode_frame(bad)
    assert caught.value.found == 0
    assert caught.value.expected == int.from_bytes(GOOD[-4:], "big")


def test_unknown_result_status_is_malformed() -> None:
    wire = encode_frame(Frame(T1, (SOURCE,), BroadcastResult(EBMID, "a", 1, 1, ResultStatus.DONE)))
    at = 11 + 12 + 2 + 12 + 3 + 18 + 6  # status byte
    with pytest.raises(MalformedFrameError, match="status 9"):
        decode_frame(with_crc(wire[:at] + b"\x09" + wire[at + 1 : -4]))


def test_describe_valid_frame() -> None:
    desc = describe(encode_frame(Frame(SOURCE, (T1,), command_body(play()), session=42)))
    assert desc.valid
    assert desc.fields["source"] == SOURCE
    assert desc.fields["targets"] == [T1]
    assert desc.fields["business_type"] == 0x01
    assert desc.fields["business_type_name"] == "broadcast start"
    assert desc.fields["session"] == 42
    message = desc.fields["message"]
    assert isinstance(message, dict)
    assert message["content"] == "请立即转移"
    assert message["content_kind"] == "text"
    assert (message["test"], message["resume"]) == (True, False)
    assert message["ebmid"] == EBMID
    assert desc.crc_expected == desc.crc_found
    text = "\n".join(render_description(desc))
    assert "frame: valid" in text
    assert "0x01 broadcast start" in text
    assert f"[1] {T1}" in text
    assert "ok" in text.splitlines()[-1]


def test_describe_shows_the_resume_flag() -> None:
    desc = describe(encode_frame(Frame(SOURCE, (T1,), command_body(play(resume=True)), session=43)))
    assert desc.valid
    message = desc.fields["message"]
    assert isinstance(message, dict)
    assert message["resume"] is True
    assert "    resume        True" in render_description(desc)


def test_describe_crc_mismatch_shows_expected_and_found() -> None:
    bad = GOOD[:-4] + b"\x12\x34\x56\x78"
    desc = describe(bad)
    assert not desc.valid
    assert desc.crc_found == 0x12345678
    assert desc.crc_expected == int.from_bytes(GOOD[-4:], "big")
    assert desc.fields["business_type_name"] == "query"  # fields still shown
    assert desc.as_dict()["crc"] == {"expected": desc.crc_expected, "found": 0x12345678, "ok": False}
    text = "\n".join(render_description(desc))
    assert f"found 0x12345678, expected 0x{desc.crc_expected:08X}" in text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("hello", "not hex: character 'h'"),
        ("fefd0", "odd number of hex digits"),
        ("00 11 fe fd", "needs at least 32"),
        ("0011" + GOOD.hex(), "header is 00 11"),
        (GOOD[:-3].hex(), "3 missing"),
        (GOOD.hex() + "00", "1 trailing"),
    ],
)
def test_describe_says_why_it_is_not_a_frame(text: str, why: str) -> None:
    desc = describe_hex(text)
    assert not desc.valid
    assert any(why in error for error in desc.errors), desc.errors
    assert any(why in line for line in render_description(desc))


def test_describe_hex_accepts_pasted_formats() -> None:
    pasted = "0x" + ":".join(f"{b:02X}" for b in GOOD)
    assert describe_hex(pasted).valid
    assert describe_hex(GOOD.hex(" ")).valid
