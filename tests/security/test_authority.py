"""Only the allowed speak: listed upstream senders within their levels, event types and area,
signed CAP verified where a sender signs, and operators confined to their room's area. Every
refusal is journalled: upstream messages in the raw journal with the verdict, operator commands
in the audit log with who asked."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ebcd.admission.authority import AuthorityError, OperatorAuthority, UpstreamAuthority
from ebcd.config import Config, OperatorConfig, UpstreamConfig, UpstreamSender
from ebcd.control.socket import SOCKET_NAME, ControlClient
from ebcd.daemon.daemon import Daemon
from ebcd.model.alert import Origin, parse_target
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, wait_for
from tests.ingest.cap_docs import alert as cap_alert
from tests.ingest.cap_docs import area as cap_area
from tests.ingest.cap_docs import info as cap_info
from tests.ingest.test_xmldsig import EC_CERT, EC_KEY, RSA_CERT, cert_pem, embedded_pem, read, sign

pytestmark = pytest.mark.slow
# the operator tokens below are test credentials, not secrets
# ruff: noqa: S106

CITY = "ews@city.example.gov.cn"
PROVINCE = "ews@province.example.gov.cn"
TOWN_AREA = "341523101000"  # 杭埠镇, the town the CAP documents of cap_docs address
TOWN_ROOM = "53415231010000314010101"
OTHER_TOWN_ROOM = "53415231000000314010101"  # 城关镇
ME = pwd.getpwuid(os.getuid()).pw_name


def _with(config: Config, **update: Any) -> Config:
    return config.model_copy(update=update)


def _cap(identifier: str, sender: str, *, area_code: str = TOWN_AREA, **info: Any) -> bytes:
    now = datetime.now(UTC).replace(microsecond=0)
    return cap_alert(
        identifier=identifier,
        sender=sender,
        sent=now.isoformat(),
        infos=[
            cap_info(
                expires=(now + timedelta(minutes=30)).isoformat(),
                areas=[cap_area(geocodes=[("AreaCode", area_code)])],
                **info,
            )
        ],
    )


def _json(identifier: str, sender: str | None, target: str, **fields: Any) -> bytes:
    doc = {
        "identifier": identifier,
        "level": 2,
        "event_type": "11B03",
        "targets": [target],
        "text": "暴雨橙色预警",
        **fields,
    }
    if sender is not None:
        doc["sender"] = sender
    return json.dumps(doc, ensure_ascii=False).encode()


async def _outcomes(
    daemon: Daemon, client: Any, seen: list[tuple[str, Any]], messages: list[bytes]
) -> list[dict[str, Any] | str]:
    """Publish each message and wait for its verdict in the journal: its rejection document as
    published on the rejection topic, or "accepted"."""
    journal = daemon.journal
    out: list[dict[str, Any] | str] = []
    for message in messages:
        await client.publish(daemon.topics.alerts_in, message, qos=1)
        for _ in range(200):
            latest = await journal.list_received(1)
            if latest and latest[0].payload == message and latest[0].outcome is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no verdict on {message[:60]!r}")
        if latest[0].outcome == "accepted":
            out.append("accepted")
            continue
        digest = hashlib.sha256(message).hexdigest()
        await wait_for(lambda digest=digest: any(d["sha256"] == digest for _t, d in seen), 5)
        out.append(next(d for _t, d in seen if d["sha256"] == digest))
    return out


@pytest.fixture
def upstream_config(shipped_config: Config, tmp_path: Path) -> Config:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "city.pem").write_bytes(cert_pem(RSA_CERT))
    senders = [
        UpstreamSender(
            sender=CITY,
            levels=[1, 2, 3],
            event_types=["11B*"],
            area=[f"town:{TOWN_ROOM}"],
            signed_by=[str(tmp_path / "keys" / "city.pem")],
        ),
        UpstreamSender(sender=PROVINCE, event_types=["11B03", "11A01"]),
    ]
    return _with(fast_config(shipped_config), upstream=UpstreamConfig(senders=senders))


@pytest.fixture
async def upstream_daemon(
    mosquitto: Mosquitto, upstream_config: Config, district: District, tmp_path: Path
) -> AsyncIterator[tuple[Daemon, Any, list[tuple[str, Any]]]]:
    topics = Topics(district.code)
    async with (
        running_daemon(upstream_config, district, mosquitto.url, tmp_path / "state") as daemon,
        mqtt_client(mosquitto.host, mosquitto.port, topics.rejected) as (client, seen),
    ):
        yield daemon, client, seen


async def test_an_unlisted_senders_cap_is_refused_and_journalled(
    upstream_daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    daemon, client, seen = upstream_daemon
    document = _cap("X-1", "prankster@example.com")
    (refusal,) = await _outcomes(daemon, client, seen, [document])
    assert isinstance(refusal, dict)
    assert refusal["reason"] == "not_allowed"
    assert "'prankster@example.com' is not a listed upstream sender" in refusal["detail"]
    assert not daemon.runner.alerts
    (received,) = await daemon.journal.list_received(1)
    assert received.payload == document  # the raw bytes, as upstream sent them
    assert received.outcome == "rejected"
    assert received.detail is not None
    assert received.detail.startswith("not_allowed: sender")
    # a JSON alert with no sender at all is refused too
    (anonymous,) = await _outcomes(daemon, client, seen, [_json("X-2", None, f"town:{TOWN_ROOM}")])
    assert isinstance(anonymous, dict)
    assert anonymous["reason"] == "not_allowed"


async def test_a_listed_sender_that_signs_is_refused_without_a_good_signature(
    upstream_daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    daemon, client, seen = upstream_daemon
    good = sign(_cap("C-1", CITY))
    signed = sign(_cap("C-2", CITY))
    forged = signed.replace("红色".encode(), "蓝色".encode())  # the headline changed after signing
    assert forged != signed
    unsigned = _cap("C-3", CITY)
    stranger = sign(
        _cap("C-4", CITY), EC_KEY, EC_CERT, algorithm="ecdsa-sha256"
    )  # well signed, by a key the city does not use
    as_json = _json("C-5", CITY, f"town:{TOWN_ROOM}")
    outcomes = await _outcomes(daemon, client, seen, [forged, unsigned, as_json, stranger, good])
    reasons = [o if isinstance(o, str) else o["reason"] for o in outcomes]
    assert reasons == ["bad_signature"] * 4 + ["accepted"]
    assert isinstance(outcomes[0], dict)
    assert "digest" in outcomes[0]["detail"]
    assert isinstance(outcomes[1], dict)
    assert "no <ds:Signature>" in outcomes[1]["detail"]
    (run,) = daemon.runner.alerts.values()
    assert run.request.identifier == "C-1"
    assert {t.town for t in map(daemon.district.terminal, run.deliveries) if t} == {TOWN_ROOM}
    verdicts = [r.outcome for r in reversed(await daemon.journal.list_received(5))]
    assert verdicts == ["rejected"] * 4 + ["accepted"]


async def test_a_listed_sender_stays_within_its_levels_event_types_and_area(
    upstream_daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    daemon, client, seen = upstream_daemon
    own = f"town:{TOWN_ROOM}"
    outcomes = await _outcomes(
        daemon,
        client,
        seen,
        [
            sign(_cap("L-1", CITY, severity="Minor")),  # level 4: not among the city's levels
            sign(_cap("L-2", CITY, event_codes=[("EBEventType", "11A01")])),  # an earthquake: not 11B*
            sign(_cap("L-3", CITY, area_code="341523100000")),  # another town
            _json("P-1", PROVINCE, "all", event_type="11B05"),  # the province: 11B03 and 11A01 only
            _json("P-2", PROVINCE, "all"),  # district-wide 11B03: allowed
            _json("P-3", PROVINCE, own, msg_type="Cancel", references=[f"{CITY},L-9"]),
        ],
    )
    refusals = [o for o in outcomes if isinstance(o, dict)]
    assert [o["reason"] for o in refusals] == ["not_allowed"] * 4 + ["unknown_reference"]
    assert "levels [1, 2, 3], not level 4" in refusals[0]["detail"]
    assert "event types ['11B*'], not 11A01" in refusals[1]["detail"]
    assert f"only its own area (town:{TOWN_ROOM})" in refusals[2]["detail"]
    assert "not 11B05" in refusals[3]["detail"]
    assert outcomes[4] == "accepted"


async def test_only_the_sender_of_an_alert_may_update_or_cancel_it(
    upstream_daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    daemon, client, seen = upstream_daemon
    outcomes = await _outcomes(
        daemon,
        client,
        seen,
        [
            _json("P-10", PROVINCE, "all"),
            sign(_cap("C-10", CITY)),
            _json("P-11", PROVINCE, "all", msg_type="Cancel", references=[f"{CITY},C-10"]),
            _json("P-12", PROVINCE, "all", msg_type="Cancel", references=[f"{PROVINCE},P-10"]),
        ],
    )
    assert outcomes[:2] == ["accepted", "accepted"]
    refused = outcomes[2]
    assert isinstance(refused, dict)
    assert refused["reason"] == "not_allowed"
    assert f"was sent by '{CITY}'; only its sender may update or cancel it" in refused["detail"]
    await wait_for(lambda: any(r.state.value == "cancelled" for r in daemon.runner.alerts.values()), 10)
    states = {r.request.identifier: r.state.value for r in daemon.runner.alerts.values()}
    assert states["P-10"] == "cancelled"
    assert states["C-10"] != "cancelled"


async def test_a_real_signed_document_verifies_against_its_pinned_certificate(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    document = read("ipaws-md-local-area-emergency-polygon-signed.xml")
    match = re.search(rb"<sender>([^<]+)</sender>", document)
    assert match is not None
    sender = match.group(1).decode()
    (tmp_path / "own.pem").write_bytes(embedded_pem(document))
    (tmp_path / "other.pem").write_bytes(cert_pem(RSA_CERT))
    reasons = []
    for pem in ("own.pem", "other.pem"):
        config = _with(
            fast_config(shipped_config),
            upstream=UpstreamConfig(senders=[UpstreamSender(sender=sender, signed_by=[str(tmp_path / pem)])]),
        )
        topics = Topics(district.code)
        async with (
            running_daemon(config, district, mosquitto.url, tmp_path / pem.split(".")[0]) as daemon,
            mqtt_client(mosquitto.host, mosquitto.port, topics.rejected) as (client, seen),
        ):
            (refusal,) = await _outcomes(daemon, client, seen, [document])
            assert isinstance(refusal, dict)
            reasons.append(refusal["reason"])
    # with its own certificate pinned the signature holds, and the Maryland alert is refused only
    # for what it says (its area lies outside the district, or it has expired); with another, not
    assert reasons[0] in ("no_target_in_district", "expired")
    assert reasons[1] == "bad_signature"


def test_upstream_and_operator_entries_are_checked_at_start(
    shipped_config: Config, district: District, tmp_path: Path
) -> None:
    bad_area = _with(
        shipped_config, upstream=UpstreamConfig(senders=[UpstreamSender(sender="x", area=["town:123"])])
    )
    with pytest.raises(AuthorityError, match=r"\[\[upstream.senders\]\] #1 \(x\).*town:123"):
        UpstreamAuthority(bad_area, district)
    missing = _with(
        shipped_config,
        upstream=UpstreamConfig(senders=[UpstreamSender(sender="x", signed_by=[str(tmp_path / "no.pem")])]),
    )
    with pytest.raises(AuthorityError, match=r"signed_by.*no\.pem"):
        UpstreamAuthority(missing, district)
    not_a_room = _with(shipped_config, operators=[OperatorConfig(room="6" * 23, users=["x"])])
    with pytest.raises(AuthorityError, match="neither the district nor one of its towns or villages"):
        OperatorAuthority(not_a_room, district)


# --- operators on the control socket -------------------------------------------------------------


@pytest.fixture
def operator_config(shipped_config: Config, district: District, tmp_path: Path) -> Config:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "duty").write_text("duty-officer-secret-1\n")
    (tokens / "village").write_text("village-keeper-secret-2\n")
    for f in tokens.iterdir():
        f.chmod(0o600)
    village = next(iter(district.towns[OTHER_TOWN_ROOM].villages))
    operators = [
        OperatorConfig(room=TOWN_ROOM, name="杭埠镇值班", users=[ME]),  # this test's OS user: a town room
        OperatorConfig(room=district.code, name="区值班员", token_file=str(tokens / "duty")),
        OperatorConfig(room=village, name="村广播员", token_file=str(tokens / "village")),
    ]
    return _with(fast_config(shipped_config), operators=operators)


def _alert(target: str) -> dict[str, Any]:
    """A send request's alert, as `ebcd alert send --target TARGET` puts it on the socket."""
    return {
        "level": 2,
        "event_type": "11B03",
        "targets": [parse_target(target).model_dump(mode="json")],
        "text": "暴雨橙色预警",
    }


