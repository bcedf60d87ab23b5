"""Which config a command without `-c` reads: $EBCD_CONFIG, else /etc/ebcd/ebcd.toml, else the shipped one.

The real `ebcd topology show` as a subprocess, as an engineer on an installed server types it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebcd import config as config_module
from ebcd.config import CONFIG_ENV, default_config_path, shipped_config_path

ROOT = Path(__file__).resolve().parents[2]


def _topology(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ebcd", "topology", "show"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_ebcd_config_names_the_config_a_command_reads(tmp_path: Path) -> None:
    shipped = shipped_config_path().parent
    for name in ("ebcd.toml", "rooms.csv", "terminals.csv"):
        shutil.copyfile(shipped / name, tmp_path / name)
    # the copy names another district: the command must read it, not the shipped one
    text = (tmp_path / "ebcd.toml").read_text(encoding="utf-8")
    (tmp_path / "ebcd.toml").write_text(text.replace("示范区应急广播平台", "另一个区"), encoding="utf-8")
    done = _topology({**os.environ, CONFIG_ENV: str(tmp_path / "ebcd.toml")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("另一个区 ")
    missing = _topology({**os.environ, CONFIG_ENV: str(tmp_path / "nowhere.toml")})
    assert missing.returncode == 2
    assert "nowhere.toml" in missing.stdout + missing.stderr


def test_without_ebcd_config_the_system_config_comes_before_the_shipped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    system = tmp_path / "etc" / "ebcd.toml"
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    assert default_config_path() == shipped_config_path()  # a checkout or a test bench
    system.parent.mkdir()
    system.write_text("", encoding="utf-8")
    assert default_config_path() == system  # an installed server
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "mine.toml"))
    assert default_config_path() == tmp_path / "mine.toml"


def test_without_either_a_checkout_reads_the_shipped_district() -> None:
    done = _topology({k: v for k, v in os.environ.items() if k != CONFIG_ENV})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("示范区应急广播平台 ")
