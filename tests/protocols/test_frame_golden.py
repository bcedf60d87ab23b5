"""Golden byte vectors for every serial frame type, written by hand from the layout in frame.py.

Each vector lists its fields one per line; lengths were counted by hand, and each CRC was computed
with the bit-at-a-time reference below (not the codec's table), so encoder, decoder and CRC table
are all checked against something independent of them.
"""

from __future__ import annotations

import pytest

from ebcd.protocols.crc import CRC32_MPEG2_CHECK, crc32_mpeg2
from ebcd.protocols.serial.frame import (
    BroadcastResult,
    BroadcastStart,
    BroadcastStop,
    FaultKind,
    FaultReport,
    Frame,
    FrameType,
    Heartbeat,
    Query,
    RawBody,
    ResultStatus,
    TerminalState,
    decode_frame,
    encode_frame,
)

SOURCE = "43415230000000314010301"  # district platform
T1 = "63415231010010314010401"  # village terminal 1
T2 = "63415231010010314010402"  # village terminal 2
EBMID = SOURCE + "20240601" + "0001"

SRC_BCD = "f4 34 15 23 00 00 00 03 14 01 03 01"  # 0xF fill nibble, then the 23 digits
T1_BCD = "f6 34 15 23 10 10 01 03 14 01 04 01"
T2_BCD = "f6 34 15 23 10 10 01 03 14 01 04 02"
EBMID_BCD = "f4 34 15 23 00 00 00 03 14 01 03 01 20 24 06 01 00 01"  # 35 digits in 18 bytes


def hx(*fields: str) -> bytes:
    """Bytes from hex fields written one per line."""
    return bytes.fromhex("".join(fields))