async def test_a_town_operator_alerts_its_own_town_only(
    mosquitto: Mosquitto, operator_config: Config, district: District, tmp_path: Path
) -> None:
    async with running_daemon(operator_config, district, mosquitto.url, tmp_path) as daemon:
        town = ControlClient(tmp_path / SOCKET_NAME)  # known by its OS user (SO_PEERCRED)
        duty = ControlClient(tmp_path / SOCKET_NAME, token="duty-officer-secret-1")

        refused = await town.request("send", alert=_alert("all"))
        assert (refused["ok"], refused["error"]) == (False, "not_allowed")
        assert "杭埠镇值班" in refused["message"]
        assert "own area" in refused["message"]
        assert not daemon.runner.alerts

        own = await town.request("send", alert=_alert(f"town:{TOWN_ROOM}"))
        assert own["ok"], own
        run = daemon.runner.alerts[own["id"]]
        assert (run.request.origin, run.request.origin_room) == (Origin.TOWN, TOWN_ROOM)  # a town broadcast
        assert len(run.deliveries) == len(list(district.towns[TOWN_ROOM].terminals()))

        district_wide = await duty.request("send", alert=_alert("all"))
        assert district_wide["ok"], district_wide
        assert daemon.runner.alerts[district_wide["id"]].request.origin is Origin.DISTRICT

        # the town room may not cancel the district's alert; the district may cancel the town's
        cancel = await town.request("cancel", id=district_wide["id"])
        assert (cancel["ok"], cancel["error"]) == (False, "not_allowed")
        assert (await duty.request("cancel", id=own["id"]))["ok"]

        audit = await daemon.journal.list_audit(20)
        refusals = [a for a in audit if a.action.endswith("refused")]
        assert [(a.actor, a.action) for a in refusals] == [(ME, "cancel refused"), (ME, "send refused")]
        assert refusals[1].detail["alert"]["targets"] == [
            {"kind": "all", "code": None}
        ]  # what was asked, with who asked
        assert all("token" not in a.detail for a in audit)  # a credential is never journalled
        assert any(a.actor == f"{ME} (token)" and a.action == "send" for a in audit)


