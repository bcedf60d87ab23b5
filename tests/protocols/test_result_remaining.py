"""The broadcast result's optional remaining play time (ebcd's extension of 0x15): golden bytes, old form."""

from __future__ import annotations

import pytest

from ebcd.protocols.serial.frame import (
    BroadcastResult,
    Frame,
    FrameType,
    LocalProtocolError,
    MalformedFrameError,
    ResultStatus,
    decode_body,
    decode_frame,
    encode_body,
    encode_frame,
)
from tests.protocols.test_frame_golden import (
    EBMID,
    EBMID_BCD,
    GOLDEN,
    SOURCE,
    SRC_BCD,
    T1,
    T1_BCD,
    crc_bitwise,
    hx,
)

PLAYING = Frame(
    T1,
    (SOURCE,),
    BroadcastResult(EBMID, "a-1", revision=1, seq=7, status=ResultStatus.PLAYING, remaining_s=42),
    session=3,
    frame_type=FrameType.REPLY,
)
PLAYING_BYTES = hx(
    "fe fd",
    "01 00",
    "00 00 00 03",  # session 3, answering the query
    "02",  # reply
    "00 4c",  # total length 76 = 44 + 32
    T1_BCD,
    "00 01",
    SRC_BCD,
    "15",  # business type: broadcast result
    "00 20",  # data length 32 = the old form's 30 + 2
    EBMID_BCD,
    "00 01",  # revision 1
    "00 00 00 07",  # seq 7
    "02",  # status 2: playing
    "03",  # alert id length
    "61 2d 31",  # "a-1"
    "00",  # no cause
    "00 2a",  # remaining_s 42
    "bf 2d 98 25",  # CRC
)


def test_golden_result_with_remaining_seconds() -> None:
    assert crc_bitwise(PLAYING_BYTES[:-4]) == int.from_bytes(PLAYING_BYTES[-4:], "big")
    assert encode_frame(PLAYING) == PLAYING_BYTES
    assert decode_frame(PLAYING_BYTES) == PLAYING


def test_the_old_form_still_decodes_and_is_still_what_a_result_without_remaining_encodes_to() -> None:
    frame, wire = GOLDEN["broadcast result"]
    assert isinstance(frame.body, BroadcastResult)
    assert frame.body.remaining_s is None
    assert encode_frame(frame) == wire  # no remaining: not a byte more than before
    decoded = decode_frame(wire).body
    assert isinstance(decoded, BroadcastResult)
    assert decoded.remaining_s is None


def test_remaining_bounds_and_broken_trailers() -> None:
    body = BroadcastResult(EBMID, "a-1", 1, 7, ResultStatus.PLAYING, remaining_s=0xFFFF)
    data = encode_body(body)
    assert data.endswith(b"\xff\xff")
    assert decode_body(0x15, data) == body
    with pytest.raises(LocalProtocolError, match="remaining_s"):
        encode_body(BroadcastResult(EBMID, "a-1", 1, 7, ResultStatus.PLAYING, remaining_s=0x10000))
    with pytest.raises(MalformedFrameError, match="remaining seconds runs past the end"):
        decode_body(0x15, data[:-1])
    with pytest.raises(MalformedFrameError, match="1 trailing data bytes"):
        decode_body(0x15, data + b"\x00")
