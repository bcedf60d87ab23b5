"""The simulated adapters' fault profile: what it reads, and what it refuses to read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from simulators.adapter import AdapterFaults, AdapterFaultSpecError

ROOM = "63415231050010314010101"
ROOT = Path(__file__).resolve().parents[2]


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


def test_a_district_without_adapter_rooms_needs_no_listener_address(tmp_path: Path) -> None:
    from ebcd.config import load_config
    from ebcd.tiers.loader import load_district
    from simulators.runner import _adapters

    for name in ("ebcd.toml", "terminals.csv"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    rooms = (ROOT / "config" / "rooms.csv").read_text(encoding="utf-8").splitlines()
    rows = [",".join([*r.split(",")[:4], "mqtt", ""]) if ",adapter," in r else r for r in rooms]
    (tmp_path / "rooms.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = load_config(tmp_path / "ebcd.toml")
    assert config.adapter.listen == "127.0.0.1:{run_dir}"  # never expanded: no room names {run_dir}
    assert _adapters(config, load_district(config), set(), 1.0, AdapterFaults(), 0) == []
