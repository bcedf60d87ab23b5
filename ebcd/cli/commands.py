"""The `ebcd` command: the daemon, the simulators, the demo and the duty officer's tools."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ebcd.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
    parse_broker_url,
    shipped_config_path,
)
from ebcd.control.socket import SOCKET_NAME, ControlClient, NoDaemon

if TYPE_CHECKING:  # the ledger (numpy) and the journal reader load only for the commands that need them
    from ebcd.journal.reader import JournalReader
    from ebcd.tiers.district import District

EXIT_OK = 0
EXIT_REFUSED = 2
EXIT_PARTIAL = 3

app = typer.Typer(no_args_is_help=True, add_completion=False, help="ebcd: emergency broadcast control daemon")
alert_app = typer.Typer(no_args_is_help=True, help="Send and follow alerts through the running daemon.")
topology_app = typer.Typer(no_args_is_help=True, help="Check and show the district topology.")
frame_app = typer.Typer(no_args_is_help=True, help="Serial frames, for field engineers.")
app.add_typer(alert_app, name="alert")
app.add_typer(topology_app, name="topology")
app.add_typer(frame_app, name="frame")
keys_app = typer.Typer(no_args_is_help=True, help="Signing keys for commands to terminals.")
app.add_typer(keys_app, name="keys")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="config file (default: $EBCD_CONFIG, else /etc/ebcd/ebcd.toml, else the shipped district)",
    ),
]
DemoConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="config file (default: the shipped district)")
]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="mqtt://HOST:PORT, overrides the config")]
StateDirOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="journal and control socket (default: config)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON only")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="follow the alert live to its final state")]
RunDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--run-dir",
        help="folder of the simulated serial buses, {run_dir} in rooms.csv (default: the config's "
        "simulator.run_dir, else a temp folder named after the config file and the broker)",
    ),
]


def main() -> None:
    """Entry point of the console script."""
    app()


def _fail(message: str, code: int = EXIT_REFUSED) -> typer.Exit:
    typer.echo(f"ebcd: {message}", err=True)
    return typer.Exit(code)


def _config(path: Path | None) -> Config:
    try:
        return load_config(path or default_config_path())
    except ConfigError as e:
        for err in e.errors:
            typer.echo(f"{e.path}: {err}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None


def _setup_logging(level: str) -> None:
    from ebcd import log  # structlog's renderers: only the long-running commands log

    log.setup(level)


def _load(path: Path | None) -> tuple[Config, District]:
    from ebcd.tiers.loader import TopologyError, load_district

    config = _config(path)
    try:
        return config, load_district(config)
    except TopologyError as e:
        for err in e.errors:
            typer.echo(err, err=True)
        raise typer.Exit(EXIT_REFUSED) from None


def _state_dir(state_dir: Path | None, config_path: Path | None) -> Path:
    if state_dir is not None:
        return state_dir
    return Path(_config(config_path).daemon.state_dir)


def _client(state_dir: Path | None, config_path: Path | None) -> ControlClient:
    return ControlClient(_state_dir(state_dir, config_path) / SOCKET_NAME, token=_operator_token())


def _operator_token() -> str | None:
    """The operator credential named by EBCD_TOKEN_FILE, if set (see [[operators]] token_file)."""
    name = os.environ.get("EBCD_TOKEN_FILE")
    if not name:
        return None
    try:
        return Path(name).read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError) as e:
        raise _fail(f"EBCD_TOKEN_FILE={name}: cannot read an operator token: {e}") from None


def _ask(client: ControlClient, op: str, **args: Any) -> dict[str, Any]:
    try:
        answer = asyncio.run(client.request(op, **args))
    except NoDaemon as e:
        raise _fail(str(e)) from None
    if not answer.get("ok"):
        raise _fail(f"{answer.get('message')} [{answer.get('error')}]")
    return answer


def _serial_run_dir(
    cfg: Config, district: District, config_path: Path | None, broker: str | None, run_dir: Path | None
) -> Path | None:
    """Expand `{run_dir}` in the serial rooms' ports, in place; the folder used, None if none names it.

    `ebcd run` and `ebcd simulate` both call this, so started apart with the same config file and
    broker they meet at the same buses (ebcd.protocols.serial.ports).
    """
    from ebcd.protocols.serial.ports import default_run_dir, expand_port, uses_run_dir

    rooms = [v for v in district.villages() if uses_run_dir(v.port)]
    if not rooms:
        return None
    if run_dir is None and cfg.simulator.run_dir is not None:
        run_dir = cfg.base_dir / cfg.simulator.run_dir
    if run_dir is None:
        try:
            host, port, tls = parse_broker_url(broker or cfg.mqtt.broker)
        except ValueError as e:
            raise _fail(str(e)) from None
        normalized = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        run_dir = default_run_dir(config_path or default_config_path(), normalized)
    run_dir = run_dir.absolute()
    for village in rooms:
        village.port = expand_port(village.port or "", run_dir)
    return run_dir


def _adapter_run_dir(cfg: Config, run_dir: Path | None) -> Config:
    """The config with `{run_dir}` expanded in `[adapter] listen` (ebcd.protocols.adapter.address)."""
    from ebcd.protocols.serial.ports import expand_port, uses_run_dir

    listen = cfg.adapter.listen
    if run_dir is None or not uses_run_dir(listen):
        return cfg
    adapter = cfg.adapter.model_copy(update={"listen": expand_port(listen or "", run_dir)})
    return cfg.model_copy(update={"adapter": adapter})


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


# -- daemon, simulators, demo ----------------------------------------------------------------
@app.command()
def run(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    state_dir: StateDirOpt = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="0 picks a free port; -1 turns metrics off")
    ] = None,
    no_journal: Annotated[
        bool, typer.Option("--no-journal", help="keep nothing on disk (benchmarks only)")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    mqtt_protocol: Annotated[
        str | None, typer.Option(help="auto, 5 or 3.1.1 (over the config's mqtt.protocol)")
    ] = None,
    run_dir: RunDirOpt = None,
    web_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT of the wall screen's page (over the config's [web] listen)")
    ] = None,
) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    import structlog

    from ebcd.daemon.service import run_daemon

    _setup_logging(log_level)
    cfg, district = _load(config)
    buses = _serial_run_dir(cfg, district, config, broker, run_dir)
    if buses is not None:
        structlog.get_logger("ebcd.cli").info("serial.run_dir", run_dir=str(buses))
    cfg = _adapter_run_dir(cfg, buses)
    if mqtt_protocol is not None:
        if mqtt_protocol not in ("auto", "5", "3.1.1"):
            raise typer.BadParameter("expected auto, 5 or 3.1.1", param_hint="--mqtt-protocol")
        cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"protocol": mqtt_protocol})})
    if web_listen is not None:
        cfg = cfg.model_copy(update={"web": cfg.web.model_copy(update={"listen": web_listen})})
    raise typer.Exit(
        run_daemon(
            cfg,
            district,
            broker=broker,
            state_dir=state_dir,
            metrics_port=metrics_port,
            journal=not no_journal,
        )
    )


@app.command()
def simulate(
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    only: Annotated[
        list[str] | None, typer.Option(help="town:CODE, village:CODE or terminal:CODE (repeatable)")
    ] = None,
    faults: Annotated[
        str, typer.Option(help="e.g. offline=5%,slow=2%,refuse=1%,lose_acks=3%,flap=10%")
    ] = "none",
    seed: Annotated[int, typer.Option(help="which terminals get the faults")] = 0,
    play_time: Annotated[float | None, typer.Option(help="seconds a broadcast plays")] = None,
    faults_report: Annotated[
        Path | None, typer.Option(help="write the chosen faulty terminals as JSON")
    ] = None,
    bus_faults: Annotated[
        str, typer.Option(help="serial buses: e.g. corrupt=10%,loss=5%,echo,garbage=2%,dead=CODE")
    ] = "",
    adapter_faults: Annotated[
        str,
        typer.Option(help="adapters: refuse=CODE|all,silence=…,drop=…,fault=…,corrupt=10%,slow=SECONDS"),
    ] = "",
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    run_dir: RunDirOpt = None,
    processes: Annotated[
        int, typer.Option(min=1, help="spread the MQTT terminals over this many processes")
    ] = 1,
    share: Annotated[str | None, typer.Option(hidden=True, help="I/N: this process's share")] = None,
    source_address: Annotated[
        str,
        typer.Option(
            help="local address(es) the terminals connect from, comma-separated, taken in turn: each "
            "has its own ~28,000 ephemeral ports (past that on one host, e.g. 127.0.0.2,127.0.0.3)"
        ),
    ] = "",
) -> None:
    """Simulate every terminal of the topology, speaking the real wire protocols."""
    import structlog

    from ebcd.security.signing import SecurityError
    from simulators.runner import BusDirError, parse_share, run_simulators

    _setup_logging(log_level)
    cfg, district = _load(config)
    buses = _serial_run_dir(cfg, district, config, broker, run_dir)
    if buses is not None:
        structlog.get_logger("ebcd.cli").info("serial.run_dir", run_dir=str(buses))
    if processes > 1 and share is None:
        from simulators.processes import run_processes

        child = [sys.executable, "-m", "ebcd", "simulate", "--faults", faults, "--seed", str(seed)]
        child += ["--bus-faults", bus_faults, "--adapter-faults", adapter_faults, "--log-level", log_level]
        child += ["--source-address", source_address]
        for flag, value in (("--config", config), ("--broker", broker), ("--run-dir", buses),
                            ("--play-time", play_time)):  # fmt: skip
            if value is not None:
                child += [flag, str(value)]
        for target in only or []:
            child += ["--only", target]
        report = ["--faults-report", str(faults_report)] if faults_report is not None else []
        shares = [
            [*child, *(report if i == 0 else []), "--share", f"{i}/{processes}"] for i in range(processes)
        ]
        raise typer.Exit(run_processes(shares))
    cfg = _adapter_run_dir(cfg, buses)
    try:
        parsed_share = parse_share(share) if share is not None else None
        code = run_simulators(
            cfg,
            district,
            broker=broker,
            only=only or [],
            faults=faults,
            seed=seed,
            play_time_s=play_time,
            faults_report=faults_report,
            bus_faults=bus_faults,
            adapter_faults=adapter_faults,
            share=parsed_share,
            source_addresses=_source_addresses(source_address),
        )
    except (ValueError, SecurityError, BusDirError) as e:  # SecurityError: key, password, CA, cert files
        raise _fail(str(e)) from None
    raise typer.Exit(code)


def _source_addresses(option: str) -> list[str]:
    """`--source-address A,B`: the addresses, each checked (ValueError naming the one that is not)."""
    import ipaddress

    addresses = [a.strip() for a in option.split(",") if a.strip()]
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"--source-address: {address!r} is not an IP address") from None
    return addresses


@app.command("simulate-upstream")
def simulate_upstream(
    listen: Annotated[str, typer.Option(help="HOST:PORT where the city takes ebcd's packages")],
    to: Annotated[str, typer.Option(help="ebcd's EBD address (its listen), e.g. http://127.0.0.1:8181/ebd")],
    config: ConfigOpt = None,
    send: Annotated[
        bool, typer.Option("--send", help="send an EBM (see --level, --event, --area, --text)")
    ] = False,
    level: Annotated[int, typer.Option(help="Severity 1..4")] = 2,
    event: Annotated[str, typer.Option(help="EventType, 5 characters")] = "11B03",
    area: Annotated[
        list[str] | None, typer.Option(help="12-digit AreaCode (repeatable); default: the district")
    ] = None,
    title: Annotated[str, typer.Option(help="MsgTitle")] = "暴雨橙色预警",
    text: Annotated[str, typer.Option(help="MsgDesc")] = "请注意防范，远离危险区域。",
    drill: Annotated[bool, typer.Option(help="MsgType 3 (a drill) instead of 1 (live)")] = False,
    minutes: Annotated[float, typer.Option(help="EndTime this long after StartTime")] = 30.0,
    cancel: Annotated[str | None, typer.Option(help="cancel this EBMID (MsgType 2)")] = None,
    seconds: Annotated[
        float | None,
        typer.Option(
            "--for", help="stop after this long (default: after the log of what was sent, or never)"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "warning",
) -> None:
    """A simulated city platform: sends EBMs to ebcd over EBD, prints what ebcd reports up."""
    from ebcd.security.signing import SecurityError
    from simulators.city_platform import BENCH_CITY_CODE, CityPlatform, bench_city_signer, ebcd_keys, run_city

    _setup_logging(log_level)
    cfg, district = _load(config)
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise _fail(f"--listen {listen!r}: expected HOST:PORT")
    try:
        keys = ebcd_keys(cfg)
    except (ValueError, SecurityError) as e:
        raise _fail(f"ebcd's public key ([security] public_key): {e}") from None
    city = CityPlatform(
        code=cfg.ebd.upstream_code or BENCH_CITY_CODE,
        signer=bench_city_signer(),
        district_code=district.code,
        ebcd_keys=keys,
        to_url=to,
        timezone=cfg.ebd.timezone,
    )
    ebm = None
    if send:
        ebm = city.ebm(
            areas=area or [district.area],
            level=level,
            event=event,
            title=title,
            desc=text,
            msg_type=3 if drill else 1,
            minutes=minutes,
        )
    try:
        code = asyncio.run(
            run_city(city, listen=(host, int(port)), send=ebm, cancel=cancel, seconds=seconds, say=print)
        )
    except KeyboardInterrupt:
        code = 0
    except OSError as e:
        raise _fail(f"simulate-upstream: {e}") from None
    raise typer.Exit(code)


@app.command()
def demo(
    broker: BrokerOpt = None,
    faults: Annotated[str, typer.Option(help="fault profile for the simulated terminals")] = "none",
    state_dir: StateDirOpt = None,
    config: DemoConfigOpt = None,
    embedded_broker: Annotated[
        bool,
        typer.Option(
            "--embedded-broker", help="the pure-Python broker (amqtt) even where Mosquitto is installed"
        ),
    ] = False,
) -> None:
    """Zero set-up: broker, daemon, 769 simulated terminals, a district-wide test alert, coverage.

    Without --broker it starts its own broker: Mosquitto when installed, else amqtt."""
    from ebcd.cli.demo import run_demo

    raise typer.Exit(
        run_demo(
            config_path=config or shipped_config_path(),
            broker=broker,
            faults=faults,
            state_dir=state_dir,
            embedded=embedded_broker,
        )
    )


# -- alerts ------------------------------------------------------------------------------------
@alert_app.command("send")
def alert_send(
    level: Annotated[int, typer.Option(help="1 red, 2 orange, 3 yellow, 4 blue")],
    event: Annotated[str, typer.Option(help="5-character event type, e.g. 11B03")],
    target: Annotated[
        list[str], typer.Option(help="all | town:CODE | village:CODE | terminal:CODE (repeatable)")
    ],
    text: Annotated[str, typer.Option(help="what the loudspeakers say")],
    test: Annotated[bool, typer.Option("--test", help="a test broadcast")] = False,
    ttl: Annotated[float | None, typer.Option(help="time to live, seconds")] = None,
    volume: Annotated[
        int | None, typer.Option(help="0 mute, 1-100 %, 255 leaves the terminal's volume as it is")
    ] = None,
    origin: Annotated[
        str | None, typer.Option(help="town:CODE or village:CODE when a room broadcasts to its own area")
    ] = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Send an alert; print its id (with --wait, follow it and print the coverage)."""
    from ebcd.cli.render import follow
    from ebcd.model.alert import AlertRequest

    try:
        targets = [_target_option(t) for t in target]
        if volume is not None and not _volume_ok(volume):
            raise ValueError(f"--volume {volume}: expected 0 (mute), 1-100 (%) or 255 (leave it as it is)")
        req: dict[str, Any] = {
            "level": level,
            "event_type": event,
            "targets": targets,
            "text": text,
            "test": test,
        }
        if ttl is not None:
            req["ttl_s"] = ttl
        if volume is not None:
            req["volume"] = volume
        if origin is not None:
            tier, _, room = origin.partition(":")
            req["origin"], req["origin_room"] = tier, room
        request = AlertRequest.model_validate(req)
    except ValueError as e:
        raise _fail(f"refused: {_one_line(e)}") from None
    client = _client(state_dir, config)
    answer = _ask(client, "send", alert=request.model_dump(mode="json"))
    if not wait:
        if as_json:
            _print_json(answer["state"])
        else:
            typer.echo(answer["id"])
        raise typer.Exit(EXIT_OK)
    final = follow(client, answer["id"], answer["state"], quiet=as_json)
    if as_json:
        _print_json(final)
    raise typer.Exit(EXIT_OK if final["state"] == "completed" else EXIT_PARTIAL)


