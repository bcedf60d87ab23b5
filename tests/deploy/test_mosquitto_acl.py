"""config/mosquitto: the shipped broker config, ACL and password script, on a real Mosquitto.

The broker runs Debian's stock mosquitto.conf including config/mosquitto/ebcd.conf, with only the
listener (a free port on 127.0.0.1) and file paths rewritten, the shipped ACL, and a password
file that make_passwd.sh built for the shipped ledger (769 terminals).

A refused publish is checked twice: MQTT 5 clients get a PUBACK with reason 0x87 (not
authorized), and a subscriber allowed to read the topic never sees the message. "Never" is
bounded without sleeping: the refused publish is followed by a permitted one from the same
client (a fence); the broker handles one client's publishes in order, so once the fence has
arrived, the refused message would have arrived before it.
"""

from __future__ import annotations

import csv
import os
import queue
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ebcd.config import load_config, shipped_config_path
from ebcd.ingest import MAX_PAYLOAD_BYTES
from tests.conftest import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = ROOT / "config/mosquitto"
TERMINALS_CSV = ROOT / "config/terminals.csv"
NOT_AUTHORIZED = 0x87
TIMEOUT_S = 5.0

DISTRICT = load_config(shipped_config_path()).district.code
with TERMINALS_CSV.open(encoding="utf-8") as _f:
    _ROWS = list(csv.DictReader(_f))
T1, T2 = _ROWS[0]["code"], _ROWS[1]["code"]
T1_ROOM = _ROWS[0]["room"]
assert _ROWS[1]["room"] == T1_ROOM, "the tests expect the first two terminals in the same room"


def topic(rest: str) -> str:
    return f"ebc/v1/{DISTRICT}/{rest}"


def password(user: str) -> str:
    # Characters a shell script could mangle; ':' cannot be in a password file (its own test).
    return f"s3 cr$et\\'\"*-{user[::-1]}"


