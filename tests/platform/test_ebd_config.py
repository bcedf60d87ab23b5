"""[ebd] in the config: off by default, complete when on, every mistake named with its place."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebcd.config import ConfigError, load_config, shipped_config_path


def _config(tmp_path: Path, ebd: str) -> Path:
    shipped = shipped_config_path().parent
    for name in ("rooms.csv", "terminals.csv"):
        (tmp_path / name).write_bytes((shipped / name).read_bytes())
    path = tmp_path / "ebcd.toml"
    path.write_text((shipped / "ebcd.toml").read_text(encoding="utf-8") + "\n[ebd]\n" + ebd, encoding="utf-8")
    return path


def test_off_unless_listen_is_set() -> None:
    assert load_config(shipped_config_path()).ebd.listen is None


def test_a_complete_section_loads_with_its_defaults(tmp_path: Path) -> None:
    cfg = load_config(
        _config(
            tmp_path,
            'listen = "127.0.0.1:8181"\nupstream_code = "34152000000000001010101"\n'
            'verify_with = ["ebd/city-bench.pem"]\n',
        )
    ).ebd
    assert (cfg.timezone, cfg.heartbeat_s, cfg.state_codes) == ("Asia/Shanghai", 30.0, "gs")


@pytest.mark.parametrize(
    ("ebd", "says"),
    [
        ('listen = "127.0.0.1:8181"\nverify_with = ["a.pem"]\n', "upstream_code"),
        ('listen = "127.0.0.1:8181"\nupstream_code = "34152000000000001010101"\n', "verify_with"),
        ('listen = "8181"\n', "HOST:PORT"),
        ('timezone = "Mars/Olympus"\n', "IANA"),
        ('upstream_code = "3415"\n', "ebd.upstream_code"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, ebd: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, ebd))
    assert says in str(info.value)