@alert_app.command("watch")
def alert_watch(
    alert_id: str, as_json: JsonOpt = False, state_dir: StateDirOpt = None, config: ConfigOpt = None
) -> None:
    """Follow any alert live to its final state (exit 0 completed, 3 partial or ended otherwise)."""
    from ebcd.cli.render import follow, print_state

    client = _client(state_dir, config)
    answer = _ask_or_journal(client, "status", id=alert_id)
    if isinstance(answer, _Fallback):  # nothing to follow: the daemon is down or no longer holds it
        with _open_journal(state_dir, config, answer, _district_or_none(config)) as reader:
            final = reader.alert_state(alert_id)
            if final is None:
                raise _not_in_journal(alert_id, reader.path)
        if as_json:
            _print_json(final)
        else:
            print_state(final)
    else:
        final = follow(client, alert_id, answer["state"], quiet=as_json)
        if as_json:
            _print_json(final)
    raise typer.Exit(EXIT_OK if final["state"] == "completed" else EXIT_PARTIAL)


# The option of `alert send` behind each field of the alert request, for error messages.
_SEND_OPTIONS = {
    "level": "--level",
    "event_type": "--event",
    "targets": "--target",
    "text": "--text",
    "test": "--test",
    "ttl_s": "--ttl",
    "volume": "--volume",
    "origin": "--origin",
    "origin_room": "--origin",
}
EBRID_DIGITS = 23  # a resource code
AREA_DIGITS = 12  # an administrative area code


