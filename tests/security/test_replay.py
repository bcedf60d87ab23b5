"""The replay guard, and the canonical bytes a command is signed over on every link."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebcd.protocols.messages import Command, PlayCommand, StopCommand
from ebcd.protocols.mqtt.codec import decode_command, encode_command
from ebcd.protocols.serial.bodies import body_command, command_body
from ebcd.security.replay import (
    REPLAY_WINDOW_S,
    ReplayError,
    ReplayGuard,
    ReplayReason,
    canonical_command_bytes,
    quantize_command,
    sign_command,
    verify_command,
)
from ebcd.security.signing import (
    Ed25519SigningKey,
    SecurityError,
    SignatureError,
    SignatureFailure,
    Signer,
    Sm2SigningKey,
)

NOW = 1_764_160_000.0
KEY = "000000000001"
PLAY = PlayCommand(
    alert_id="20261126-0001",
    ebmid="43415230000000104010101202611260001",
    revision=1,
    seq=1764160000123,
    level=2,
    event_type="11B03",
    text="暴雨橙色预警：请注意防范。",
    ttl_s=3599.2004,
    volume=255,
    test=False,
    issued_at=1764160000.75,
    targets=("63415231020050314010401",),
)
STOP = StopCommand(PLAY.alert_id, PLAY.ebmid, 1, PLAY.seq + 1, "cancelled", 1764160100.5)
PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def refused(
    guard: ReplayGuard, seq: int, issued_at: float = NOW, now: float = NOW, key: str = KEY
) -> ReplayReason:
    with pytest.raises(ReplayError) as info:
        guard.check(key, seq, issued_at, now)
    assert isinstance(info.value, SecurityError)
    return info.value.reason


# -- the guard ------------------------------------------------------------------------------


def test_repeats_are_refused() -> None:
    guard = ReplayGuard(REPLAY_WINDOW_S)
    guard.check(KEY, 100, NOW, NOW)
    assert refused(guard, 100) is ReplayReason.REPLAYED
    guard.check(KEY, 101, NOW, NOW)
    assert refused(guard, 100) is ReplayReason.REPLAYED
    assert refused(guard, 101) is ReplayReason.REPLAYED
    guard.check("000000000002", 100, NOW, NOW)  # another sender has its own seqs


def test_reorder_window() -> None:
    guard = ReplayGuard(60, reorder=10)
    guard.check(KEY, 100, NOW, NOW)
    guard.check(KEY, 95, NOW, NOW)  # late, unseen, within 10 of the highest
    guard.check(KEY, 90, NOW, NOW)  # exactly 10 below
    assert refused(guard, 89) is ReplayReason.REPLAYED  # 11 below
    assert refused(guard, 95) is ReplayReason.REPLAYED
    guard.check(KEY, 120, NOW, NOW)
    assert refused(guard, 109) is ReplayReason.REPLAYED
    guard.check(KEY, 110, NOW, NOW)
    strict = ReplayGuard(60, reorder=0)
    strict.check(KEY, 5, NOW, NOW)
    assert refused(strict, 4) is ReplayReason.REPLAYED
    assert refused(strict, 5) is ReplayReason.REPLAYED
    strict.check(KEY, 6, NOW, NOW)


def test_window_edges() -> None:
    guard = ReplayGuard(60)
    guard.check(KEY, 1, NOW - 60, NOW)  # exactly the window old: accepted
    guard.check(KEY, 2, NOW + 60, NOW)  # exactly the window ahead: accepted
    assert refused(guard, 3, NOW - 60.001) is ReplayReason.STALE
    assert refused(guard, 3, NOW + 60.001) is ReplayReason.STALE
    assert refused(guard, 3, 0.0) is ReplayReason.STALE  # a clock of 1970 on either side
    assert refused(guard, 3, NOW, now=0.0) is ReplayReason.STALE
    for bad in (math.nan, math.inf, -math.inf):
        assert refused(guard, 3, bad) is ReplayReason.STALE
        assert refused(guard, 3, NOW, now=bad) is ReplayReason.STALE
    guard.check(KEY, 3, NOW, NOW)  # refusals recorded nothing


def test_stale_reason_says_which_way() -> None:
    guard = ReplayGuard(60)
    with pytest.raises(ReplayError, match=r"61\.0 s ago"):
        guard.check(KEY, 1, NOW - 61, NOW)
    with pytest.raises(ReplayError, match=r"90\.0 s ahead"):
        guard.check(KEY, 1, NOW + 90, NOW)


def test_bounded_memory_in_order() -> None:
    guard = ReplayGuard(60, max_entries=1000, reorder=10**9)
    for seq in range(100_000):
        guard.check(KEY, seq, NOW, NOW)
    assert guard.entries == 1000
    assert refused(guard, 98_999) is ReplayReason.REPLAYED  # forgotten, so refused, never accepted again
    assert refused(guard, 99_000) is ReplayReason.REPLAYED  # remembered
    guard.check(KEY, 100_000, NOW, NOW)


def test_bounded_memory_shuffled() -> None:
    seqs = list(range(100_000))
    random.Random(7).shuffle(seqs)
    guard = ReplayGuard(60, max_entries=500, reorder=10**9)
    accepted = set()
    for seq in seqs:
        try:
            guard.check(KEY, seq, NOW, NOW)
        except ReplayError:
            continue
        accepted.add(seq)
        assert guard.entries <= 500
    assert len(accepted) > 500
    for seq in sorted(accepted)[:100]:
        assert refused(guard, seq) is ReplayReason.REPLAYED


def test_bounded_senders() -> None:
    guard = ReplayGuard(60, max_entries=10, max_senders=8)
    for sender in range(100):
        for seq in range(20):
            guard.check(f"{sender:012d}", seq, NOW, NOW)
    assert guard.senders == 8
    assert guard.entries <= 8 * 10


def test_bad_parameters() -> None:
    for kwargs in ({"max_entries": 0}, {"reorder": -1}, {"max_senders": 0}):
        with pytest.raises(ValueError, match="at least"):
            ReplayGuard(60, **kwargs)
    for window in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="window_s"):
            ReplayGuard(window)


checks = st.lists(
    st.tuples(
        st.sampled_from(["000000000001", "000000000002", "000000000003"]),
        st.integers(0, 60),
        st.one_of(st.floats(-100, 100), st.sampled_from([math.nan, math.inf, -math.inf, 1e300])),
    ),
    max_size=200,
)


@PROPERTY
@given(checks, st.integers(0, 8), st.integers(1, 12))
def test_property_passes_or_replay_error(
    items: list[tuple[str, int, float]], reorder: int, entries: int
) -> None:
    """Any sequence passes or raises ReplayError; nothing is accepted twice; memory stays bounded."""
    guard = ReplayGuard(30, max_entries=entries, reorder=reorder, max_senders=4)
    accepted: set[tuple[str, int]] = set()
    for sender, seq, offset in items:
        reason = None
        try:
            guard.check(sender, seq, NOW + offset, NOW)
        except ReplayError as exc:
            reason = exc.reason
        if reason is not None:
            assert reason in (ReplayReason.STALE, ReplayReason.REPLAYED)
            assert (reason is ReplayReason.STALE) == (not abs(offset) <= 30)
            continue
        assert (sender, seq) not in accepted
        accepted.add((sender, seq))
        assert guard.entries <= 3 * entries


@PROPERTY
@given(st.lists(st.integers(0, 100), max_size=200), st.integers(0, 20))
def test_property_matches_the_rule(seqs: list[int], reorder: int) -> None:
    """Without eviction, a seq passes exactly when it is unseen and at most `reorder` below the highest."""
    guard = ReplayGuard(30, max_entries=reorder + 1, reorder=reorder)
    seen: set[int] = set()
    for seq in seqs:
        expected = seq not in seen and (not seen or seq >= max(seen) - reorder)
        try:
            guard.check(KEY, seq, NOW, NOW)
        except ReplayError:
            assert not expected
        else:
            assert expected
            seen.add(seq)


# -- canonical bytes, signed once, verified on either link -------------------------------------


def test_canonical_bytes_golden() -> None:
    assert canonical_command_bytes(STOP) == (
        b'{"alert":"20261126-0001","ebmid":"43415230000000104010101202611260001","issued":1764160100,'
        b'"op":"stop","reason":"cancelled","rev":1,"seq":1764160000124,"v":1}'
    )
    play = json.loads(canonical_command_bytes(PLAY))
    assert list(play) == sorted(play)
    assert play["ttl_s"] == 3600  # 3599.2004 s, rounded to ms, then up
    assert play["issued"] == 1764160000
    assert "targets" not in play
    assert "暴雨橙色预警" in canonical_command_bytes(PLAY).decode("utf-8")


def test_canonical_bytes_ignore_targets_and_see_every_other_field() -> None:
    base = canonical_command_bytes(PLAY)
    assert canonical_command_bytes(dataclasses.replace(PLAY, targets=())) == base
    assert canonical_command_bytes(dataclasses.replace(PLAY, signature=b"x" * 74)) == base  # what is signed
    changes: dict[str, Any] = {
        "alert_id": "20261126-0002", "ebmid": "4" * 35, "revision": 2, "seq": 1, "level": 1,
        "event_type": "00000", "text": "x", "ttl_s": 10.0, "volume": 1, "test": True, "issued_at": 1.0,
        "resume": True,
    }  # fmt: skip
    assert set(changes) | {"targets", "signature"} == {f.name for f in dataclasses.fields(PlayCommand)}
    for name, value in changes.items():
        assert canonical_command_bytes(dataclasses.replace(PLAY, **{name: value})) != base, name


@pytest.fixture(scope="module", params=["ed25519", "sm2"])
def signer(request: pytest.FixtureRequest) -> Signer:
    key = Sm2SigningKey.generate() if request.param == "sm2" else Ed25519SigningKey.generate()
    return Signer(key, KEY)


@pytest.mark.parametrize("cmd", [PLAY, STOP], ids=["play", "stop"])
def test_signed_once_verified_on_mqtt_and_serial(signer: Signer, cmd: Command) -> None:
    sent = quantize_command(cmd)
    block = sign_command(signer, sent)
    assert block[:4] == int(cmd.issued_at).to_bytes(4)
    over_mqtt = decode_command(encode_command(dataclasses.replace(sent, targets=("x",))))
    over_serial = body_command(command_body(sent))
    assert over_serial.issued_at == 0.0  # the frame does not carry it: the block's time stands in
    for received in (sent, over_mqtt, over_serial):
        info = verify_command(signer.verifier(), received, block)
        assert (info.time, info.serial) == (int(cmd.issued_at), KEY)
        ReplayGuard().check(info.serial, received.seq, info.time, NOW + 30)


def test_tampered_command_fails(signer: Signer) -> None:
    block = sign_command(signer, PLAY)
    changes: list[dict[str, Any]] = [
        {"level": 1},
        {"text": PLAY.text + " "},
        {"ttl_s": 86400.0},
        {"seq": 1},
    ]
    for change in changes:
        tampered = dataclasses.replace(PLAY, **change)
        with pytest.raises(SignatureError) as info:
            verify_command(signer.verifier(), tampered, block)
        assert info.value.reason is SignatureFailure.BAD_SIGNATURE
    with pytest.raises(SignatureError):  # a moved time field changes the rebuilt bytes
        verify_command(signer.verifier(), PLAY, (int(NOW) - 3600).to_bytes(4) + block[4:])


def test_lone_surrogate_is_malformed() -> None:
    signer = Signer(Ed25519SigningKey.generate(), KEY)
    bad = dataclasses.replace(PLAY, text="\ud800")
    with pytest.raises(ValueError, match="surrogate"):
        canonical_command_bytes(bad)
    for bad_cmd in (
        bad,
        dataclasses.replace(PLAY, ttl_s=math.inf),
        dataclasses.replace(PLAY, ttl_s=math.nan),
    ):
        with pytest.raises(SignatureError) as info:
            verify_command(signer.verifier(), bad_cmd, sign_command(signer, PLAY))
        assert info.value.reason is SignatureFailure.MALFORMED


def test_resume_is_signed(signer: Signer) -> None:
    sent = quantize_command(dataclasses.replace(PLAY, resume=True))
    block = sign_command(signer, sent)
    verify_command(signer.verifier(), decode_command(encode_command(sent)), block)
    with pytest.raises(SignatureError):
        verify_command(signer.verifier(), dataclasses.replace(sent, resume=False), block)