def need(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.fail(f"{binary} is not installed: apt-get install mosquitto (bash .ci/run does it)")
    return path


def make_passwd(secrets: Path, out: Path) -> subprocess.CompletedProcess[str]:
    need("mosquitto_passwd")
    return subprocess.run(
        [
            shutil.which("bash") or "/bin/bash",
            str(MOSQUITTO / "make_passwd.sh"),
            "-t",
            str(TERMINALS_CSV),
            "-s",
            str(secrets),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"),
    )


def write_secrets(directory: Path, users: list[str]) -> None:
    directory.mkdir()
    for user in users:
        (directory / user).write_text(password(user) + "\n")


# Debian 12's stock /etc/mosquitto/mosquitto.conf, which ebcd.conf goes beside in conf.d/.
DEBIAN_MAIN_CONF = """\
pid_file /run/mosquitto/mosquitto.pid
persistence true
persistence_location /var/lib/mosquitto/
log_dest file /var/log/mosquitto/mosquitto.log
include_dir /etc/mosquitto/conf.d
"""


def broker_config(directory: Path, port: int, passwd: Path) -> Path:
    """Debian's main config including the shipped ebcd.conf, with listener and paths in `directory`."""
    acl = directory / "ebcd.acl"
    shutil.copy(MOSQUITTO / "ebcd.acl", acl)
    data = directory / "data"
    data.mkdir()
    data.chmod(0o777)  # Mosquitto started as root saves its database as the user mosquitto
    conf_d = directory / "conf.d"
    conf_d.mkdir()

    def rewrite(text: str, replacements: dict[str, str]) -> str:
        for pattern, new in replacements.items():
            text, n = re.subn(pattern, new, text, flags=re.MULTILINE)
            assert n == 1, f"no line matching {pattern}: update this test"
        return text

    (conf_d / "ebcd.conf").write_text(
        rewrite(
            (MOSQUITTO / "ebcd.conf").read_text(),
            {
                r"^listener 1883$": f"listener {port} 127.0.0.1",
                r"^password_file /etc/mosquitto/ebcd\.passwd$": f"password_file {passwd}",
                r"^acl_file /etc/mosquitto/ebcd\.acl$": f"acl_file {acl}",
            },
        )
    )
    main = rewrite(
        DEBIAN_MAIN_CONF,
        {
            r"^pid_file .*\n": "",
            r"^persistence_location .*$": f"persistence_location {data}/",
            r"^log_dest file .*$": "log_dest stdout",
            r"^include_dir .*$": f"include_dir {conf_d}",
        },
    )
    conf = directory / "mosquitto.conf"
    conf.write_text(main)
    # Mosquitto started as root drops to the user mosquitto: it must reach these files.
    for path in (directory, *directory.parents) if os.geteuid() == 0 else ():
        if path == Path("/tmp") or path == path.parent:
            break
        path.chmod(path.stat().st_mode | 0o011)
    return conf


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A Mosquitto with the shipped config, ACL and a make_passwd.sh password file."""
    directory = tmp_path_factory.mktemp("acl")
    secrets = directory / "secrets"
    write_secrets(secrets, ["ebcd", "upstream", *(row["code"] for row in _ROWS)])
    passwd = directory / "ebcd.passwd"
    done = make_passwd(secrets, passwd)
    assert done.returncode == 0, done.stderr
    port = free_port()
    server = Mosquitto("127.0.0.1", port, broker_config(directory, port, passwd), directory / "mosquitto.log")
    server.start()
    yield server
    server.stop()


@dataclass
class Client:
    """A paho-mqtt client whose acknowledgements and messages can be waited for."""

    broker: Mosquitto
    username: str | None
    secret: str | None = None
    v5: bool = True
    client_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:12]}")
    clean: bool = True
    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self._acks: dict[int, list[ReasonCode]] = {}
        self._cond = threading.Condition()
        self._connack: list[ReasonCode] = []
        self.session_present = False
        protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=None if self.v5 else self.clean,
        )
        if self.username is not None:
            self.paho.username_pw_set(self.username, self.secret or password(self.username))
        self.paho.on_connect = self._on_connect
        self.paho.on_publish = self._on_publish
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)

    # paho's network thread calls these.
    def _on_connect(
        self, _c: object, _u: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        with self._cond:
            self.session_present = flags.session_present
            self._connack.append(rc)
            self._cond.notify_all()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self._cond:
            self._acks[mid] = [rc]
            self._cond.notify_all()

    def _on_subscribe(self, _c: object, _u: object, mid: int, rcs: list[ReasonCode], _p: object) -> None:
        with self._cond:
            self._acks[mid] = list(rcs)
            self._cond.notify_all()

    def _wait(self, what: str, ready: Callable[[], object]) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, TIMEOUT_S):
                pytest.fail(f"{self.username}: no {what} within {TIMEOUT_S} s")

    def connect(self) -> ReasonCode:
        """Connect and return the CONNACK's reason code (the client stops after a refusal)."""
        self.paho.connect(self.broker.host, self.broker.port, keepalive=30)
        self.paho.loop_start()
        self._wait("CONNACK", lambda: self._connack)
        if self._connack[0].is_failure:
            self.close()
        return self._connack[0]

    def publish(self, to: str, payload: str, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        mid = self.paho.publish(to, payload, qos=1, retain=retain).mid
        self._wait(f"PUBACK for {to}", lambda: mid in self._acks)
        return self._acks.pop(mid)[0]

    def subscribe(self, to: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK's reason code."""
        _, mid = self.paho.subscribe(to, qos=1)
        assert mid is not None
        self._wait(f"SUBACK for {to}", lambda: mid in self._acks)
        return self._acks.pop(mid)[0]

    def until(self, payload: str) -> list[tuple[str, str]]:
        """Every (topic, payload) received up to and including the one with `payload`."""
        seen = []
        deadline = time.monotonic() + TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            seen.append((msg.topic, msg.payload.decode()))
            if seen[-1][1] == payload:
                return seen
        pytest.fail(f"{self.username}: {payload!r} did not arrive within {TIMEOUT_S} s; got {seen}")

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def clients(broker: Mosquitto) -> Iterator[list[Client]]:
    """Clients made by a test, closed after it."""
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


Connect = Callable[..., Client]


@pytest.fixture
def connect(broker: Mosquitto, clients: list[Client]) -> Connect:
    """connect(username, *subscriptions, v5=True): a logged-in client, subscribed."""

    def make(username: str, *subscriptions: str, v5: bool = True) -> Client:
        client = Client(broker, username, v5=v5)
        clients.append(client)
        assert not client.connect().is_failure, f"{username} could not log in"
        for sub in subscriptions:
            assert not client.subscribe(sub).is_failure, f"{username} may not subscribe to {sub}"
        return client

    return make


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def test_make_passwd_hashes_every_account(broker: Mosquitto) -> None:
    passwd = broker.conf.parent / "ebcd.passwd"
    lines = passwd.read_text().splitlines()
    users = [line.split(":", 1)[0] for line in lines]
    assert users[:2] == ["ebcd", "upstream"]
    assert users[2:] == [row["code"] for row in _ROWS]
    assert len(users) == 2 + 769
    assert all(re.fullmatch(r"[^:]+:\$7\$\d+\$\S+", line) for line in lines), "not hashed"
    assert password(T1) not in passwd.read_text()
    assert stat.S_IMODE(passwd.stat().st_mode) & 0o007 == 0, "readable by others"


def test_make_passwd_names_missing_secrets_and_writes_nothing(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    write_secrets(secrets, ["ebcd", *(row["code"] for row in _ROWS[1:])])
    out = tmp_path / "ebcd.passwd"
    done = make_passwd(secrets, out)
    assert done.returncode != 0
    assert "1 account(s) without a secret" in done.stderr
    assert T1 in done.stderr
    assert not out.exists()
    assert list(tmp_path.glob(".ebcd.passwd.*")) == [], "temporary file left behind"


def test_make_passwd_refuses_a_password_with_a_colon(tmp_path: Path) -> None:
    # mosquitto_passwd -U would silently cut "s3cret:more" to "s3cret".
    secrets = tmp_path / "secrets"
    write_secrets(secrets, ["ebcd", *(row["code"] for row in _ROWS)])
    (secrets / T2).write_text("s3cret:more\n")
    out = tmp_path / "ebcd.passwd"
    done = make_passwd(secrets, out)
    assert done.returncode != 0
    assert f"{secrets / T2}: the password contains ':'" in done.stderr
    assert not out.exists()


def test_unknown_wrong_and_anonymous_logins_are_refused(broker: Mosquitto) -> None:
    assert Client(broker, T1, "wrong").connect().is_failure
    assert Client(broker, "intruder", "whatever").connect().is_failure
    assert Client(broker, None).connect().is_failure
    assert Client(broker, T1, "wrong", v5=False).connect().is_failure


def test_terminal_reports_for_itself_only(connect: Connect) -> None:
    ebcd = connect("ebcd", "ebc/v1/#")
    terminal = connect(T1)

    own = unique("own-report")
    assert not terminal.publish(topic(f"t/{T1}/report"), own).is_failure
    assert not terminal.publish(topic(f"t/{T1}/presence"), unique("presence")).is_failure
    forged = unique("forged")
    assert terminal.publish(topic(f"t/{T2}/report"), forged).value == NOT_AUTHORIZED
    assert terminal.publish(topic(f"t/{T2}/presence"), forged).value == NOT_AUTHORIZED
    fence = unique("fence")
    terminal.publish(topic(f"t/{T1}/report"), fence)

    seen = ebcd.until(fence)
    assert (topic(f"t/{T1}/report"), own) in seen
    assert forged not in {payload for _, payload in seen}


def test_terminal_cannot_send_commands_alerts_or_status(connect: Connect) -> None:
    ebcd = connect("ebcd", "ebc/v1/#")
    other = connect(T2, topic(f"t/{T2}/cmd"), topic("g/#"))
    terminal = connect(T1)

    forged = unique("forged")
    for target in (
        f"t/{T2}/cmd",
        f"t/{T1}/cmd",
        f"g/{T1_ROOM}/cmd",
        f"g/{DISTRICT}/cmd",
        "alerts/in",
        "status",
    ):
        assert terminal.publish(topic(target), forged).value == NOT_AUTHORIZED, target
    fence = unique("fence")
    terminal.publish(topic(f"t/{T1}/report"), fence)
    assert forged not in {payload for _, payload in ebcd.until(fence)}
    # The other terminal reads its commands; the fence for it is a real command from ebcd.
    ebcd.publish(topic(f"g/{T1_ROOM}/cmd"), fence)
    assert forged not in {payload for _, payload in other.until(fence)}


def test_terminal_reads_its_own_and_group_commands_only(connect: Connect) -> None:
    # Mosquitto 2.0 grants every subscription and checks reading at delivery: the terminal may
    # subscribe to everything, and must get only its own and its groups' commands.
    terminal = connect(T1, "ebc/v1/#")
    ebcd = connect("ebcd")

    mine, group, district = unique("mine"), unique("group"), unique("district")
    theirs = unique("theirs")
    ebcd.publish(topic(f"t/{T2}/cmd"), theirs)
    ebcd.publish(topic(f"t/{T1}/cmd"), mine)
    ebcd.publish(topic(f"g/{T1_ROOM}/cmd"), group)
    ebcd.publish(topic(f"t/{T2}/report"), theirs)
    ebcd.publish(topic(f"t/{T2}/presence"), theirs)
    ebcd.publish(topic("alerts/in"), theirs)
    ebcd.publish(topic("alerts/20261126-0001"), theirs)
    ebcd.publish(topic("status"), theirs)
    ebcd.publish(topic(f"g/{DISTRICT}/cmd"), district)  # the fence
    seen = terminal.until(district)
    assert [payload for _, payload in seen] == [mine, group, district]


def test_mqtt311_terminal_forgery_is_dropped_silently(connect: Connect) -> None:
    ebcd = connect("ebcd", "ebc/v1/#")
    terminal = connect(T1, v5=False)
    forged, fence = unique("forged"), unique("fence")
    # MQTT 3.1.1 has no reason code in PUBACK: the broker acknowledges and drops the message.
    terminal.publish(topic(f"t/{T2}/report"), forged)
    terminal.publish(topic(f"g/{T1_ROOM}/cmd"), forged)
    terminal.publish(topic(f"t/{T1}/report"), fence)
    assert forged not in {payload for _, payload in ebcd.until(fence)}


def test_upstream_sends_alerts_and_reads_what_became_of_them(connect: Connect) -> None:
    ebcd = connect("ebcd", "ebc/v1/#")
    upstream = connect("upstream", "ebc/v1/#")

    alert = unique("alert")
    assert not upstream.publish(topic("alerts/in"), alert).is_failure
    forged = unique("forged")
    for target in (
        f"t/{T1}/cmd",
        f"g/{DISTRICT}/cmd",
        "t/upstream/report",  # the terminals' pattern lines would allow this but for the deny lines
        "alerts/20261126-0001",
        "alerts/rejected",
        "status",
    ):
        assert upstream.publish(topic(target), forged).value == NOT_AUTHORIZED, target
    fence = unique("fence")
    upstream.publish(topic("alerts/in"), fence)
    seen = ebcd.until(fence)
    assert (topic("alerts/in"), alert) in seen
    assert forged not in {payload for _, payload in seen}

    # It reads the alert states and ebcd's status, and nothing of the terminals'.
    state, rejected, status, hidden = (unique(n) for n in ("state", "rejected", "status", "hidden"))
    for target in (f"t/{T1}/cmd", f"g/{DISTRICT}/cmd", f"t/{T1}/report", "t/upstream/cmd"):
        ebcd.publish(topic(target), hidden)
    ebcd.publish(topic("alerts/20261126-0001"), state)
    ebcd.publish(topic("alerts/rejected"), rejected)
    # MQTT 5 answers: on its own replies/ topics only, never on another account's
    mine, theirs = unique("answer"), unique("not yours")
    ebcd.publish(topic("replies/upstream-other/req"), theirs)
    ebcd.publish(topic("replies/upstream/req-1"), mine)
    assert upstream.publish(topic("replies/upstream/req-1"), forged).value == NOT_AUTHORIZED
    ebcd.publish(topic("status"), status)
    received = [(t, p) for t, p in upstream.until(status) if p not in (alert, fence)]
    assert received == [
        (topic("alerts/20261126-0001"), state),
        (topic("alerts/rejected"), rejected),
        (topic("replies/upstream/req-1"), mine),
        (topic("status"), status),
    ]


def test_ebcd_session_survives_a_broker_restart(broker: Mosquitto, tmp_path: Path) -> None:
    # A broker of its own, on the same password file: this one is restarted.
    port = free_port()
    server = Mosquitto(
        "127.0.0.1", port, broker_config(tmp_path, port, broker.conf.parent / "ebcd.passwd"), tmp_path / "log"
    )
    server.start()
    made: list[Client] = []
    try:
        # Like the daemon on an MQTT 3.1.1 broker: a fixed client id, clean_session false (over
        # MQTT 5 the daemon's session never expires; tests/e2e/test_resilience.py runs it on this).
        ebcd_id = unique("ebcd")
        ebcd = Client(server, "ebcd", v5=False, client_id=ebcd_id, clean=False)
        made.append(ebcd)
        assert not ebcd.connect().is_failure
        assert not ebcd.subscribe(topic("t/+/report")).is_failure
        ebcd.close()

        terminal = Client(server, T1)
        made.append(terminal)
        assert not terminal.connect().is_failure
        report = unique("report while ebcd was away")
        assert not terminal.publish(topic(f"t/{T1}/report"), report).is_failure
        terminal.close()

        server.stop()  # SIGTERM: Mosquitto writes its persistence file
        server.start()

        again = Client(server, "ebcd", v5=False, client_id=ebcd_id, clean=False)
        made.append(again)
        assert not again.connect().is_failure
        assert again.session_present, "the session was lost in the restart"
        assert (topic(f"t/{T1}/report"), report) in again.until(report)
    finally:
        for client in made:
            client.close()
        server.stop()


def test_the_shipped_broker_carries_an_upstream_alert_over_ebcds_own_size_limit(connect: Connect) -> None:
    """ebcd, not the broker, refuses a large alert: the sender then gets ebcd's `too_large` answer."""
    ebcd = connect("ebcd", topic("alerts/in"))
    upstream = connect("upstream")
    large = unique("large") + "x" * (MAX_PAYLOAD_BYTES + 1024)
    assert not upstream.publish(topic("alerts/in"), large).is_failure
    seen = ebcd.until(large)
    assert len(seen[-1][1]) > MAX_PAYLOAD_BYTES