async def test_a_village_operator_and_an_unknown_token(
    mosquitto: Mosquitto, operator_config: Config, district: District, tmp_path: Path
) -> None:
    village_code = next(iter(district.towns[OTHER_TOWN_ROOM].villages))
    async with running_daemon(operator_config, district, mosquitto.url, tmp_path) as daemon:
        keeper = ControlClient(tmp_path / SOCKET_NAME, token="village-keeper-secret-2")
        town = await keeper.request("send", alert=_alert(f"town:{OTHER_TOWN_ROOM}"))
        assert (town["ok"], town["error"]) == (False, "not_allowed")
        own = await keeper.request("send", alert=_alert(f"village:{village_code}"))
        assert own["ok"], own
        assert daemon.runner.alerts[own["id"]].request.origin is Origin.VILLAGE

        stranger = ControlClient(tmp_path / SOCKET_NAME, token="guessed")
        answer = await stranger.request("send", alert=_alert(f"village:{village_code}"))
        assert (answer["ok"], answer["error"]) == (False, "not_allowed")
        assert "token matches no [[operators]] entry" in answer["message"]
        # reading needs no authority beyond the socket's permissions
        assert (await stranger.request("list"))["ok"]
        assert len(daemon.runner.alerts) == 1


async def test_the_cli_presents_a_token_and_a_refusal_exits_2(
    mosquitto: Mosquitto, operator_config: Config, district: District, tmp_path: Path
) -> None:
    village_code = next(iter(district.towns[OTHER_TOWN_ROOM].villages))
    token_file = tmp_path / "my-token"
    token_file.write_text("village-keeper-secret-2\n")

    async def ebcd(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ebcd", *args, "--state-dir", str(tmp_path),
            env={**os.environ, "EBCD_TOKEN_FILE": str(token_file), "NO_COLOR": "1", "COLUMNS": "200"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    send = ("alert", "send", "--level", "3", "--event", "11B03", "--text", "暴雨黄色预警")
    async with running_daemon(operator_config, district, mosquitto.url, tmp_path) as daemon:
        code, out = await ebcd(*send, "--target", "all")
        assert code == 2, out
        assert "not_allowed" in out
        assert "村广播员" in out
        code, out = await ebcd(*send, "--target", f"village:{village_code}")
        assert code == 0, out
        (run,) = daemon.runner.alerts.values()
        assert run.actor == f"{ME} (token)"
        assert run.request.origin_room == village_code


def test_a_token_file_open_to_others_is_refused_at_start(
    shipped_config: Config, district: District, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)
    config = _with(shipped_config, operators=[OperatorConfig(room=district.code, token_file=str(token))])
    with pytest.raises(AuthorityError, match=r"\[\[operators\]\] #1 .*token_file.*open to others"):
        OperatorAuthority(config, district)