def _one_line(e: Exception) -> str:
    """A validation error as one line naming the option at fault (`--ttl`), not the field."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            loc = [str(x) for x in err["loc"]]
            where = _SEND_OPTIONS.get(loc[0], ".".join(loc)) if loc else "alert"
            if loc and loc[0] == "targets" and len(loc) > 1:
                where = f"--target #{int(loc[1]) + 1}" if loc[1].isdigit() else where
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
        return "; ".join(parts)
    return str(e)


def _volume_ok(volume: int) -> bool:
    """The volume byte of the field: 0 mute, 1-100 %, 255 unchanged (DOMAIN.md)."""
    return volume in (0, 0xFF) or 1 <= volume <= 100


def _target_option(text: str) -> Any:
    """One `--target`, parsed, with a code of the wrong length refused saying the length it needs."""
    from ebcd.model.alert import parse_target

    try:
        target = parse_target(text)
    except ValueError as e:
        why = _one_line(e).removeprefix(f"target {text.strip()!r}: ").removeprefix("alert: ")
        raise ValueError(f"--target {text}: {why}") from None
    code = target.code
    if code is None:
        return target
    if not code.isdigit():
        raise ValueError(f"--target {text}: a code is digits only, got {code!r}")
    if target.kind == "terminal":
        if len(code) != EBRID_DIGITS:
            raise ValueError(
                f"--target {text}: a terminal code is a {EBRID_DIGITS}-digit resource code, "
                f"got {len(code)} digits"
            )
    elif len(code) not in (EBRID_DIGITS, AREA_DIGITS):
        raise ValueError(
            f"--target {text}: a {target.kind} code is a {EBRID_DIGITS}-digit resource code "
            f"or a {AREA_DIGITS}-digit area code, got {len(code)} digits"
        )
    return target


@alert_app.command("status")
def alert_status(
    alert_id: str, as_json: JsonOpt = False, state_dir: StateDirOpt = None, config: ConfigOpt = None
) -> None:
    """Show an alert's state (from the journal when the daemon is down or no longer holds it)."""
    from ebcd.cli.render import print_state

    answer = _ask_or_journal(_client(state_dir, config), "status", id=alert_id)
    if isinstance(answer, _Fallback):
        with _open_journal(state_dir, config, answer, _district_or_none(config)) as reader:
            state = reader.alert_state(alert_id)
            if state is None:
                raise _not_in_journal(alert_id, reader.path)
    else:
        state = answer["state"]
    if as_json:
        _print_json(state)
    else:
        print_state(state)