def crc_bitwise(data: bytes) -> int:
    """CRC-32/MPEG-2 one bit at a time, straight from the definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


GOLDEN: dict[str, tuple[Frame, bytes]] = {
    "broadcast start": (
        Frame(
            SOURCE,
            (T1, T2),
            BroadcastStart(
                EBMID,
                "a-1",
                revision=1,
                seq=7,
                level=2,
                event_type="11B03",
                volume=80,
                ttl_s=600,
                content="暴雨",
            ),
            session=1,
        ),
        hx(
            "fe fd",  # header
            "01 00",  # version
            "00 00 00 01",  # session 1
            "01",  # request, unsigned
            "00 68",  # total length 104 = 56 fixed with 2 targets + 48 data
            SRC_BCD,  # source
            "00 02",  # 2 targets
            T1_BCD,
            T2_BCD,
            "01",  # business type: broadcast start
            "00 30",  # data length 48
            EBMID_BCD,  # ebmid
            "00 01",  # revision 1
            "00 00 00 07",  # seq 7
            "02",  # level 2 (orange)
            "31 31 42 30 33",  # event type "11B03"
            "50",  # volume 80 %
            "00 00 02 58",  # ttl 600 s
            "00",  # flags: not a test, text content
            "03",  # alert id length
            "61 2d 31",  # "a-1"
            "00 06",  # content length
            "e6 9a b4 e9 9b a8",  # "暴雨" in UTF-8
            "38 24 8f 80",  # CRC
        ),
    ),
    "broadcast start, a test resumed": (
        Frame(
            SOURCE,
            (T1,),
            BroadcastStart(
                EBMID,
                "a-1",
                revision=2,
                seq=11,
                level=4,
                event_type="20000",
                volume=0xFF,
                ttl_s=600,
                content="暴雨",
                test=True,
                resume=True,
            ),
            session=10,
        ),
        hx(
            "fe fd",  # header
            "01 00",  # version
            "00 00 00 0a",  # session 10
            "01",  # request, unsigned
            "00 5c",  # total length 92 = 44 fixed with 1 target + 48 data
            SRC_BCD,  # source
            "00 01",  # 1 target
            T1_BCD,
            "01",  # business type: broadcast start
            "00 30",  # data length 48: the resume flag costs no byte
            EBMID_BCD,  # ebmid
            "00 02",  # revision 2
            "00 00 00 0b",  # seq 11
            "04",  # level 4 (blue)
            "32 30 30 30 30",  # event type "20000" (daily broadcast)
            "ff",  # volume unchanged
            "00 00 02 58",  # ttl 600 s
            "05",  # flags: bit 0 test, bit 2 resume (play again after a pre-emption), text content
            "03",  # alert id length
            "61 2d 31",  # "a-1"
            "00 06",  # content length
            "e6 9a b4 e9 9b a8",  # "暴雨" in UTF-8
            "64 c4 e3 5e",  # CRC
        ),
    ),
    "broadcast stop": (
        Frame(SOURCE, (T1,), BroadcastStop(EBMID, "a-1", revision=1, seq=8, reason="取消"), session=2),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 02",  # session 2
            "01",  # request
            "00 4f",  # total length 79 = 44 fixed with 1 target + 35 data
            SRC_BCD,
            "00 01",  # 1 target
            T1_BCD,
            "02",  # business type: broadcast stop
            "00 23",  # data length 35
            EBMID_BCD,
            "00 01",  # revision 1
            "00 00 00 08",  # seq 8
            "03",  # alert id length
            "61 2d 31",  # "a-1"
            "06",  # reason length
            "e5 8f 96 e6 b6 88",  # "取消"
            "f2 6f a5 e6",  # CRC
        ),
    ),
    "query": (
        Frame(SOURCE, (T1,), Query(EBMID, "a-1", revision=1), session=3),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 03",  # session 3
            "01",  # request
            "00 44",  # total length 68 = 44 + 24
            SRC_BCD,
            "00 01",
            T1_BCD,
            "03",  # business type: query
            "00 18",  # data length 24
            EBMID_BCD,
            "00 01",  # revision 1
            "03",  # alert id length
            "61 2d 31",  # "a-1"
            "83 36 c9 26",  # CRC
        ),
    ),
    "heartbeat poll": (
        Frame(SOURCE, (T1,), Heartbeat(), session=4),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 04",  # session 4
            "01",  # request
            "00 2c",  # total length 44: no data
            SRC_BCD,
            "00 01",
            T1_BCD,
            "10",  # business type: heartbeat
            "00 00",  # data length 0
            "bc 05 59 f2",  # CRC
        ),
    ),
    "heartbeat reply": (
        Frame(T1, (SOURCE,), Heartbeat(TerminalState.WORKING), session=4, frame_type=FrameType.REPLY),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 04",  # session 4, echoing the poll
            "02",  # reply
            "00 2d",  # total length 45
            T1_BCD,  # source: the terminal
            "00 01",
            SRC_BCD,  # target: the platform
            "10",  # heartbeat
            "00 01",  # data length 1
            "02",  # state 2: working
            "55 00 2c 15",  # CRC
        ),
    ),
    "broadcast result": (
        Frame(
            T1,
            (SOURCE,),
            BroadcastResult(EBMID, "a-1", revision=1, seq=7, status=ResultStatus.DONE),
            session=3,
            frame_type=FrameType.REPLY,
        ),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 03",  # session 3, answering the query
            "02",  # reply
            "00 4a",  # total length 74 = 44 + 30
            T1_BCD,
            "00 01",
            SRC_BCD,
            "15",  # business type: broadcast result
            "00 1e",  # data length 30
            EBMID_BCD,
            "00 01",  # revision 1
            "00 00 00 07",  # seq 7
            "03",  # status 3: done
            "03",  # alert id length
            "61 2d 31",  # "a-1"
            "00",  # no cause
            "f0 50 cf 92",  # CRC
        ),
    ),
    "broadcast result refused": (
        Frame(
            T2,
            (SOURCE,),
            BroadcastResult(EBMID, "a-1", revision=1, seq=7, status=ResultStatus.REFUSED, cause="expired"),
            session=0x100,
            frame_type=FrameType.REPLY,
        ),
        hx(
            "fe fd",
            "01 00",
            "00 00 01 00",  # session 256
            "02",  # reply
            "00 51",  # total length 81 = 44 + 37
            T2_BCD,
            "00 01",
            SRC_BCD,
            "15",  # broadcast result
            "00 25",  # data length 37
            EBMID_BCD,
            "00 01",  # revision
            "00 00 00 07",  # seq
            "04",  # status 4: refused
            "03",
            "61 2d 31",  # "a-1"
            "07",  # cause length
            "65 78 70 69 72 65 64",  # "expired"
            "5e 2a 49 b1",  # CRC
        ),
    ),
    "fault report": (
        Frame(
            T1,
            (SOURCE,),
            FaultReport(FaultKind.FAULT, code=42, description="amplifier"),
            session=5,
            frame_type=FrameType.REPLY,
        ),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 05",
            "02",  # reply
            "00 39",  # total length 57 = 44 + 13
            T1_BCD,
            "00 01",
            SRC_BCD,
            "13",  # business type: fault report
            "00 0d",  # data length 13
            "01",  # kind 1: fault
            "00 2a",  # fault code 42
            "09",  # description length
            "61 6d 70 6c 69 66 69 65 72",  # "amplifier"
            "d2 1c 9c bd",  # CRC
        ),
    ),
    "signed heartbeat poll": (
        Frame(SOURCE, (T1,), Heartbeat(), session=6, signature=bytes.fromhex("deadbeef")),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 06",
            "81",  # request, bit 7: signature block present
            "00 32",  # total length 50 = 44 + 2 + 4
            SRC_BCD,
            "00 01",
            T1_BCD,
            "10",  # heartbeat
            "00 00",  # no data
            "00 04",  # signature length
            "de ad be ef",  # signature bytes
            "be 83 be 79",  # CRC covers the signature block too
        ),
    ),
    "broadcast log, not parsed": (
        Frame(T1, (), RawBody(0x16, b"\xaa\xbb\xcc"), session=9),
        hx(
            "fe fd",
            "01 00",
            "00 00 00 09",
            "01",  # unsolicited
            "00 23",  # total length 35: no targets
            T1_BCD,
            "00 00",  # 0 targets
            "16",  # business type: broadcast log
            "00 03",
            "aa bb cc",
            "80 8e 89 6f",  # CRC
        ),
    ),
}


def test_crc_check_value() -> None:
    assert crc32_mpeg2(b"123456789") == 0x0376E6E7 == CRC32_MPEG2_CHECK
    assert crc_bitwise(b"123456789") == 0x0376E6E7


def test_crc_continues_over_chunks() -> None:
    assert crc32_mpeg2(b"56789", crc32_mpeg2(b"1234")) == 0x0376E6E7


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_crc_is_the_reference_crc(name: str) -> None:
    _, wire = GOLDEN[name]
    assert int.from_bytes(wire[-4:], "big") == crc_bitwise(wire[:-4]) == crc32_mpeg2(wire[:-4])


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_encode(name: str) -> None:
    frame, wire = GOLDEN[name]
    assert encode_frame(frame).hex(" ") == wire.hex(" ")


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_decode(name: str) -> None:
    frame, wire = GOLDEN[name]
    assert decode_frame(wire) == frame
