"""Terminals sign their reports and presence: canonical bytes, round trips over the MQTT codec,
every refusal (wrong key, tampered field, stale time, unknown terminal, unsigned), the key folders
and `ebcd keys generate-terminals`, and the simulated terminals signing on a real broker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ebcd.cli.commands import app
from ebcd.config import Config
from ebcd.protocols.messages import AckStatus, Liveness, PlayCommand, TerminalPresence, TerminalReport
from ebcd.protocols.mqtt import codec
from ebcd.protocols.mqtt.codec import Topics
from ebcd.security.reports import (
    ReportVerifier,
    canonical_presence_bytes,
    canonical_report_bytes,
    generate_terminal_keys,
    load_terminal_keys,
    load_terminal_signers,
    report_verifier_from,
    sign_presence,
    sign_report,
)
from ebcd.security.signing import (
    Ed25519SigningKey,
    KeyFileError,
    Signer,
    Sm2SigningKey,
)
from ebcd.tiers.district import District
from simulators.faults import FaultPlan
from simulators.mqtt_fleet import MqttFleet, fleet_signers
from tests.conftest import Mosquitto
from tests.helpers import mqtt_client, wait_for

NOW = 1_764_160_000.0
WINDOW_S = 300.0
T1 = "63415231020050314010401"
T2 = "63415231020050314010402"
SIGNER_1 = Signer(Ed25519SigningKey.generate(), "000000000001")
SIGNER_2 = Signer(Ed25519SigningKey.generate(), "000000000001")
REPORT = TerminalReport(T1, "20261126-0001", 1, AckStatus.DONE, None, 1764160000)
REFUSAL = TerminalReport(T1, "20261126-0001", 1, AckStatus.REFUSED, "amplifier failure", 1764160000)
BIRTH = TerminalPresence(T1, Liveness.ONLINE, 42)
HEARTBEAT = TerminalPresence(T1, Liveness.ONLINE, 42, heartbeat=True)
WILL = TerminalPresence(T1, Liveness.OFFLINE, 42)


def verifier(**keys: Signer) -> ReportVerifier:
    return ReportVerifier(
        {code: s.verifier() for code, s in keys.items()}, window_s=WINDOW_S, clock=lambda: NOW
    )


def signed(report: TerminalReport, signer: Signer = SIGNER_1, at: float = NOW) -> TerminalReport:
    return dataclasses.replace(report, signature=sign_report(signer, report, now=at))


def signed_presence(p: TerminalPresence, signer: Signer = SIGNER_1, at: float = NOW) -> TerminalPresence:
    return dataclasses.replace(p, signature=sign_presence(signer, p, now=at))


# -- canonical bytes --------------------------------------------------------------------------


def test_canonical_bytes_are_sorted_compact_json_with_the_signed_time() -> None:
    # Golden vectors: what a terminal in any language must produce, byte for byte.
    assert canonical_report_bytes(REFUSAL, 1764160000) == (
        b'{"alert":"20261126-0001","cause":"amplifier failure","msg":"report","rev":1,'
        b'"seq":1764160000,"status":"refused","terminal":"63415231020050314010401",'
        b'"time":1764160000,"v":1}'
    )
    assert canonical_presence_bytes(HEARTBEAT, 1764160001) == (
        b'{"heartbeat":true,"msg":"presence","session":42,"state":"online",'
        b'"terminal":"63415231020050314010401","time":1764160001,"v":1}'
    )


def test_an_empty_cause_is_no_cause_as_on_mqtt() -> None:
    # MQTT omits an empty cause, so the platform decodes None: both must sign the same bytes.
    assert canonical_report_bytes(dataclasses.replace(REPORT, cause=""), 1) == canonical_report_bytes(
        REPORT, 1
    )


def test_report_and_presence_bytes_never_coincide() -> None:
    report = json.loads(canonical_report_bytes(REPORT, 1))
    presence = json.loads(canonical_presence_bytes(BIRTH, 1))
    assert (report["msg"], presence["msg"]) == ("report", "presence")
    assert "op" not in report  # nor does either coincide with a command's bytes
    assert "op" not in presence


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("report", [REPORT, REFUSAL], ids=["done", "refused"])
def test_a_signed_report_is_believed_after_the_mqtt_codec(report: TerminalReport) -> None:
    payload = codec.encode_report(signed(report))
    assert json.loads(payload)["sig"] == signed(report).signature.hex()
    heard = codec.decode_report(T1, payload)
    assert len(heard.signature) == 74
    assert verifier(**{T1: SIGNER_1}).check_report(heard, heard.signature) is None


@pytest.mark.parametrize("presence", [BIRTH, HEARTBEAT, WILL], ids=["birth", "heartbeat", "will"])
def test_a_signed_presence_is_believed_after_the_mqtt_codec(presence: TerminalPresence) -> None:
    heard = codec.decode_presence(T1, codec.encode_presence(signed_presence(presence)))
    assert verifier(**{T1: SIGNER_1}).check_presence(heard, heard.signature) is None


def test_sm2_terminal_keys_work_too() -> None:
    sm2 = Signer(Sm2SigningKey.generate(), "000000000001")
    heard = codec.decode_report(T1, codec.encode_report(signed(REPORT, sm2)))
    assert verifier(**{T1: sm2}).check_report(heard, heard.signature) is None
    assert verifier(**{T1: SIGNER_1}).check_report(heard, heard.signature) == "signature: bad_signature"


def test_messages_without_sig_decode_as_before() -> None:
    heard = codec.decode_report(T1, b'{"alert":"20261126-0001","rev":1,"status":"done"}')
    assert heard == TerminalReport(T1, "20261126-0001", 1, AckStatus.DONE)
    assert heard.signature == b""
    assert codec.encode_report(heard) == b'{"alert":"20261126-0001","rev":1,"status":"done"}'
    presence = codec.decode_presence(T1, b'{"state":"offline","session":1000000000000}')
    assert presence.signature == b""


@pytest.mark.parametrize("sig", ['"zz"', '"abc"', "7", '"' + "00" * 300 + '"'])
def test_a_sig_that_is_not_hex_is_malformed(sig: str) -> None:
    with pytest.raises(codec.CodecError, match="sig"):
        codec.decode_report(T1, b'{"alert":"a","rev":1,"status":"done","sig":%s}' % sig.encode())
    with pytest.raises(codec.CodecError, match="sig"):
        codec.decode_presence(T1, b'{"state":"online","session":1,"sig":%s}' % sig.encode())


# -- refusals ---------------------------------------------------------------------------------


def test_unsigned_messages_are_refused() -> None:
    check = verifier(**{T1: SIGNER_1})
    assert check.check_report(REPORT, b"") == "unsigned"
    assert check.check_presence(TerminalPresence(T1, Liveness.OFFLINE, 10**12), b"") == "unsigned"


def test_a_terminal_without_a_key_is_refused() -> None:
    other = signed(dataclasses.replace(REPORT, terminal=T2), SIGNER_2)
    assert verifier(**{T1: SIGNER_1}).check_report(other, other.signature) == "unknown_terminal_key"
    assert verifier(**{T1: SIGNER_1}).check_report(dataclasses.replace(REPORT, terminal=T2), b"") == (
        "unknown_terminal_key"
    )
    assert verifier(**{T1: SIGNER_1}).missing([T1, T2]) == [T2]


def test_a_wrong_key_is_refused() -> None:
    forged = signed(REPORT, SIGNER_2)  # another terminal's key, same serial
    assert verifier(**{T1: SIGNER_1}).check_report(forged, forged.signature) == "signature: bad_signature"
    stranger = Signer(SIGNER_1.key, "000000000099")  # the right key under another serial
    forged = signed(REPORT, stranger)
    assert verifier(**{T1: SIGNER_1}).check_report(forged, forged.signature) == "signature: unknown_key"


def test_one_terminals_signature_does_not_speak_for_another() -> None:
    # T2 (with its own valid key) replays T1's signed report on T2's topic, or the other way round.
    check = verifier(**{T1: SIGNER_1, T2: SIGNER_2})
    theirs = signed(REPORT, SIGNER_1)
    moved = dataclasses.replace(theirs, terminal=T2)
    assert check.check_report(moved, moved.signature) == "signature: bad_signature"


@pytest.mark.parametrize(
    "change",
    [
        {"alert_id": "20261126-0002"},
        {"revision": 2},
        {"status": AckStatus.REFUSED},
        {"cause": "forged refusal"},
        {"seq": 1764160001},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_tampered_report_is_refused(change: dict[str, object]) -> None:
    genuine = signed(REPORT)
    tampered = dataclasses.replace(genuine, **change)  # type: ignore[arg-type]
    assert verifier(**{T1: SIGNER_1}).check_report(tampered, genuine.signature) == "signature: bad_signature"


@pytest.mark.parametrize(
    "change",
    [{"state": Liveness.OFFLINE}, {"session": 1_000_000_000_000}, {"heartbeat": False}, {"playing": ("x",)}],
    ids=lambda c: next(iter(c)),
)
def test_a_tampered_presence_is_refused(change: dict[str, object]) -> None:
    genuine = signed_presence(HEARTBEAT)
    tampered = dataclasses.replace(genuine, **change)  # type: ignore[arg-type]
    check = verifier(**{T1: SIGNER_1})
    assert check.check_presence(tampered, genuine.signature) == "signature: bad_signature"


def test_a_tampered_time_is_refused() -> None:
    genuine = signed(REPORT, at=NOW - 3600)
    block = bytearray(genuine.signature)
    block[0:4] = int(NOW).to_bytes(4, "big")  # make an old report look fresh
    assert verifier(**{T1: SIGNER_1}).check_report(genuine, bytes(block)) == "signature: bad_signature"


@pytest.mark.parametrize("block", [b"\x00" * 10, b"\x00" * 75, b"\x00" * 4 + b"\xab" * 70])
def test_a_malformed_block_is_refused(block: bytes) -> None:
    assert verifier(**{T1: SIGNER_1}).check_report(REPORT, block) == "signature: malformed"


@pytest.mark.parametrize(
    ("age_s", "verdict"),
    [(0, None), (WINDOW_S, None), (WINDOW_S + 1, "stale"), (-WINDOW_S, None), (-WINDOW_S - 1, "stale")],
)
def test_reports_and_heartbeats_outside_the_window_are_stale(age_s: float, verdict: str | None) -> None:
    check = verifier(**{T1: SIGNER_1})
    report = signed(REPORT, at=NOW - age_s)
    assert check.check_report(report, report.signature) == verdict
    beat = signed_presence(HEARTBEAT, at=NOW - age_s)
    assert check.check_presence(beat, beat.signature) == verdict


def test_a_last_will_may_be_old_but_not_from_the_future() -> None:
    # A will is signed when its connection opens and published when it dies, maybe days later.
    check = verifier(**{T1: SIGNER_1})
    old = signed_presence(WILL, at=NOW - 7 * 86400)
    assert check.check_presence(old, old.signature) is None
    ahead = signed_presence(WILL, at=NOW + WINDOW_S + 1)
    assert check.check_presence(ahead, ahead.signature) == "stale"


def test_the_clock_is_read_when_no_time_is_given() -> None:
    check = ReportVerifier({T1: SIGNER_1.verifier()}, window_s=WINDOW_S)  # time.time
    fresh = signed(REPORT, at=time.time())
    assert check.check_report(fresh, fresh.signature) is None
    assert check.check_report(fresh, fresh.signature, now=time.time() + 2 * WINDOW_S) == "stale"


def test_without_keys_everything_is_believed_as_before() -> None:
    check = ReportVerifier.disabled()
    assert not check.enabled
    assert check.check_report(REPORT, b"") is None
    assert check.check_report(REPORT, b"garbage") is None
    assert check.check_presence(TerminalPresence(T1, Liveness.OFFLINE, 10**12), b"") is None
    assert check.missing([T1]) == []


def test_the_window_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="window_s"):
            ReportVerifier({}, window_s=bad)


# -- key folders ------------------------------------------------------------------------------


def test_generated_keys_load_in_both_folders(tmp_path: Path) -> None:
    public, private = generate_terminal_keys(tmp_path / "keys", [T1, T2], "ed25519", 7)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / f"{T1}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((public / f"{T1}.pub").stat().st_mode) == 0o644
    check = ReportVerifier.from_dir(public, window_s=WINDOW_S, clock=lambda: NOW)
    assert check.enabled
    assert check.terminals == {T1, T2}
    signers = load_terminal_signers(private, [T1, T2, "63415231020050314010409"])
    assert set(signers) == {T1, T2}  # a terminal without a key file signs nothing
    assert signers[T1].serial == "000000000007"
    mine = signed(REPORT, signers[T1])
    assert check.check_report(mine, mine.signature) is None
    theirs = signed(REPORT, signers[T2])
    assert check.check_report(theirs, theirs.signature) == "signature: bad_signature"


def test_sm2_and_ed25519_keys_may_sit_side_by_side(tmp_path: Path) -> None:
    generate_terminal_keys(tmp_path / "a", [T1], "ed25519", 1)
    generate_terminal_keys(tmp_path / "b", [T2], "sm2", 1)
    (tmp_path / "b/public" / f"{T2}.pub").rename(tmp_path / "a/public" / f"{T2}.pub")
    keys = load_terminal_keys(tmp_path / "a/public")
    assert {c: k.keys["000000000001"].scheme for c, k in keys.items()} == {T1: "ed25519", T2: "sm2"}
    signer = load_terminal_signers(tmp_path / "b/private", [T2])[T2]
    assert signer.scheme == "sm2"


def test_generating_never_overwrites_a_key(tmp_path: Path) -> None:
    generate_terminal_keys(tmp_path, [T1], "ed25519", 1)
    before = (tmp_path / "private" / f"{T1}.key").read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_terminal_keys(tmp_path, [T2, T1], "ed25519", 1)
    assert (tmp_path / "private" / f"{T1}.key").read_bytes() == before
    assert not (tmp_path / "private" / f"{T2}.key").exists(), "wrote part of a batch it refused"
    with pytest.raises(ValueError, match="23-digit"):
        generate_terminal_keys(tmp_path / "other", ["6341"], "ed25519", 1)
    with pytest.raises(ValueError, match="scheme"):
        generate_terminal_keys(tmp_path / "other", [T1], "rsa", 1)


def test_unsafe_or_odd_key_folders_are_refused_with_the_fix(tmp_path: Path) -> None:
    public, private = generate_terminal_keys(tmp_path, [T1], "ed25519", 1)
    (public / f"{T1}.pub").chmod(0o666)
    with pytest.raises(KeyFileError, match="chmod 644"):
        load_terminal_keys(public)
    (public / f"{T1}.pub").chmod(0o644)
    public.chmod(0o777)
    with pytest.raises(KeyFileError, match="chmod go-w"):
        load_terminal_keys(public)
    public.chmod(0o755)
    (public / "README").write_text("not a key\n")  # ignored: not a .pub
    (public / "town-room.pub").write_text("x\n")
    with pytest.raises(KeyFileError, match="23-digit code"):
        load_terminal_keys(public)
    (public / "town-room.pub").unlink()
    assert set(load_terminal_keys(public)) == {T1}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyFileError, match=r"no <code>\.pub files"):
        load_terminal_keys(empty)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_terminal_keys(tmp_path / "missing")
    (private / f"{T1}.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_terminal_signers(private, [T1])


def test_keys_generate_terminals_makes_a_pair_per_mqtt_terminal(tmp_path: Path, district: District) -> None:
    out = tmp_path / "keys"
    result = CliRunner().invoke(app, ["keys", "generate-terminals", "--out", str(out)])
    assert result.exit_code == 0, result.output
    mqtt = sorted(t.code for t in district.terminals() if t.link == "mqtt")
    assert sorted(p.stem for p in (out / "public").iterdir()) == mqtt
    assert sorted(p.stem for p in (out / "private").iterdir()) == mqtt
    assert "terminal_keys_dir" in result.output
    again = CliRunner().invoke(app, ["keys", "generate-terminals", "--out", str(out)])
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output


# -- the simulated terminals sign -------------------------------------------------------------


async def test_simulated_terminals_sign_reports_and_presence(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    village = next(v for v in district.villages() if v.link == "mqtt")
    signed_one, unsigned_one = village.terminals[0], village.terminals[1]
    public, private = generate_terminal_keys(tmp_path, [signed_one.code], "ed25519", 1)
    config = shipped_config.model_copy(
        update={"simulator": shipped_config.simulator.model_copy(update={"terminal_keys_dir": str(private)})}
    )
    signers = fleet_signers(config, [signed_one.code, unsigned_one.code])
    assert signers is not None
    assert set(signers) == {signed_one.code}
    check = ReportVerifier.from_dir(public)
    topics = Topics(district.code)
    fleet = MqttFleet(
        district,
        [signed_one, unsigned_one],
        mosquitto.host,
        mosquitto.port,
        plan=FaultPlan(),
        play_time_s=0.0,
        heartbeat_interval_s=3600,
        verifier=None,  # obeys the unsigned test command below
        signers=signers,
    )
    async with mqtt_client(mosquitto.host, mosquitto.port, topics.all_reports, topics.all_presence) as (
        client,
        seen,
    ):
        task = asyncio.create_task(fleet.run(), name="fleet")
        try:
            await asyncio.wait_for(fleet.started.wait(), 20)
            for sim in fleet.terminals:
                sim.heartbeat()
            cmd = codec.encode_command(
                PlayCommand("20261126-0099", "4" * 35, 1, 7, 2, "11B03", "测试", 60.0, issued_at=time.time())
            )
            await client.publish(topics.group_cmd(village.code), cmd, qos=1)

            def reports(code: str) -> list[TerminalReport]:
                return [
                    codec.decode_report(code, json.dumps(body).encode())
                    for topic, body in seen
                    if topic == topics.report(code) and body.get("alert") == "20261126-0099"
                ]

            await wait_for(
                lambda: len(reports(signed_one.code)) == 3 and len(reports(unsigned_one.code)) == 3, 10
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    for r in reports(signed_one.code):
        assert check.check_report(r, r.signature) is None, r
    assert {r.status for r in reports(signed_one.code)} == {
        AckStatus.RECEIVED,
        AckStatus.PLAYING,
        AckStatus.DONE,
    }
    for r in reports(unsigned_one.code):
        assert r.signature == b""
        assert check.check_report(r, r.signature) == "unknown_terminal_key"
    presences = [
        codec.decode_presence(signed_one.code, json.dumps(body).encode())
        for topic, body in seen
        if topic == topics.presence(signed_one.code)
    ]
    assert {p.heartbeat for p in presences} == {False, True}  # the birth and a heartbeat
    for p in presences:
        assert check.check_presence(p, p.signature) is None, p


def test_the_config_keys_name_the_folders(shipped_config: Config, tmp_path: Path) -> None:
    assert shipped_config.simulator.terminal_keys_dir is None
    assert shipped_config.security.terminal_keys_dir is None
    assert fleet_signers(shipped_config, [T1]) is None
    assert not report_verifier_from(None, shipped_config.base_dir).enabled
    generate_terminal_keys(tmp_path / "keys", [T1], "ed25519", 1)
    check = report_verifier_from("keys/public", tmp_path, window_s=WINDOW_S)  # relative to the config
    assert check.terminals == {T1}
    assert check.window_s == WINDOW_S


def test_verification_of_a_signed_will_survives_an_old_signing_time(tmp_path: Path) -> None:
    # what SimTerminal does: the will is signed at connect time, with the session it ends
    generate_terminal_keys(tmp_path, [T1], "ed25519", 1)
    signer = load_terminal_signers(tmp_path / "private", [T1])[T1]
    will = signed_presence(WILL, signer, at=NOW - 86400)
    check = ReportVerifier.from_dir(tmp_path / "public", window_s=WINDOW_S, clock=lambda: NOW)
    assert check.check_presence(will, will.signature) is None