@alert_app.command("list")
def alert_list(as_json: JsonOpt = False, state_dir: StateDirOpt = None, config: ConfigOpt = None) -> None:
    """List every alert, newest first: the daemon's, and those only its journal still holds."""
    from ebcd.cli.render import print_alerts

    answer = _ask_or_journal(_client(state_dir, config), "list")
    if isinstance(answer, _Fallback):
        with _open_journal(state_dir, config, answer, _district_or_none(config)) as reader:
            alerts = reader.list_alerts()
    else:
        alerts = _with_history(answer["alerts"], state_dir, config)
    alerts.sort(key=lambda a: (a.get("accepted_at") or 0.0, a.get("id") or ""), reverse=True)
    if as_json:
        _print_json(alerts)
    else:
        print_alerts(alerts)


# -- history: the journal answers when the daemon is down or no longer holds an alert -------------
@dataclass(frozen=True, slots=True)
class _Fallback:
    """Why the journal answers instead of the daemon."""

    why: str  # the daemon's side, for an error message: why it could not be asked, or what it said
    note: str  # how the note on stderr starts


def _ask_or_journal(client: ControlClient, op: str, **args: Any) -> dict[str, Any] | _Fallback:
    """The daemon's answer; a _Fallback when it is not there, or (an `id` op) does not hold the alert."""
    try:
        answer = asyncio.run(client.request(op, **args))
    except NoDaemon as e:
        down = isinstance(e.__context__, FileNotFoundError | ConnectionRefusedError)
        return _Fallback(str(e), "ebcd is not running" if down else f"ebcd: {e}")
    if not answer.get("ok"):
        if answer.get("error") == "unknown_alert" and "id" in args:
            why = f"{answer.get('message')} [unknown_alert]"
            return _Fallback(why, f"ebcd: the daemon does not hold alert {args['id']}")
        raise _fail(f"{answer.get('message')} [{answer.get('error')}]")
    return answer


