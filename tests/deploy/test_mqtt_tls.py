"""mqtts:// with credentials, on a real Mosquitto: the daemon and the simulated terminals.

A throwaway CA, made here with `cryptography`, signs the broker's certificate (127.0.0.1 and
localhost) and two client certificates (ebcd's, and one for the simulator bench). The broker runs
the shipped ebcd.conf with its commented TLS block switched on (a free port on 127.0.0.1, TLS 1.2
or later, the CA, require_certificate), `allow_anonymous false`, the shipped ACL, and a password
file that make_passwd.sh built from a secrets directory: ebcd's password, own passwords for the
terminals of one village, and the shared `_all` for every other terminal. The simulated
terminals read that same directory as `[simulator] credentials_dir`, as a test bench would.

Every file is named in the config relative to the config's directory, as an installation names
them relative to /etc/ebcd. The tests that run the daemon and the fleet are marked slow like
the other end-to-end tests; they take a few seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ebcd.config import Config
from ebcd.daemon.daemon import Daemon
from ebcd.daemon.service import run_daemon
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.security.mqtt_auth import (
    SHARED_FILE,
    MqttAuthError,
    read_secret,
    terminal_passwords,
    tls_context,
)
from ebcd.tiers.district import District
from ebcd.tiers.village import Village
from simulators.faults import FaultPlan
from simulators.mqtt_fleet import MqttFleet, fleet_login
from tests.conftest import Mosquitto, fast_config, free_port
from tests.deploy.test_mosquitto_acl import broker_config, make_passwd, password
from tests.helpers import running_daemon, running_fleet, settle, wait_for, wait_online

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]


# -- a throwaway PKI -------------------------------------------------------------------------
def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> x509.Certificate:
    """A CA certificate (issuer None: self-signed), or a server or client certificate."""
    now = dt.datetime.now(dt.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        usage = dict.fromkeys(
            ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
        )
        return (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                    **usage,
                ),
                critical=True,
            )
            .sign(signing_key, hashes.SHA256())
        )
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write_pem(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path) -> None:
    """ca.crt, broker.crt/.key, ebcd.crt/.key, bench.crt/.key (simulators), other-ca.crt."""
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("ebcd test CA", ca_key, None)
    _write_pem(directory / "ca.crt", _cert_pem(ca), 0o644)
    for name, server in (("broker", True), ("ebcd", False), ("bench", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"{name}.test", key, (ca, ca_key), server=server)
        _write_pem(directory / f"{name}.crt", _cert_pem(cert), 0o644)
        # Mosquitto (dropping root for the user mosquitto) must read its key; the clients' are 0600
        _write_pem(directory / f"{name}.key", _key_pem(key), 0o644 if server else 0o600)
    other_key = ec.generate_private_key(ec.SECP256R1())
    _write_pem(directory / "other-ca.crt", _cert_pem(_certificate("another CA", other_key, None)), 0o644)


# -- the broker and the config ---------------------------------------------------------------
def _secret(path: Path, text: str) -> None:
    path.write_text(text + "\n")
    path.chmod(0o600)


def _enable_tls(conf: Path, port: int, pki: Path) -> None:
    """Switch on the commented TLS block of the shipped ebcd.conf, on `port` with the test PKI."""
    text = conf.read_text()
    for pattern, new in {
        r"^#listener 8883$": f"listener {port} {HOST}",
        r"^#protocol mqtt$": "protocol mqtt",
        r"^#certfile /etc/mosquitto/certs/broker\.crt$": f"certfile {pki / 'broker.crt'}",
        r"^#keyfile /etc/mosquitto/certs/broker\.key$": f"keyfile {pki / 'broker.key'}",
        r"^#tls_version tlsv1\.2$": "tls_version tlsv1.2",
        r"^#cafile /etc/mosquitto/certs/ca\.crt$": f"cafile {pki / 'ca.crt'}",
        r"^#require_certificate true$": "require_certificate true",
    }.items():
        text, n = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert n == 1, f"ebcd.conf has no line matching {pattern}: update this test"
    conf.write_text(text)


def _mqtt_villages(district: District) -> tuple[Village, Village]:
    """Two MQTT villages: the first's terminals have passwords of their own, the second's use _all."""
    villages = [v for v in district.villages() if v.link == "mqtt"]
    return villages[0], villages[1]


@dataclass(frozen=True)
class Env:
    broker: Mosquitto
    config: Config
    directory: Path  # the config's directory: pki/, secrets/

    @property
    def url(self) -> str:
        return f"mqtts://{HOST}:{self.broker.port}"

    @property
    def broker_log(self) -> Path:
        return self.directory / "broker.log"


def with_mqtt(config: Config, **update: object) -> Config:
    return config.model_copy(update={"mqtt": config.mqtt.model_copy(update=update)})


def with_simulator(config: Config, **update: object) -> Config:
    return config.model_copy(update={"simulator": config.simulator.model_copy(update=update)})


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, shipped_config: Config, district: District
) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("tls")
    make_pki(directory / "pki")
    secrets = directory / "secrets"
    secrets.mkdir(mode=0o700)
    _secret(secrets / "ebcd", password("ebcd"))
    _secret(secrets / SHARED_FILE, password(SHARED_FILE))
    own, _shared = _mqtt_villages(district)
    for terminal in own.terminals:
        _secret(secrets / terminal.code, password(terminal.code))
    passwd = directory / "ebcd.passwd"
    done = make_passwd(secrets, passwd)
    assert done.returncode == 0, done.stderr
    conf = broker_config(directory, free_port(), passwd)
    port = free_port()
    _enable_tls(conf.parent / "conf.d" / "ebcd.conf", port, directory / "pki")
    # Mosquitto buffers its stdout: a log file is written as it goes (by the user mosquitto).
    log = directory / "broker.log"
    log.touch(mode=0o666)
    log.chmod(0o666)
    conf.write_text(conf.read_text().replace("log_dest stdout", f"log_dest file {log}"))
    # Mosquitto's own: the TLS port listens once it started
    server = Mosquitto(HOST, port, conf, directory / "mosquitto.out")

    config = fast_config(shipped_config).model_copy(update={"base_dir": directory})
    config = with_mqtt(
        config,
        broker=f"mqtts://{HOST}:{port}",
        username="ebcd",
        password_file="secrets/ebcd",  # noqa: S106 (a path)
        ca_file="pki/ca.crt",
        cert_file="pki/ebcd.crt",
        key_file="pki/ebcd.key",
        reconnect_initial_s=0.1,
        reconnect_max_s=0.5,
    )
    config = with_simulator(
        config, credentials_dir="secrets", cert_file="pki/bench.crt", key_file="pki/bench.key"
    )
    server.start()
    yield Env(server, config, directory)
    server.stop()


def _alert(*villages: Village) -> AlertRequest:
    return AlertRequest(
        level=2,
        event_type="11B03",
        targets=[parse_target(f"village:{v.code}") for v in villages],
        text="暴雨橙色预警",
        ttl_s=600,
    )


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
async def test_an_alert_over_tls_with_credentials_reaches_every_terminal(
    env: Env, district: District, tmp_path: Path
) -> None:
    own, shared = _mqtt_villages(district)
    terminals = [*own.terminals, *shared.terminals]
    async with (
        running_daemon(env.config, district, env.url, tmp_path) as daemon,
        running_fleet(env.config, district, terminals, HOST, env.broker.port, tls=True) as fleet,
    ):
        # Births are accepted only from a terminal logged in under its own code (the ACL's %u).
        await wait_online(daemon, len(terminals), timeout_s=20)
        run = await daemon.submit(_alert(own, shared), source="test", actor="pytest")
        state = await settle(daemon, run.id, timeout_s=30, until="completed")
        plays = fleet.plays()
    n = len(terminals)
    assert (state["state"], state["targets"], state["acked"], state["coverage"]) == ("completed", n, n, 1.0)
    assert sorted(code for code, alert, _rev in plays if alert == run.id) == sorted(t.code for t in terminals)
    log = env.broker_log.read_text()
    assert re.search(r"New client connected from 127\.0\.0\.1:\d+ as ebcd-\S+ \(.*u'ebcd'\)", log)
    for terminal in terminals:
        assert f"as sim-{terminal.code} (p2, c1, k30, u'{terminal.code}')" in log, terminal.code


@pytest.mark.slow
async def test_a_daemon_that_does_not_trust_the_ca_never_connects_and_keeps_trying(
    env: Env, district: District, tmp_path: Path
) -> None:
    own, _ = _mqtt_villages(district)
    untrusting = with_mqtt(env.config, ca_file=None)  # the system's CA store, without the test CA
    async with running_fleet(env.config, district, own.terminals, HOST, env.broker.port, tls=True) as fleet:
        with structlog.testing.capture_logs() as logs:

            def failures() -> list[str]:
                return [str(e["error"]) for e in logs if e["event"] == "mqtt.disconnected"]

            daemon = Daemon(untrusting, district, state_dir=tmp_path, broker=env.url, metrics_port=-1)
            task = asyncio.create_task(daemon.run(), name="daemon")
            try:
                await wait_for(daemon.ready.is_set, 20)
                run = await daemon.submit(_alert(own), source="test", actor="pytest")
                await wait_for(lambda: len(failures()) >= 3, 15)  # it keeps trying
                state = run.state_doc(district, daemon.runner.clock())
                connects = daemon.link.connects
            finally:
                daemon.stop()
                await asyncio.wait_for(task, 30)
    assert connects == 0
    assert all("certificate verify failed" in error for error in failures()), failures()
    assert (state["targets"], state["acked"]) == (len(own.terminals), 0)
    assert not fleet.plays()


@pytest.mark.slow
async def test_a_simulated_terminal_with_a_wrong_password_is_refused(
    env: Env, district: District, tmp_path: Path
) -> None:
    own, _ = _mqtt_villages(district)
    wrong, right = own.terminals[0], own.terminals[1]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    _secret(credentials / wrong.code, "not " + password(wrong.code))
    _secret(credentials / right.code, password(right.code))
    config = with_simulator(env.config, credentials_dir=str(credentials))
    context, passwords = fleet_login(config, [wrong.code, right.code], tls=True)
    with structlog.testing.capture_logs() as logs:
        fleet = MqttFleet(
            district,
            [wrong, right],
            HOST,
            env.broker.port,
            plan=FaultPlan(),
            play_time_s=0.1,
            heartbeat_interval_s=5.0,
            tls_context=context,
            passwords=passwords,
        )
        sims = {sim.terminal.code: sim for sim in fleet.terminals}
        tasks = [asyncio.create_task(sim.link.run(), name=f"sim-{code}") for code, sim in sims.items()]
        try:
            await wait_for(sims[right.code].link.connected.is_set, 10)

            def refusals() -> list[str]:
                return [
                    str(e["error"])
                    for e in logs
                    if e["event"] == "mqtt.disconnected" and e.get("client_id") == f"sim-{wrong.code}"
                ]

            await wait_for(refusals, 10)
            connects = sims[wrong.code].link.connects
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert connects == 0
    assert re.search(r"not authori[sz]ed|bad user ?name or password", refusals()[0], re.IGNORECASE), (
        refusals()
    )
    assert "Client <unknown> disconnected, not authorised." in env.broker_log.read_text()


def test_the_broker_is_checked_by_name_and_ca(env: Env) -> None:
    good = tls_context(
        base=env.directory,
        section="[mqtt]",
        ca_file="pki/ca.crt",
        cert_file="pki/ebcd.crt",
        key_file="pki/ebcd.key",
    )
    for server_hostname in (HOST, "localhost"):
        with (
            socket.create_connection((HOST, env.broker.port), timeout=5) as raw,
            good.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")  # tls_version is a minimum
    with (
        socket.create_connection((HOST, env.broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        good.wrap_socket(raw, server_hostname="broker.example.org")
    other = tls_context(base=env.directory, section="[mqtt]", ca_file="pki/other-ca.crt")
    with (
        socket.create_connection((HOST, env.broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        other.wrap_socket(raw, server_hostname=HOST)


# -- the files and their errors --------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki-only") / "pki"
    make_pki(directory)
    return directory


def test_a_ca_file_replaces_the_system_store_and_names_are_checked(pki: Path) -> None:
    context = tls_context(base=pki, section="[mqtt]", ca_file="ca.crt")
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ebcd test CA"),),)]
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert tls_context(base=pki, section="[mqtt]").get_ca_certs() != context.get_ca_certs()


def _damage(pki: Path, tmp: Path, case: str) -> dict[str, str]:
    """[mqtt] keys for one broken TLS set-up."""
    keys = {
        "ca_file": str(pki / "ca.crt"),
        "cert_file": str(pki / "ebcd.crt"),
        "key_file": str(pki / "ebcd.key"),
    }
    if case == "missing ca":
        keys["ca_file"] = str(tmp / "nope.crt")
    elif case == "garbage ca":
        (tmp / "garbage.crt").write_text("not a certificate\n")
        keys["ca_file"] = str(tmp / "garbage.crt")
    elif case == "writable ca":
        _write_pem(tmp / "ca.crt", (pki / "ca.crt").read_bytes(), 0o666)
        keys["ca_file"] = str(tmp / "ca.crt")
    elif case == "readable key":
        _write_pem(tmp / "ebcd.key", (pki / "ebcd.key").read_bytes(), 0o644)
        keys["key_file"] = str(tmp / "ebcd.key")
    elif case == "no key":
        del keys["key_file"]
    elif case == "another key":
        keys["key_file"] = str(pki / "bench.key")
    elif case == "encrypted key":
        key = serialization.load_pem_private_key((pki / "ebcd.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        _write_pem(tmp / "ebcd.key", _key_pem(key, b"secret"), 0o600)
        keys["key_file"] = str(tmp / "ebcd.key")
    return keys


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing ca", r"^\[mqtt\] ca_file: {tmp}/nope\.crt: cannot open: No such file or directory$"),
        ("garbage ca", r"^\[mqtt\] ca_file: {tmp}/garbage\.crt: no usable PEM CA certificate"),
        ("writable ca", r"^\[mqtt\] ca_file: {tmp}/ca\.crt: mode 0666, writable by group or others; run"),
        ("readable key", r"^\[mqtt\] key_file: {tmp}/ebcd\.key: mode 0644, open to others; run `chmod o="),
        ("no key", r"^\[mqtt\] cert_file is set without key_file"),
        ("another key", r"^\[mqtt\] cert_file, key_file: .*ebcd\.crt, .*bench\.key: not a PEM certificate"),
        ("encrypted key", r"^\[mqtt\] cert_file, key_file: .*: .*the key is encrypted"),
    ],
)
def test_a_bad_tls_file_is_named_with_its_config_key(
    pki: Path, tmp_path: Path, case: str, message: str
) -> None:
    keys = _damage(pki, tmp_path, case)
    with pytest.raises(MqttAuthError, match=message.format(tmp=re.escape(str(tmp_path)))):
        tls_context(base=tmp_path, section="[mqtt]", **keys)


def test_a_password_is_the_first_line_of_a_file_kept_from_others(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"  s3 cr:et \r\nsecond line\n")
    (tmp_path / "pw").chmod(0o640)
    assert read_secret("pw", base=tmp_path, key="[mqtt] password_file") == "  s3 cr:et "
    assert read_secret(None, base=tmp_path, key="[mqtt] password_file") is None
    (tmp_path / "pw").chmod(0o644)
    with pytest.raises(MqttAuthError, match=r"^\[mqtt\] password_file: .*/pw: mode 0644, open to others"):
        read_secret("pw", base=tmp_path, key="[mqtt] password_file")
    _secret(tmp_path / "empty", "")
    with pytest.raises(MqttAuthError, match=r"^\[mqtt\] password_file: .*/empty: the first line .* is empty"):
        read_secret("empty", base=tmp_path, key="[mqtt] password_file")


def test_terminal_passwords_come_from_their_own_files_or_all(tmp_path: Path) -> None:
    a, b, c = "6" + "1" * 22, "6" + "2" * 22, "6" + "3" * 22
    creds = tmp_path / "creds"
    creds.mkdir()
    _secret(creds / a, "pw-a")
    key = "[simulator] credentials_dir"
    with pytest.raises(
        MqttAuthError, match=rf"^{re.escape(key)}: .*/creds: no password for 2 terminal\(s\): {b}, {c};"
    ):
        terminal_passwords("creds", [a, b, c], base=tmp_path, key=key)
    _secret(creds / SHARED_FILE, "pw-all")
    assert terminal_passwords("creds", [a, b, c], base=tmp_path, key=key) == {
        a: "pw-a",
        b: "pw-all",
        c: "pw-all",
    }
    (creds / a).chmod(0o604)
    with pytest.raises(MqttAuthError, match=rf"/creds/{a}: mode 0604, open to others"):
        terminal_passwords("creds", [a], base=tmp_path, key=key)
    with pytest.raises(MqttAuthError, match=r"/nowhere: cannot list the directory: No such file"):
        terminal_passwords("nowhere", [a], base=tmp_path, key=key)


def test_the_daemon_refuses_to_start_without_its_ca_file(
    shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = with_mqtt(shipped_config, broker="mqtts://127.0.0.1:8883", ca_file="missing-ca.crt")
    with structlog.testing.capture_logs() as logs:
        code = run_daemon(config, district, broker=None, state_dir=tmp_path, metrics_port=-1)
    assert code == 1
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["daemon.mqtt_credentials"]
    missing = shipped_config.base_dir / "missing-ca.crt"
    assert errors[0]["error"] == f"[mqtt] ca_file: {missing}: cannot open: No such file or directory"


def test_ebcd_simulate_names_a_missing_credentials_dir(shipped_config: Config, tmp_path: Path) -> None:
    base = shipped_config.base_dir
    toml = (base / "ebcd.toml").read_text(encoding="utf-8")
    toml = toml.replace('rooms = "rooms.csv"', f'rooms = "{base}/rooms.csv"')
    toml = toml.replace('terminals = "terminals.csv"', f'terminals = "{base}/terminals.csv"')
    assert toml.count("[simulator]\n") == 1
    toml = toml.replace("[simulator]\n", '[simulator]\ncredentials_dir = "no-such-dir"\n')
    (tmp_path / "ebcd.toml").write_text(toml, encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ebcd",
            "simulate",
            "-c",
            str(tmp_path / "ebcd.toml"),
            "--broker",
            "mqtt://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    missing = tmp_path / "no-such-dir"
    why = "cannot list the directory: No such file or directory"
    assert f"ebcd: [simulator] credentials_dir: {missing}: {why}" in done.stderr
