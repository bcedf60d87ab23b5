"""Golden byte vectors for the adapter frames, written by hand from FIELD-PROTOCOLS.md §1.

Each vector lists its fields one per line; lengths were counted by hand, and each CRC is computed
with the bit-at-a-time reference below (not the codec's table).
"""

from __future__ import annotations

import pytest

from ebcd.protocols.adapter.bodies import (
    Heartbeat,
    Language,
    Reply,
    StartStop,
    Switch,
    TaskEnd,
    TaskStart,
    TaskStartReply,
    decode_body,
    encode_body,
)
from ebcd.protocols.adapter.frame import Frame, decode_frame, encode_frame
from ebcd.protocols.errors import CrcError, MalformedFrameError

ADAPTER = "63415231060010314010101"  # a village room driven by an adapter
T1 = "63415231060010314010401"
T2 = "63415231060010314010402"
EBMID = "43415230000000314010301" + "20261203" + "0001"

ADAPTER_BCD = "f6 34 15 23 10 60 01 03 14 01 01 01"  # one F nibble, then the 23 digits
T1_BCD = "f6 34 15 23 10 60 01 03 14 01 04 01"
T2_BCD = "f6 34 15 23 10 60 01 03 14 01 04 02"
EBMID_BCD = "f4 34 15 23 00 00 00 03 14 01 03 01 20 26 12 03 00 01"  # 35 digits in 18 bytes
ZERO_SIG = "00" * 74


def hx(*fields: str) -> bytes:
    """Bytes from hex fields written one per line."""
    return bytes.fromhex("".join(fields).replace(" ", ""))