def _open_journal(
    state_dir: Path | None, config: Path | None, fallback: _Fallback, district: District | None
) -> JournalReader:
    """The daemon's journal, read-only, with the note on stderr that it answers; exit 2 if unreadable."""
    from ebcd.journal.reader import JournalReader, JournalUnavailable, journal_path

    path = journal_path(_state_dir(state_dir, config))
    try:
        reader = JournalReader(path, district)
    except JournalUnavailable as e:
        raise _fail(f"{fallback.why}; and {e}") from None
    typer.echo(f"{fallback.note}: read from the journal {path} (read-only)", err=True)
    return reader


def _not_in_journal(alert_id: str, path: Path) -> typer.Exit:
    return _fail(f"no alert with id {alert_id!r} in the journal {path} (ebcd alert list shows them)")


def _district_or_none(config: Path | None) -> District | None:
    """The topology for tallies the journal lacks, or None (and nothing said) if it does not load."""
    from ebcd.tiers.loader import TopologyError, load_district

    try:
        return load_district(load_config(config or default_config_path()))
    except (ConfigError, TopologyError):
        return None


def _with_history(
    alerts: list[dict[str, Any]], state_dir: Path | None, config: Path | None
) -> list[dict[str, Any]]:
    """The daemon's alerts and those only its journal holds (none if the daemon runs without one)."""
    from ebcd.journal.reader import JournalReader, JournalUnavailable, journal_path

    path = journal_path(_state_dir(state_dir, config))
    if not path.exists():  # a daemon run --no-journal
        return alerts
    held = {a.get("id") for a in alerts}
    try:
        with JournalReader(path, _district_or_none(config)) as reader:
            older = [a for a in reader.list_alerts() if a["id"] not in held]
    except JournalUnavailable as e:
        typer.echo(f"ebcd: {e}: only the daemon's alerts are listed", err=True)
        return alerts
    if older:
        typer.echo(
            f"ebcd: {len(older)} alert(s) the daemon does not hold: read from the journal {path} (read-only)",
            err=True,
        )
    return alerts + older


@alert_app.command("cancel")
def alert_cancel(
    alert_id: str, as_json: JsonOpt = False, state_dir: StateDirOpt = None, config: ConfigOpt = None
) -> None:
    """Cancel an alert: every terminal that has it stops."""
    state = _ask(_client(state_dir, config), "cancel", id=alert_id)["state"]
    if as_json:
        _print_json(state)
    else:
        typer.echo(f"{alert_id} {state['state']}")


