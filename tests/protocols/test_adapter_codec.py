"""The adapter codec against the peers' pitfalls, signatures of both schemes, and any chunking."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebcd.protocols.adapter.bodies import Heartbeat, TaskEnd, decode_body, encode_body
from ebcd.protocols.adapter.describe import describe, render
from ebcd.protocols.adapter.frame import (
    HEAD_ADAPTER,
    HEAD_PLATFORM,
    MAX_BODY_BYTES,
    Frame,
    FrameDecoder,
    SignedData,
    decode_frame,
    encode_frame,
    sign_frame,
    verify_frame,
)
from ebcd.protocols.errors import MalformedFrameError
from ebcd.security.signing import (
    Ed25519SigningKey,
    Scheme,
    SignatureError,
    SignatureFailure,
    Signer,
    Sm2SigningKey,
    Sm2VerifyingKey,
)
from tests.protocols.test_adapter_golden import ADAPTER, EBMID, HEARTBEAT, START, TASK_END, framed

NOW = 1764756000
SM2_D = 0x1D1E2F3A4B5C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3D4E5F6
# nonces found by search for the 0x19 frame below (header + body signed): r, resp. s, below 2^248
NONCE_SHORT_R = 510
NONCE_SHORT_S = 61


@dataclass(frozen=True, slots=True)
class FixedNonceSm2:
    """A real SM2 key signing with a chosen nonce, to reach the short-r and short-s cases on purpose."""

    scheme: ClassVar[Scheme] = "sm2"
    key: Sm2SigningKey
    nonce: int

    def sign_raw(self, message: bytes) -> bytes:
        rs = self.key.sign_with_nonce(message, self.nonce)
        assert rs is not None
        return rs

    def public_key(self) -> Sm2VerifyingKey:
        return self.key.public

    def file_text(self, serial: str) -> str:
        return self.key.file_text(serial)


def task_end() -> Frame:
    return Frame(HEAD_ADAPTER, 0x19, encode_body(TaskEnd(ADAPTER, EBMID)), source=2)


# -- pitfalls -----------------------------------------------------------------------------------
def test_a_code_packed_with_an_ff_prefix_is_refused_saying_the_last_digit_is_lost() -> None:
    # TE: BCD("FF" + code) puts 25 nibbles in 12 bytes and drops the code's last digit
    te_code = bytes.fromhex("FF" + ADAPTER[:22])
    body = te_code + encode_body(TaskEnd(ADAPTER, EBMID))[12:]
    with pytest.raises(MalformedFrameError, match=r"two F nibbles.*last digit"):
        decode_body(0x19, body)


def test_the_decoder_skips_a_frame_with_a_25_nibble_code_and_reads_the_next() -> None:
    te_code = "ff" + ADAPTER[:22]
    bad = framed("50", "00 01", "19", "02", "00 00 00 1e", te_code, EBMID_HEX, "00 4a", "00" * 74)
    decoder = FrameDecoder()
    decoder.feed(bad + TASK_END)
    frames = list(decoder)
    # the frame is well formed; its body is what is wrong, and that is the link's to refuse
    assert len(frames) == 2
    with pytest.raises(MalformedFrameError):
        decode_body(0x19, frames[0].body)
    assert decode_body(0x19, frames[1].body) == TaskEnd(ADAPTER, EBMID)


EBMID_HEX = "f" + EBMID


@pytest.mark.parametrize(("nonce", "slot"), [(NONCE_SHORT_R, 10), (NONCE_SHORT_S, 42)], ids=["r", "s"])
def test_a_short_r_or_s_is_padded_to_32_bytes_and_verifies(nonce: int, slot: int) -> None:
    signer = Signer(FixedNonceSm2(Sm2SigningKey.from_scalar(SM2_D), nonce), "000000000001")
    frame = sign_frame(task_end(), signer, now=NOW)
    assert len(frame.signature) == 74
    assert frame.signature[slot] == 0  # the leading zero byte kept in its slot
    decoded = decode_frame(encode_frame(frame))
    assert verify_frame(decoded, signer.verifier()).serial == "000000000001"


def test_a_stripped_short_r_fails_verification_with_a_reason_never_a_crash() -> None:
    signer = Signer(FixedNonceSm2(Sm2SigningKey.from_scalar(SM2_D), NONCE_SHORT_R), "000000000001")
    frame = sign_frame(task_end(), signer, now=NOW)
    # LY's copy: r without its leading zero, everything after it shifted one byte left
    stripped = frame.signature[:10] + frame.signature[11:] + b"\x00"
    broken = Frame(frame.head, frame.protocol_type, frame.body, stripped, frame.source)
    with pytest.raises(SignatureError) as err:
        verify_frame(decode_frame(encode_frame(broken)), signer.verifier())
    assert err.value.reason is SignatureFailure.BAD_SIGNATURE


def test_an_all_zero_block_is_read_as_unsigned_and_refused_by_a_verifier() -> None:
    frame = decode_frame(TASK_END)
    assert frame.unsigned
    signer = Signer(Ed25519SigningKey.generate(), "7")
    with pytest.raises(SignatureError) as err:
        verify_frame(frame, signer.verifier())
    assert err.value.reason is SignatureFailure.UNKNOWN_KEY  # serial 000000000000 is nobody's


@pytest.mark.parametrize("scheme", ["ed25519", "sm2"])
def test_the_two_signed_data_variants_verify_only_as_themselves(scheme: str) -> None:
    key = Ed25519SigningKey.generate() if scheme == "ed25519" else Sm2SigningKey.from_scalar(SM2_D)
    signer = Signer(key, "42")
    for variant, other in [
        (SignedData.HEADER_BODY, SignedData.HEADER_BODY_TIME),
        (SignedData.HEADER_BODY_TIME, SignedData.HEADER_BODY),
    ]:
        frame = decode_frame(encode_frame(sign_frame(task_end(), signer, now=NOW, variant=variant)))
        assert verify_frame(frame, signer.verifier(), variant=variant).time == NOW
        with pytest.raises(SignatureError) as err:
            verify_frame(frame, signer.verifier(), variant=other)
        assert err.value.reason is SignatureFailure.BAD_SIGNATURE


def test_a_changed_body_breaks_the_signature() -> None:
    signer = Signer(Ed25519SigningKey.generate(), "42")
    frame = sign_frame(task_end(), signer, now=NOW)
    forged = Frame(
        frame.head, frame.protocol_type, encode_body(TaskEnd(ADAPTER, "9" * 35)), frame.signature, 2
    )
    with pytest.raises(SignatureError):
        verify_frame(decode_frame(encode_frame(forged)), signer.verifier())


# -- decode for engineers -----------------------------------------------------------------------
def test_describe_names_fields_codes_text_and_verdicts() -> None:
    text = "\n".join(render(describe(START)))
    assert "0x04 broadcast start/stop" in text
    assert "63415231060010314010401" in text
    assert "测试" in text
    assert "all zero: not signed" in text
    assert "ok" in text.splitlines()[-1]


def test_describe_reports_a_bad_crc_and_a_short_capture() -> None:
    broken = bytearray(HEARTBEAT)
    broken[-1] ^= 0xFF
    desc = describe(bytes(broken))
    assert not desc.valid
    assert any("CRC mismatch" in e for e in desc.errors)
    assert describe(HEARTBEAT[:40]).errors[0].startswith("the body length makes")


def test_describe_shows_a_verified_signature() -> None:
    signer = Signer(Ed25519SigningKey.generate(), "42")
    wire = encode_frame(sign_frame(task_end(), signer, now=NOW))
    desc = describe(wire, verifier=signer.verifier())
    assert desc.valid
    assert "verified" in str(desc.fields["signature"])


# -- the streaming decoder ------------------------------------------------------------------------
def test_a_platform_side_decoder_ignores_platform_frames() -> None:
    decoder = FrameDecoder(heads=(HEAD_ADAPTER,))
    decoder.feed(START + HEARTBEAT)
    assert [f.protocol_type for f in decoder] == [0x20]
    assert decoder.stats.discarded_bytes > 0


def test_a_huge_length_field_is_skipped_not_waited_for() -> None:
    huge = bytes.fromhex("50 0001 20 02 7fffffff".replace(" ", ""))
    decoder = FrameDecoder()
    decoder.feed(huge + HEARTBEAT)
    assert [f.protocol_type for f in decoder] == [0x20]
    assert decoder.stats.oversize == 1
    assert decoder.buffered == 0


def test_a_length_just_over_the_bound_counts_as_oversize() -> None:
    over = (0x50).to_bytes(1) + bytes.fromhex("0001 20 02") + (MAX_BODY_BYTES + 1).to_bytes(4, "big")
    decoder = FrameDecoder()
    decoder.feed(over)
    assert decoder.next_frame() is None
    assert decoder.stats.oversize == 1


FRAMES = [START, HEARTBEAT, TASK_END]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.sampled_from(range(len(FRAMES))), min_size=1, max_size=6),
    junk=st.lists(st.binary(max_size=40), min_size=7, max_size=7),
    cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
)
def test_any_chunking_with_garbage_between_frames_yields_every_frame(
    picks: list[int], junk: list[bytes], cuts: list[int]
) -> None:
    # garbage without head bytes, so it cannot start a frame that swallows the next one
    clean = [j.replace(b"\x49", b"").replace(b"\x50", b"") for j in junk]
    stream = clean[-1] + b"".join(FRAMES[p] + clean[i] for i, p in enumerate(picks))
    decoder = FrameDecoder()
    out: list[Frame] = []
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        decoder.feed(stream[pos : pos + step])
        out += list(decoder)
        pos, i = pos + step, i + 1
    assert [encode_frame(f) for f in out] == [FRAMES[p] for p in picks]
    assert decoder.buffered <= MAX_BODY_BYTES + 100


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_and_stay_bounded(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    for frame in decoder:
        with contextlib.suppress(MalformedFrameError):
            decode_body(frame.protocol_type, frame.body)
    assert decoder.buffered <= len(data)
    describe(data)  # never raises either


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FRAMES), st.integers(min_value=0, max_value=200), st.integers(0, 255))
def test_a_corrupted_byte_loses_at_most_that_frame(wire: bytes, at: int, value: int) -> None:
    broken = bytearray(wire)
    broken[at % len(wire)] = value
    decoder = FrameDecoder()
    decoder.feed(bytes(broken) + HEARTBEAT)
    frames = list(decoder)
    if decoder.buffered == 0:
        assert encode_frame(frames[-1]) == HEARTBEAT
    else:  # the corruption raised the body length: the decoder waits for that many bytes, no more
        assert decoder.buffered <= MAX_BODY_BYTES + 100


def test_heartbeat_of_both_layouts_round_trips() -> None:
    for hb in (Heartbeat(ADAPTER, 3, 12), Heartbeat(ADAPTER, 1, 12, auxiliary=0)):
        wire = encode_frame(Frame(HEAD_ADAPTER, 0x20, encode_body(hb), source=2))
        assert decode_body(0x20, decode_frame(wire).body) == hb
    assert HEAD_PLATFORM == 0x49


def test_ebcd_frame_decode_tells_adapter_frames_by_their_head_byte() -> None:
    from typer.testing import CliRunner

    from ebcd.cli.commands import app

    runner = CliRunner()
    ok = runner.invoke(app, ["frame", "decode", " ".join(f"{b:02x}" for b in TASK_END)])
    assert ok.exit_code == 0, ok.output
    assert "0x19 task end report" in ok.output
    assert ADAPTER in ok.output
    broken = bytearray(TASK_END)
    broken[12] ^= 0x10
    bad = runner.invoke(app, ["frame", "decode", bytes(broken).hex()])
    assert bad.exit_code == 2
    assert "CRC mismatch" in bad.output
