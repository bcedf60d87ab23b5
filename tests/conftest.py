"""Shared fixtures: a private Mosquitto per test session, the shipped district, a running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebcd.config import Config, load_config, shipped_config_path
from ebcd.tiers.district import District
from ebcd.tiers.loader import load_district

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mosquitto:
    """A Mosquitto broker the tests started themselves."""

    host: str
    port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            pytest.fail("mosquitto is not installed: `apt-get install mosquitto` (bash .ci/run does it)")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-500:]}")
            time.sleep(0.05)
        pytest.fail("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def make_mosquitto(directory: Path, extra: str = "") -> Mosquitto:
    """Write a private broker config on a free port (not started)."""
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 0\n" + extra
    )
    return Mosquitto("127.0.0.1", port, conf, directory / "mosquitto.log")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the whole session, isolated from any broker already running."""
    broker = make_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of this test alone, which it may stop and start."""
    broker = make_mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def shipped_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The shipped district, its serial rooms' ports (`{run_dir}/<room>`) in a folder of this session.

    The simulated serial buses of the tests open their ptys there, so tests never touch the buses
    of a demo or a simulator running on the same machine; 115200 baud keeps them quick.
    """
    here = tmp_path_factory.mktemp("district")
    shipped = shipped_config_path().parent
    shutil.copy(shipped / "terminals.csv", here / "terminals.csv")
    toml = (shipped / "ebcd.toml").read_text(encoding="utf-8")
    assert "[serial]" not in toml, "the shipped config gained a [serial] section: merge the override below"
    # the adapters' and the listener's ports are published in this folder too (adapter.address)
    assert '"127.0.0.1:{run_dir}"' in toml, "the shipped [adapter] listen moved: update this fixture"
    toml = toml.replace('"127.0.0.1:{run_dir}"', f'"127.0.0.1:{here}"')
    (here / "ebcd.toml").write_text(toml + "\n[serial]\nbaudrate = 115200\n", encoding="utf-8")
    rooms = (shipped / "rooms.csv").read_text(encoding="utf-8")
    assert rooms.count(",{run_dir}/") == 19, "the shipped serial rooms' ports moved: update this fixture"
    assert rooms.count(",tcp://127.0.0.1:{run_dir}") == 20, "the shipped adapter rooms moved: update this"
    rooms = rooms.replace(",tcp://127.0.0.1:{run_dir}", f",tcp://127.0.0.1:{here}")
    (here / "rooms.csv").write_text(rooms.replace(",{run_dir}/", f",{here}/bus-"), encoding="utf-8")
    return load_config(here / "ebcd.toml")


@pytest.fixture(scope="session")
def district(shipped_config: Config) -> District:
    """The shipped district: 7 towns, 149 villages, 769 terminals."""
    return load_district(shipped_config)


def fast_config(config: Config, **delivery: float) -> Config:
    """The config with test-friendly timers (short ack timeout and retries)."""
    values = {
        "ack_timeout_s": 1.5,
        "max_attempts": 3,
        "retry_initial_s": 0.3,
        "retry_max_s": 1.0,
        "state_publish_interval_s": 0.1,
        "terminal_heartbeat_s": 5.0,  # what the simulated terminals below do
        **delivery,
    }
    return config.model_copy(
        update={
            "delivery": config.delivery.model_copy(update=values),
            "simulator": config.simulator.model_copy(
                update={"play_time_s": 0.2, "heartbeat_interval_s": 5.0}
            ),
        }
    )


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running behind it."""
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in left:
        t.cancel()
    assert not left, f"test left tasks running: {[t.get_name() for t in left]}"
