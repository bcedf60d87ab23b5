"""`ebcd simulate`'s serial buses: in a folder of their run, held against a second simulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ebcd.config import shipped_config_path
from ebcd.protocols.serial.ports import default_run_dir
from simulators.runner import LOCK_FILE_NAME, BusDirBusyError, BusDirError, BusDirLock, holding

ROOT = Path(__file__).resolve().parents[2]
VILLAGE = "63415231060010314010101"  # a serial village of the shipped district (晓天镇)
BROKER = "mqtt://127.0.0.1:1"  # its terminals are all on the bus: no MQTT connection is made
WAIT_S = 30.0


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def simulate_args(*extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ebcd", "simulate", "-c", str(shipped_config_path()), "--broker", BROKER,
        "--only", f"village:{VILLAGE}", *extra,
    ]  # fmt: skip


@asynccontextmanager
async def simulator(
    *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`ebcd simulate` for one serial village, until the block ends (then SIGTERM, exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        *simulate_args(*extra), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT_S):
            while b"simulator.serial_buses" not in (line := await proc.stdout.readline()):
                assert line, "the simulator exited before its buses were up"
        yield proc
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            await proc.stdout.read()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_second_simulator_refuses_the_buses_of_a_live_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    link = run_dir / VILLAGE
    async with simulator("--run-dir", str(run_dir)) as first:
        assert link.is_symlink()
        target = os.readlink(link)
        second = await asyncio.create_subprocess_exec(
            *simulate_args("--run-dir", str(run_dir)), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(WAIT_S):
            _, err = await second.communicate()
        assert second.returncode == 2
        message = err.decode()
        assert f"pid {first.pid}" in message
        assert str(run_dir) in message
        assert os.readlink(link) == target  # the first one's bus is untouched
        (run_dir / "notes.txt").write_text("not the simulator's")
    assert names(run_dir) == ["notes.txt"]  # its link and lock went, what was not its stayed


async def test_a_simulator_removes_the_folder_it_made_and_only_that(tmp_path: Path) -> None:
    run_dir = tmp_path / "made" / "run"
    async with simulator("--run-dir", str(run_dir)):
        assert (run_dir / VILLAGE).is_symlink()
        assert (run_dir / LOCK_FILE_NAME).read_text().strip().isdigit()
    assert not (tmp_path / "made").exists()
    assert names(tmp_path) == []


async def test_without_run_dir_the_buses_go_to_the_folder_of_config_and_broker(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    expected = default_run_dir(shipped_config_path(), BROKER, tmp_path)
    async with simulator(env=env):
        assert (expected / VILLAGE).is_symlink()  # where `ebcd run -c C --broker B` looks for it
    assert not expected.exists()


def test_the_lock_names_its_holder_and_a_dead_holder_does_not_block(tmp_path: Path) -> None:
    first = BusDirLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(BusDirBusyError, match=rf"pid {os.getpid()}\b.*{tmp_path / 'run'}"):
        BusDirLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run").exists()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / LOCK_FILE_NAME).write_text("999999\n")  # left by a simulator killed with -9: no flock held
    with holding([stale]):
        assert (stale / LOCK_FILE_NAME).read_text() == f"{os.getpid()}\n"
    assert names(stale) == []  # the lock file went; the folder was not the lock's to remove
    assert stale.is_dir()


def test_a_folder_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(BusDirError, match="is not a plain folder"):
        BusDirLock(tmp_path / "run").acquire()
    assert names(elsewhere) == []