def crc_bitwise(data: bytes) -> int:
    """CRC-32/MPEG-2 one bit at a time, straight from the definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def framed(*fields: str) -> bytes:
    """Fields up to the signature block, with the CRC appended by the reference CRC."""
    data = hx(*fields)
    return data + crc_bitwise(data).to_bytes(4, "big")


START = framed(
    "49",  # head: platform -> adapter
    "00 01",  # version
    "04",  # protocol type: start/stop
    "01",  # source: platform software
    "00 00 00 4d",  # body length 77
    EBMID_BCD,  # 18
    "01",  # switch: start
    "04",  # class: emergency broadcast
    "31 31 42 30 33",  # event type "11B03"
    "02",  # level 2
    "69 2f 8a 20",  # start 1764723232
    "69 2f a6 40",  # end 1764730432
    "50",  # volume 80
    "01",  # address type: logical
    "02",  # code count
    "0c",  # code length 12
    T1_BCD,
    T2_BCD,
    "01",  # language count
    "7a 68 6f",  # "zho"
    "01",  # character set GB 18030
    "00 04",  # text length
    "b2 e2 ca d4",  # "测试" in GB 18030
    "00",  # agency name length
    "00",  # auxiliary count
    "00",  # input channel
    "00",  # output count
    "00 4a",  # signature length 74
    ZERO_SIG,
)
START_BODY = StartStop(
    EBMID, Switch.START, 4, "11B03", 2, 0x692F8A20, 0x692FA640, 80, (T1, T2), (Language(text="测试"),)
)

REPLY_CONFLICT = framed(
    "50", "00 01", "12", "02", "00 00 00 10",
    "00 00 00 03",  # result 3: command conflict
    "00 00 00 08",  # description length
    "63 6f 6e 66 6c 69 63 74",  # "conflict"
    "00 4a", ZERO_SIG,
)  # fmt: skip

HEARTBEAT = framed(
    "50", "00 01", "20", "02", "00 00 00 12",  # body 18 = 1 + 12 + 1 + 4
    "0c",  # code length
    ADAPTER_BCD,
    "02",  # working
    "00 00 0e 10",  # connected 3600 s
    "00 4a", ZERO_SIG,
)  # fmt: skip

HEARTBEAT_TE = framed(
    "50", "00 01", "20", "02", "00 00 00 13",  # TE's layout: one more byte before the time
    "0c", ADAPTER_BCD, "01",
    "07",  # TE's auxiliary byte
    "00 00 00 05",
    "00 4a", ZERO_SIG,
)  # fmt: skip

TASK_START = framed(
    "50", "00 01", "18", "02", "00 00 00 44",  # body 68
    ADAPTER_BCD,
    EBMID_BCD,
    "01",  # program source: county platform
    "04",  # class
    "02",  # level
    "31 31 42 30 33",  # event type
    "00",  # input channel
    "00",  # output count
    "00",  # telephone length
    "50",  # volume
    "02", "0c", T1_BCD, T2_BCD,
    "00 4a", ZERO_SIG,
)  # fmt: skip

TASK_END = framed("50", "00 01", "19", "02", "00 00 00 1e", ADAPTER_BCD, EBMID_BCD, "00 4a", ZERO_SIG)

HEARTBEAT_REPLY = framed(
    "49", "00 01", "21", "01", "00 00 00 08", "00 00 00 00", "00 00 00 00", "00 4a", ZERO_SIG
)

TASK_START_REPLY = framed(
    "49", "00 01", "22", "01", "00 00 00 07", "00", "00 00 00 00", "00 00", "00 4a", ZERO_SIG
)

VECTORS = [
    pytest.param(START, 0x49, 1, START_BODY, id="0x04 start"),
    pytest.param(REPLY_CONFLICT, 0x50, 2, Reply(3, "conflict"), id="0x12 reply"),
    pytest.param(HEARTBEAT, 0x50, 2, Heartbeat(ADAPTER, 2, 3600), id="0x20 heartbeat"),
    pytest.param(HEARTBEAT_TE, 0x50, 2, Heartbeat(ADAPTER, 1, 5, auxiliary=7), id="0x20 heartbeat TE"),
    pytest.param(
        TASK_START, 0x50, 2, TaskStart(ADAPTER, EBMID, (T1, T2), 1, 4, 2, "11B03", volume=80), id="0x18"
    ),
    pytest.param(TASK_END, 0x50, 2, TaskEnd(ADAPTER, EBMID), id="0x19 task end"),
    pytest.param(HEARTBEAT_REPLY, 0x49, 1, Reply(0, protocol_type=0x21), id="0x21 reply"),  # type: ignore[arg-type]
    pytest.param(TASK_START_REPLY, 0x49, 1, TaskStartReply(0), id="0x22 reply"),
]


def test_reference_crc_is_crc32_mpeg2() -> None:
    assert crc_bitwise(b"123456789") == 0x0376E6E7


@pytest.mark.parametrize(("wire", "head", "source", "body"), VECTORS)
def test_encodes_byte_for_byte(wire: bytes, head: int, source: int, body: object) -> None:
    data = encode_body(body)  # type: ignore[arg-type]
    assert encode_frame(Frame(head, int(body.protocol_type), data, source=source)) == wire  # type: ignore[attr-defined]


@pytest.mark.parametrize(("wire", "head", "source", "body"), VECTORS)
def test_decodes_every_field(wire: bytes, head: int, source: int, body: object) -> None:
    frame = decode_frame(wire)
    assert (frame.head, frame.source, frame.unsigned) == (head, source, True)
    assert decode_body(frame.protocol_type, frame.body) == body


def test_start_text_comes_back_from_gb18030() -> None:
    body = decode_body(0x04, decode_frame(START).body)
    assert isinstance(body, StartStop)
    assert body.languages[0].text == "测试"
    assert body.codes == (T1, T2)


def test_one_flipped_bit_fails_the_crc() -> None:
    broken = bytearray(START)
    broken[20] ^= 0x01
    with pytest.raises(CrcError, match="CRC mismatch"):
        decode_frame(bytes(broken))


def test_a_wrong_signature_length_is_refused_by_name() -> None:
    wire = framed("50", "00 01", "19", "02", "00 00 00 1e", ADAPTER_BCD, EBMID_BCD, "00 40", ZERO_SIG)
    with pytest.raises(MalformedFrameError, match="signature length 64"):
        decode_frame(wire)


def test_a_version_other_than_1_is_refused() -> None:
    wire = framed("50", "00 02", "19", "02", "00 00 00 1e", ADAPTER_BCD, EBMID_BCD, "00 4a", ZERO_SIG)
    with pytest.raises(MalformedFrameError, match="version 0x0002"):
        decode_frame(wire)


def test_a_body_that_ends_early_names_the_field() -> None:
    wire = framed("50", "00 01", "19", "02", "00 00 00 14", ADAPTER_BCD, EBMID_BCD[:24], "00 4a", ZERO_SIG)
    body = decode_frame(wire).body
    with pytest.raises(MalformedFrameError, match="EBM id runs past the end"):
        decode_body(0x19, body)