@alert_app.command("resend")
def alert_resend(
    alert_id: str,
    only: Annotated[
        str | None,
        typer.Option(help="which terminals: uncertain, failed, refused (comma separated; default all three)"),
    ] = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A new attempt of the same revision to the terminals that did not acknowledge (never to one
    that played it); refused for an alert past its time to live or cancelled."""
    from ebcd.cli.render import follow
    from ebcd.control.requests import RESEND_ONLY

    kinds: list[str] = list(RESEND_ONLY)
    if only is not None:
        kinds = [k.strip() for k in only.split(",") if k.strip()]
        wrong = [k for k in kinds if k not in RESEND_ONLY]
        if wrong or not kinds:
            raise _fail(f"--only {only}: expected some of {', '.join(RESEND_ONLY)}, comma separated")
    client = _client(state_dir, config)
    answer = _ask(client, "resend", id=alert_id, only=kinds)
    state, resent = answer["state"], answer["resent"]
    if not wait:
        if as_json:
            _print_json({"state": state, "resent": resent})
        else:
            typer.echo(
                f"{alert_id} resent to {len(resent)} terminal(s) ({', '.join(kinds)}): {state['state']}"
            )
        raise typer.Exit(EXIT_OK)
    typer.echo(f"{alert_id} resent to {len(resent)} terminal(s) ({', '.join(kinds)})", err=True)
    final = follow(client, alert_id, state, quiet=as_json)
    if as_json:
        _print_json({"state": final, "resent": resent})
    raise typer.Exit(EXIT_OK if final["state"] == "completed" else EXIT_PARTIAL)


@alert_app.command("approve")
def alert_approve(
    alert_id: str, as_json: JsonOpt = False, state_dir: StateDirOpt = None, config: ConfigOpt = None
) -> None:
    """Release an alert that waits for manual review."""
    state = _ask(_client(state_dir, config), "approve", id=alert_id)["state"]
    if as_json:
        _print_json(state)
    else:
        typer.echo(f"{alert_id} {state['state']}")


@alert_app.command("reject")
def alert_reject(
    alert_id: str, as_json: JsonOpt = False, state_dir: StateDirOpt = None, config: ConfigOpt = None
) -> None:
    """Reject an alert that waits for manual review: it is never broadcast."""
    state = _ask(_client(state_dir, config), "reject", id=alert_id)["state"]
    if as_json:
        _print_json(state)
    else:
        typer.echo(f"{alert_id} {state['state']}")


@app.command()
def report(
    alert_id: str,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="per-village rows as CSV")] = False,
    map_file: Annotated[
        Path | None,
        typer.Option("--map", help="also draw the district with each terminal's state (.svg/.png)"),
    ] = None,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Coverage of an alert per town and village, the terminals that failed and why, their attempts."""
    if map_file is not None:
        _check_map(map_file)
    answer = _ask_or_journal(_client(state_dir, config), "report", id=alert_id)
    if isinstance(answer, _Fallback):
        _, district = _load(config)
        with _open_journal(state_dir, config, answer, district) as reader:
            found = reader.report(alert_id)
            if found is None:
                raise _not_in_journal(alert_id, reader.path)
        answer = found
    answer.pop("ok", None)
    _print_report(answer, as_json=as_json, as_csv=as_csv)
    if map_file is not None:
        from ebcd.cli.map import ALERT_STATES, alert_states, alert_title

        _, district = _load(config)
        _draw(district, alert_states(district, answer), ALERT_STATES, alert_title(answer), map_file)


def _check_map(path: Path) -> None:
    from ebcd.cli.map import MapError, check_path

    try:
        check_path(path)
    except MapError as e:
        raise _fail(str(e)) from None


def _draw(district: District, states: dict[str, str], palette: Any, title: str, path: Path) -> None:
    """Draw a map; say on stderr where it went and what it shows."""
    from ebcd.cli.map import MapError, draw

    try:
        counts = draw(district, states, palette, title, path)
    except (MapError, OSError) as e:
        raise _fail(f"--map {path}: {e}") from None
    shown = ", ".join(f"{n} {palette[s][1]}" for s, n in counts.items() if n)
    typer.echo(f"map {path}: {shown}", err=True)


def _print_report(answer: dict[str, Any], *, as_json: bool, as_csv: bool) -> None:
    from ebcd.cli.render import print_report

    if as_json:
        _print_json(answer)
    elif as_csv:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(
            ["town", "village", "name", "targets", "acked", "failed", "uncertain", "pending", "coverage"]
        )
        for town in answer["towns"]:
            for v in town["villages"]:
                w.writerow(
                    [
                        town["code"],
                        v["code"],
                        v["name"],
                        v["targets"],
                        v["acked"],
                        v["failed"],
                        v["uncertain"],
                        v["pending"],
                        v["coverage"],
                    ]
                )
        sys.stdout.write(out.getvalue())
    else:
        print_report(answer)


@app.command()
def terminals(
    state: Annotated[str | None, typer.Option(help="unknown, online or offline")] = None,
    town: Annotated[str | None, typer.Option(help="a town's resource code or area code")] = None,
    as_json: JsonOpt = False,
    map_file: Annotated[
        Path | None, typer.Option("--map", help="also draw them on the district's map (.svg/.png)")
    ] = None,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Terminals with their liveness state and when they were last heard."""
    from ebcd.cli.render import print_terminals
    from ebcd.delivery.liveness import Live

    states = [s.value for s in Live]
    if state is not None and state not in states:
        raise _fail(f"--state {state}: not a terminal state; expected one of {', '.join(states)}")
    town_code = None
    if town is not None:
        _, district = _load(config)
        found = district.town(town)
        if found is None:
            valid = ", ".join(f"{t.code} / {t.area} ({t.name})" for t in district.towns.values())
            raise _fail(f"--town {town}: no such town; expected a resource or area code of {valid}")
        town_code = found.code
    rows = _ask(_client(state_dir, config), "terminals")["terminals"]
    if state:
        rows = [r for r in rows if r["state"] == state]
    if town_code is not None:
        rows = [r for r in rows if r["town"] == town_code]
    if map_file is not None:
        _check_map(map_file)
    if as_json:
        _print_json(rows)
    else:
        print_terminals(rows)
    if map_file is not None:
        from ebcd.cli.map import LIVENESS_STATES

        _, district = _load(config)
        counts = {s: sum(1 for r in rows if r["state"] == s) for s in LIVENESS_STATES}
        title = "terminals: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        _draw(district, {r["code"]: r["state"] for r in rows}, LIVENESS_STATES, title, map_file)


@app.command()
def top(state_dir: StateDirOpt = None, config: ConfigOpt = None) -> None:
    """The duty room, full screen and live: alerts, coverage per town, links down, refusals (q quits)."""
    from ebcd.cli.top import run_top

    raise typer.Exit(run_top(_client(state_dir, config)))


# -- topology and frames -----------------------------------------------------------------------
@topology_app.command("check")
def topology_check(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Validate a config and its ledgers; print counts per tier, or every error with its place."""
    cfg, district = _load(config)
    counts = {
        "district": 1,
        "towns": len(district.towns),
        "villages": sum(len(t.villages) for t in district.towns.values()),
        "terminals": len(district),
        "serial_rooms": sum(1 for v in district.villages() if v.link == "serial"),
        "adapter_rooms": sum(1 for v in district.villages() if v.link == "adapter"),
    }
    if as_json:
        _print_json(counts)
        return
    typer.echo(f"{cfg.district.name} ({district.code}): valid")
    typer.echo(f"  district platforms {counts['district']}")
    typer.echo(f"  towns              {counts['towns']}")
    typer.echo(
        f"  villages           {counts['villages']}  ({counts['serial_rooms']} on serial links, "
        f"{counts['adapter_rooms']} through adapters)"
    )
    typer.echo(f"  terminals          {counts['terminals']}")


@topology_app.command("generate")
def topology_generate(
    towns: Annotated[int, typer.Option(help="towns (1-900)")],
    villages_per_town: Annotated[int, typer.Option(help="villages in each town (0-999)")],
    terminals_per_village: Annotated[int, typer.Option(help="terminals in each village (0-99)")],
    out: Annotated[Path, typer.Option(help="folder for ebcd.toml, rooms.csv and terminals.csv")],
    terminals_per_town: Annotated[int, typer.Option(help="each town's own terminals (0-99)")] = 0,
) -> None:
    """Write a config and its ledgers for a district of any size, all on MQTT, by the shipped rules."""
    from ebcd.tiers.generate import ShapeError, generate

    try:
        ledgers = generate(
            out,
            towns,
            villages_per_town,
            terminals_per_village,
            terminals_per_town=terminals_per_town,
            config_template=shipped_config_path(),
        )
    except ShapeError as e:
        raise _fail(f"topology generate: {e}") from None
    except OSError as e:
        raise _fail(f"topology generate: cannot write {out}: {e.strerror or e}") from None
    typer.echo(
        f"{out / 'ebcd.toml'}: {towns} towns, {len(ledgers.rooms) - towns} villages, "
        f"{len(ledgers.terminals)} terminals"
    )


@topology_app.command("show")
def topology_show(config: ConfigOpt = None) -> None:
    """The tree of towns and villages with terminal counts."""
    from ebcd.cli.render import print_topology

    _, district = _load(config)
    print_topology(district)


@frame_app.command("decode")
def frame_decode(
    hex_bytes: Annotated[str, typer.Argument(metavar="HEX", help="bytes as hex, spaces allowed")],
) -> None:
    """Decode a captured serial frame (FE FD) or adapter frame (49/50): fields, codes, CRC verdict."""
    from ebcd.protocols.adapter import describe as adapter
    from ebcd.protocols.serial import frame

    if adapter.is_adapter_hex(hex_bytes):
        desc = adapter.describe_hex(hex_bytes)
        lines = adapter.render(desc)
    else:
        desc = frame.describe_hex(hex_bytes)
        lines = frame.render_description(desc)
    for line in lines:
        typer.echo(line)
    ok = desc.valid
    raise typer.Exit(EXIT_OK if ok else EXIT_REFUSED)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="folder for the key pair (created 0700)")],
    scheme: Annotated[str, typer.Option(help="ed25519 (fast) or sm2 (the field's scheme)")] = "ed25519",
    serial: Annotated[str, typer.Option(help="the key's certificate serial, up to 12 digits")] = "1",
) -> None:
    """Make a key pair: the private key (0600) for [security] private_key, the public one for terminals."""
    from ebcd.security.signing import SecurityError, generate_keypair

    try:
        private, public = generate_keypair(out, scheme, serial)
    except (SecurityError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"private key {private}  (ebcd.toml [security] private_key; keep it 0600, owned by ebcd)")
    typer.echo(f"public key  {public}  (terminals, and [security] public_key for the simulators)")


