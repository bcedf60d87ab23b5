"""The streaming frame decoder: any chunking, garbage, corruption, oversize lengths; plus properties."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebcd.protocols.crc import crc32_mpeg2
from ebcd.protocols.serial.frame import (
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    Body,
    BroadcastResult,
    BroadcastStart,
    BroadcastStop,
    ContentKind,
    FaultKind,
    FaultReport,
    Frame,
    FrameDecoder,
    FrameType,
    Heartbeat,
    LocalProtocolError,
    Query,
    RawBody,
    ResultStatus,
    TerminalState,
    decode_frame,
    encode_frame,
)

SOURCE = "43415230000000314010301"
T1 = "63415231010010314010401"
EBMID = SOURCE + "202406010001"


def frame_bytes(session: int, text: str = "x") -> bytes:
    body = BroadcastStart(EBMID, "a-1", 1, 1, 1, "11B03", 50, 60, text)
    return encode_frame(Frame(SOURCE, (T1,), body, session=session))


def drain(decoder: FrameDecoder) -> list[Frame]:
    return list(decoder)


def test_byte_at_a_time() -> None:
    wire = frame_bytes(1) + frame_bytes(2)
    decoder = FrameDecoder()
    sessions = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        sessions += [f.session for f in decoder]
    assert sessions == [1, 2]
    assert decoder.stats.frames == 2
    assert decoder.stats.discarded_bytes == 0
    assert decoder.buffered == 0


def test_garbage_between_frames_is_discarded_and_counted() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\xfe\xfd\x99junk" + frame_bytes(1) + b"\xfe" + frame_bytes(2) + b"tail\xfe")
    assert [f.session for f in decoder] == [1, 2]
    assert decoder.stats.discarded_bytes == 8 + 1 + 4
    assert decoder.buffered == 1  # a trailing 0xFE may start the next header


def test_corrupt_frame_is_counted_and_the_next_recovered() -> None:
    bad = bytearray(frame_bytes(1))
    bad[30] ^= 0x40
    decoder = FrameDecoder()
    decoder.feed(bytes(bad) + frame_bytes(2))
    assert [f.session for f in decoder] == [2]
    assert decoder.stats.crc_errors == 1
    assert decoder.last_error is not None


def test_oversize_declared_length_is_skipped_without_waiting() -> None:
    liar = bytearray(frame_bytes(1))
    liar[9:11] = struct.pack(">H", MAX_FRAME_BYTES + 1)
    decoder = FrameDecoder()
    decoder.feed(bytes(liar) + frame_bytes(2))
    assert [f.session for f in decoder] == [2]
    assert decoder.stats.oversize == 1


def test_smaller_bound_is_honoured() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    decoder.feed(frame_bytes(1, text="y" * 100) + frame_bytes(2))
    assert [f.session for f in decoder] == [2]
    assert decoder.stats.oversize == 1


def test_flush_partial_recovers_a_frame_behind_a_false_header() -> None:
    false_header = b"\xfe\xfd\x01\x00\x00\x00\x00\x00\x01\x0f\xa0"  # claims 4000 bytes
    decoder = FrameDecoder()
    decoder.feed(false_header + frame_bytes(7))
    assert drain(decoder) == []  # still waiting for the 4000 bytes the false header promised
    assert [f.session for f in decoder.flush_partial()] == [7]
    assert decoder.buffered == 0


def test_valid_crc_with_bad_body_is_skipped_whole() -> None:
    frame = bytearray(frame_bytes(1))
    frame[40] = 0x0A  # a non-digit nibble in the ebmid, then fix the CRC
    frame[-4:] = struct.pack(">I", crc32_mpeg2(frame[:-4]))
    decoder = FrameDecoder()
    decoder.feed(bytes(frame) + frame_bytes(2))
    assert [f.session for f in decoder] == [2]
    assert decoder.stats.malformed == 1
    assert decoder.stats.discarded_bytes == len(frame)


def test_misuse_raises_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder().feed("text")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_frame_bytes=MIN_FRAME_BYTES - 1)


# -- properties ---------------------------------------------------------------------------------

ebrids = st.from_regex(r"[1-6][0-9]{22}", fullmatch=True)
ebmids = st.from_regex(r"[0-9]{35}", fullmatch=True)
alert_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
short_text = st.text(max_size=30)

bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(
        BroadcastStart, ebmids, alert_ids, u16, u32, st.integers(0, 255),
        st.from_regex(r"[0-9A-Z]{5}", fullmatch=True), st.integers(0, 255), u32, short_text,
        st.sampled_from(ContentKind), st.booleans(),
    ),
    st.builds(BroadcastStop, ebmids, alert_ids, u16, u32, short_text),
    st.builds(Query, ebmids, alert_ids, u16),
    st.builds(Heartbeat, st.none() | st.sampled_from(TerminalState)),
    st.builds(BroadcastResult, ebmids, alert_ids, u16, u32, st.sampled_from(ResultStatus),
              st.none() | st.text(min_size=1, max_size=20)),
    st.builds(FaultReport, st.sampled_from(FaultKind), u16, short_text),
    st.builds(RawBody, st.sampled_from([0x11, 0x14, 0x16, 0x7F]), st.binary(max_size=40)),
)  # fmt: skip
frames = st.builds(
    Frame,
    ebrids,
    st.lists(ebrids, max_size=4).map(tuple),
    bodies,
    u32,
    st.sampled_from(FrameType),
    st.none() | st.binary(max_size=80),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300, deadline=None)
@given(frame=frames)
def test_any_frame_round_trips(frame: Frame) -> None:
    assert decode_frame(encode_frame(frame)) == frame


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=20))
def test_any_bytes_in_any_chunking_never_raise(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    decoded = 0
    for chunk in chunked(data, cuts):
        decoder.feed(chunk)
        decoded += sum(len(encode_frame(f)) for f in decoder)
    decoded += sum(len(encode_frame(f)) for f in decoder.flush_partial())
    # every byte fed is accounted for: in a frame, discarded, or (at most a 0xFE) still buffered
    assert decoded + decoder.stats.discarded_bytes + decoder.buffered == len(data)
    assert decoder.buffered == 0


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, often with header-like runs that tempt the decoder into a false start."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=30),
                st.just(b"\xfe\xfd"),
                st.builds(lambda n: b"\xfe\xfd\x01\x00\x00\x00\x00\x01\x01" + n.to_bytes(2, "big"),
                          st.integers(0, 0xFFFF)),
            ),
            max_size=5,
        )
    )  # fmt: skip
    return b"".join(parts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.tuples(garbage(), frames), min_size=1, max_size=6),
    tail=garbage(),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_frames_in_garbage_are_all_recovered(
    items: list[tuple[bytes, Frame]], tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(junk + encode_frame(frame) for junk, frame in items) + tail
    decoder = FrameDecoder()
    recovered: list[Frame] = []
    for chunk in chunked(stream, cuts):
        decoder.feed(chunk)
        recovered += decoder
    recovered += decoder.flush_partial()
    assert recovered == [frame for _, frame in items]
