"""systemd/: the units pass `systemd-analyze verify`, keep their hardening, and the daemon behaves
as Type=notify promises under the unit's conditions (umask, notify socket, watchdog, W^X memory).

systemd is not PID 1 here, so the units are not started by systemd: the daemon is started with the
unit's own ExecStart line (paths swapped for the test's), the environment systemd gives it
($NOTIFY_SOCKET, $WATCHDOG_USEC), the unit's UMask, and, where the kernel has it, PR_SET_MDWE,
the kernel's form of MemoryDenyWriteExecute=.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebcd.config import load_config, shipped_config_path
from tests.conftest import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNITS = ("ebcd.service", "ebcd-simulator.service")
# Where the units expect ebcd (docs/install.md); the tests substitute the venv under test.
UNIT_BINARY = "/opt/ebcd/venv/bin/ebcd"
UNIT_CONFIG = "/etc/ebcd/ebcd.toml"
# `systemd-analyze security` exposure, shown as 0.0 (locked down) .. 10.0; the units are at
# 1.2-1.5. --threshold takes it times ten.
MAX_EXPOSURE = 25

# Runs the command in argv[1:] with PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN) set (Linux >= 6.3):
# no mapping may ever become writable and executable, across execve too. Exit 77: unsupported.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""
# Exit 0 if a writable+executable mapping is refused, 1 if it is allowed.
WX_PROBE = """
import mmap, sys
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    sys.exit(0)
sys.exit(1)
"""


def need(binary: str, package: str) -> str:
    """The binary's path; skip if missing, but fail in CI (CI=...), where it must be installed."""
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{binary} is not installed: apt-get install {package}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def ebcd_script() -> str:
    """The `ebcd` console script of the environment under test."""
    beside = Path(sys.executable).parent / "ebcd"
    found = str(beside) if beside.exists() else shutil.which("ebcd")
    if found is None:
        pytest.fail("the ebcd console script is not installed: pip install -e .")
    return found


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections → key → values (a key may repeat), as systemd reads them (no line continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def local_copy(unit: str, directory: Path) -> Path:
    """The unit with its ExecStart pointing at the ebcd script under test (verify needs it to exist)."""
    text = (SYSTEMD / unit).read_text()
    assert UNIT_BINARY in text, f"{unit} no longer starts {UNIT_BINARY}: update docs/install.md and this test"
    copy = directory / unit
    copy.write_text(text.replace(UNIT_BINARY, ebcd_script()))
    return copy


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    copy = local_copy(unit, tmp_path)
    done = subprocess.run(
        [analyze, "verify", copy.name], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    # verify exits 0 on unknown keys and bad values too, and only says so: any output is a finding.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    assert done.stdout.strip() == "", done.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_hardening_does_not_regress(unit: str, tmp_path: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    copy = local_copy(unit, tmp_path)
    done = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={MAX_EXPOSURE}", "--no-pager", copy.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    overall = [line for line in done.stdout.splitlines() if "Overall exposure" in line]
    assert done.returncode == 0, f"exposure above {MAX_EXPOSURE / 10}: {overall}\n{done.stderr}"


def test_daemon_unit_settings() -> None:
    unit = read_unit(SYSTEMD / "ebcd.service")
    service = unit["Service"]

    def one(key: str) -> str:
        values = service.get(key, [])
        assert len(values) == 1, f"{key}: {values}"
        return values[0]

    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "500ms",
        "TimeoutStopSec": "20",
        "User": "ebcd",
        "Group": "ebcd",
        "StateDirectory": "ebcd",
        "SupplementaryGroups": "dialout",
        "DevicePolicy": "closed",
        "CapabilityBoundingSet": "",
        "NoNewPrivileges": "yes",
        "MemoryDenyWriteExecute": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    assert {key: one(key) for key in expected} == expected
    assert "DynamicUser" not in service  # the control socket's group must exist outside the unit
    assert "PrivateDevices" not in service  # serial ports: DeviceAllow= instead
    assert {"char-ttyS rw", "char-ttyUSB rw"} <= set(service["DeviceAllow"])
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # The group must be able to use the socket (the daemon chmods it to socket_mode) and nobody
    # else may see anything: the umask keeps "other" out.
    assert int(one("UMask"), 8) & 0o007 == 0o007

    argv = shlex.split(one("ExecStart"))
    assert argv[:2] == [UNIT_BINARY, "run"]
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert options["-c"] == UNIT_CONFIG
    # The CLI finds the control socket in the config's state_dir by default, and the shipped
    # config says /var/lib/ebcd: the unit's state directory must be that one.
    state_dir = options["--state-dir"]
    assert state_dir == "/var/lib/" + one("StateDirectory")
    assert load_config(shipped_config_path()).daemon.state_dir == state_dir


def test_simulator_unit_settings() -> None:
    service = read_unit(SYSTEMD / "ebcd-simulator.service")["Service"]
    assert service["Type"] == ["simple"]
    assert shlex.split(service["ExecStart"][0]) == [UNIT_BINARY, "simulate", "-c", UNIT_CONFIG]
    assert service["MemoryDenyWriteExecute"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    # One connection per terminal of the shipped district, with room to spare.
    assert int(service["LimitNOFILE"][0]) > 2 * 769


def test_sysusers_and_tmpfiles_make_user_and_config_dir(tmp_path: Path) -> None:
    sysusers = need("systemd-sysusers", "systemd")
    tmpfiles = need("systemd-tmpfiles", "systemd")
    if os.geteuid() != 0:
        pytest.skip("systemd-sysusers --root needs root to own the files it writes")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # An existing password file, made with the wrong mode: tmpfiles corrects it (and the dir's).
    (root / "etc/ebcd").mkdir(mode=0o755)
    (root / "etc/ebcd/mqtt-password").write_text("secret\n")
    (root / "etc/ebcd/mqtt-password").chmod(0o644)
    # With --root, file arguments would be looked up under the root too: feed them on stdin.
    for tool, source in ((sysusers, "ebcd.sysusers"), (tmpfiles, "ebcd.tmpfiles")):
        args = [tool, f"--root={root}"] + (["--create"] if tool == tmpfiles else []) + ["-"]
        with (SYSTEMD / source).open("rb") as stdin:
            done = subprocess.run(args, stdin=stdin, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{source}: {done.stderr}"
        assert "ignoring" not in done.stderr.lower(), done.stderr

    users = {f[0]: f for f in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())}
    groups = {f[0]: f for f in (line.split(":") for line in (root / "etc/group").read_text().splitlines())}
    _, _, uid, gid, _, home, shell = users["ebcd"]
    assert int(uid) < 1000, "a system user"
    assert groups["ebcd"][2] == gid
    assert (home, shell) == ("/var/lib/ebcd", "/usr/sbin/nologin")

    def owner_and_mode(path: str) -> tuple[int, int, int]:
        st = (root / path).stat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner_and_mode("etc/ebcd") == (0, int(gid), 0o750)
    # The daemon's user alone reads the broker password; the duty officers' group does not.
    assert owner_and_mode("etc/ebcd/mqtt-password") == (int(uid), 0, 0o400)
    assert owner_and_mode("etc/ebcd/mqtt-secrets") == (0, 0, 0o700)


def _wait_for_notify(sock: socket.socket, field: str, deadline: float) -> str:
    """The next datagram on the notify socket that carries `field` (e.g. READY=1)."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        if field in message.split("\n"):
            return message
    pytest.fail(f"no {field} on the notify socket in time")


@pytest.mark.parametrize("mdwe", [False, True], ids=["plain", "mdwe"])
def test_daemon_as_systemd_runs_it(mdwe: bool, own_mosquitto: Mosquitto, tmp_path: Path) -> None:
    service = read_unit(SYSTEMD / "ebcd.service")["Service"]
    wrapper: list[str] = []
    if mdwe:
        wrapper = [sys.executable, "-c", MDWE_EXEC]
        probe = subprocess.run([*wrapper, sys.executable, "-c", WX_PROBE], timeout=30, check=False)
        if probe.returncode == 77:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
        assert probe.returncode == 0, "PR_SET_MDWE did not refuse a writable+executable mapping"

    state = tmp_path / "state"
    argv = [
        arg.replace(UNIT_BINARY, ebcd_script())
        .replace(UNIT_CONFIG, str(shipped_config_path()))
        .replace("/var/lib/ebcd", str(state))
        for arg in shlex.split(service["ExecStart"][0])
    ]
    # A broker of its own: the daemon leaves a retained status that other tests must not see.
    argv += ["--broker", own_mosquitto.url, "--metrics-port", "0"]
    notify_path = tmp_path / "notify"
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    stop_timeout_s = float(service["TimeoutStopSec"][0])
    log = tmp_path / "daemon.log"

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log.open("wb") as stderr:
        notify.bind(str(notify_path))
        proc = subprocess.Popen([*wrapper, *argv], env=env, umask=int(service["UMask"][0], 8), stderr=stderr)
        try:
            ready = _wait_for_notify(notify, "READY=1", time.monotonic() + 30)
            # NotifyAccess=main: the message must name the main process (the wrapper exec'd).
            assert f"MAINPID={proc.pid}" in ready.split("\n")
            # $WATCHDOG_USEC = 1 s: the daemon pings every half second (generous bound for slow CI).
            _wait_for_notify(notify, "WATCHDOG=1", time.monotonic() + 5)

            sock = (state / "ebcd.sock").stat()
            assert stat.S_ISSOCK(sock.st_mode)
            assert stat.S_IMODE(sock.st_mode) == 0o660, "the group ebcd must be able to connect"
            journal = stat.S_IMODE((state / "journal.sqlite3").stat().st_mode)
            assert journal & 0o027 == 0, f"journal mode {journal:o}: group-writable or world-readable"

            proc.send_signal(signal.SIGTERM)
            _wait_for_notify(notify, "STOPPING=1", time.monotonic() + stop_timeout_s)
            assert proc.wait(stop_timeout_s) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # stderr is not a terminal, as under systemd: every log line is JSON for journald.
    lines = log.read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert "daemon.started" in events
    assert "daemon.stopped" in events