@keys_app.command("generate-terminals")
def keys_generate_terminals(
    out: Annotated[
        Path, typer.Option(help="folder for the keys: OUT/public/<code>.pub, OUT/private/<code>.key")
    ],
    scheme: Annotated[
        str, typer.Option(help="ed25519 (default: ~0.06 ms a signature) or sm2 (pure Python, 8-18 ms)")
    ] = "ed25519",
    serial: Annotated[str, typer.Option(help="the keys' serial, up to 12 digits (one per batch)")] = "1",
    config: ConfigOpt = None,
) -> None:
    """A key pair per MQTT terminal of the ledger, with which it signs its reports and presence."""
    from ebcd.security.reports import generate_terminal_keys
    from ebcd.security.signing import SecurityError

    _, district = _load(config)
    codes = [t.code for t in district.terminals() if t.link == "mqtt"]
    try:
        public, private = generate_terminal_keys(out, codes, scheme, serial)
    except (SecurityError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"{len(codes)} terminal key pairs ({scheme}, serial {serial})")
    typer.echo(f"public keys  {public}  ([security] terminal_keys_dir: ebcd believes only what they sign)")
    typer.echo(f"private keys {private}  ([simulator] terminal_keys_dir; 0600: each terminal keeps its own)")


# -- the journal -------------------------------------------------------------------------------
journal_app = typer.Typer(no_args_is_help=True, help="The daemon's journal, read-only.")
app.add_typer(journal_app, name="journal")


