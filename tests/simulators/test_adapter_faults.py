"""The simulated adapters' fault profile: what it reads, and what it refuses to read."""

from __future__ import annotations

import pytest

from simulators.adapter import AdapterFaults, AdapterFaultSpecError

ROOM = "63415231050010314010101"


def test_a_profile_names_rooms_shares_and_seconds() -> None:
    f = AdapterFaults.parse(f"refuse={ROOM},silence=all,corrupt=10%,slow=1.5")
    assert f.has("refuse", ROOM)
    assert not f.has("refuse", "63415231050020314010101")
    assert f.has("silence", "63415231050020314010101")
    assert (f.corrupt, f.slow_s) == (0.1, 1.5)
    assert AdapterFaults.parse("") == AdapterFaults()


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("refuse", "expected KIND=VALUE"),
        ("refuse=12", "23-digit room code or all"),
        ("corrupt=ten", "share like 10%"),
        ("corrupt=150%", "outside 0..100%"),
        ("slow=-1", "must not be negative"),
        ("explode=all", "unknown adapter fault 'explode'"),
    ],
)
def test_a_bad_profile_says_what_is_wrong(spec: str, why: str) -> None:
    with pytest.raises(AdapterFaultSpecError, match=why):
        AdapterFaults.parse(spec)