@journal_app.command("stats")
def journal_stats(state_dir: StateDirOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Size, rows and raw payloads of the journal, and the retention settings (read-only)."""
    from ebcd.journal.reader import JournalReader, JournalUnavailable, journal_path

    cfg = _config(config)
    path = journal_path(state_dir if state_dir is not None else Path(cfg.daemon.state_dir))
    try:
        with JournalReader(path) as reader:
            stats = reader.stats()
    except JournalUnavailable as e:
        raise _fail(str(e)) from None
    doc = stats.as_dict() | {"retention": cfg.journal.model_dump(mode="json", exclude={"group_commit_ms"})}
    if as_json:
        _print_json(doc)
        return
    rows, received, retention = doc["rows"], doc["received"], cfg.journal
    typer.echo(f"journal         {path}")
    typer.echo(f"  database      {_bytes(stats.db_bytes)}, {_bytes(stats.free_bytes)} of it free for reuse")
    typer.echo(f"  wal           {_bytes(stats.wal_bytes)}")
    typer.echo(f"schema version  {stats.schema_version}")
    typer.echo("rows")
    typer.echo(
        f"  received      {rows['received']:>9}  ({received['unjudged']} without a verdict,"
        f" {received['pruned']} with the payload pruned)"
    )
    typer.echo(
        f"  alerts        {rows['alerts']:>9}  ({rows['alerts_final']} final, {rows['alerts_active']} active)"
    )
    for table in ("deliveries", "transitions", "dedupe", "audit"):
        typer.echo(f"  {table:<13} {rows[table]:>9}")
    typer.echo(f"raw payloads    {_bytes(stats.payload_bytes)}")
    span = "none"
    if stats.oldest_received_at is not None and stats.newest_received_at is not None:
        span = f"{_when(stats.oldest_received_at)} … {_when(stats.newest_received_at)}"
    typer.echo(f"received at     {span}")
    alerts_kept = (
        "kept forever"
        if retention.alert_retention_days is None
        else f"kept {retention.alert_retention_days:g} days"
    )
    typer.echo(
        f"retention       raw payloads kept {retention.raw_retention_days:g} days,"
        f" ended alerts {alerts_kept}, every {retention.retention_interval_s:g} s"
    )


def _bytes(n: int) -> str:
    """13631488 -> "13.0 MiB (13631488 B)"."""
    power = min(3, max(0, n.bit_length() - 1) // 10)  # of 1024
    return f"{n} B" if power == 0 else f"{n / 1024**power:.1f} {('KiB', 'MiB', 'GiB')[power - 1]} ({n} B)"


def _when(at: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")
