"""The daemon's configuration: `config/ebcd.toml`, validated with pydantic.

The topology itself (rooms and terminals) lives in CSV ledgers beside the TOML file, named by
`[topology]`; `ebcd.tiers.loader` reads and checks them.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ebcd.admission.schedule import TestBroadcastConfig
from ebcd.model.codes import CodeError, ResourceCode, check_area_code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistrictConfig(_Strict):
    """The district platform itself."""

    code: str
    name: str
    area: str
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)

    @field_validator("code")
    @classmethod
    def _ebrid(cls, v: str) -> str:
        ResourceCode.parse(v)
        return v

    @field_validator("area")
    @classmethod
    def _area(cls, v: str) -> str:
        return check_area_code(v)


class TopologyConfig(_Strict):
    """Where the room and terminal ledgers are, relative to the config file."""

    rooms: str = "rooms.csv"
    terminals: str = "terminals.csv"


class MqttConfig(_Strict):
    """The broker ebcd and its IP/4G terminals share."""

    broker: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None
    username: str | None = None
    password_file: str | None = None  # its first line is the password; not readable by others
    # mqtts:// only (ebcd.security.mqtt_auth); paths relative to the config file's directory
    ca_file: str | None = None  # PEM CA certificate(s) to trust instead of the system's CA store
    cert_file: str | None = None  # PEM client certificate, for a broker that requires one ...
    key_file: str | None = None  # ... and its unencrypted PEM private key (not readable by others)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    publish_concurrency: int = Field(default=200, ge=1, le=10_000)
    outgoing_queue_size: int = Field(default=20_000, ge=10)
    ingest_queue_size: int = Field(default=1000, ge=1)
    # MQTT 5 lets upstream systems ask for an answer (response topic + correlation data); "auto"
    # speaks 5 and falls back to 3.1.1 when a broker refuses it
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    group_topics: bool = True

    @field_validator("broker")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_broker_url(v)
        return v


class DeliveryConfig(_Strict):
    """Acknowledgement timeouts and retries."""

    ack_timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=100)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    default_ttl_s: float = Field(default=3600.0, gt=0)
    state_publish_interval_s: float = Field(default=0.25, gt=0)
    # an acknowledged broadcast that never reports `done` holds its terminal at most this long
    max_play_s: float = Field(default=600.0, gt=0)
    # how often IP/4G terminals send a heartbeat; three periods of silence (plus 5 s): unknown.
    # Adapter rooms follow [adapter] heartbeat_s, serial rooms their bus's polls.
    terminal_heartbeat_s: float = Field(default=30.0, gt=0)


class SerialConfig(_Strict):
    """Line settings and timing of the serial (RS-485/RS-232) rooms' buses."""

    baudrate: int = Field(default=9600, ge=300, le=921_600)
    parity: Literal["N", "E", "O"] = "N"
    response_timeout_s: float = Field(default=0.5, gt=0)
    attempts: int = Field(default=3, ge=1, le=20)
    inter_frame_gap_s: float = Field(default=0.005, ge=0)
    echo_suppression: bool = False  # 2-wire RS-485 adapters hear their own transmission
    poll_interval_s: float = Field(default=30.0, gt=0)
    # a result in progress is queried again when the terminal said its play ends, else this often
    busy_poll_s: float = Field(default=2.0, gt=0)


class AdapterConfig(_Strict):
    """Rooms driven through vendors' adapters (`link = adapter`, FIELD-PROTOCOLS.md §1)."""

    # ebcd's listener for the adapters' heartbeats and task reports, "HOST:PORT"; None: no
    # listener (commands still go out, but nothing comes back beyond the 0x12 replies). A port
    # of {run_dir} binds a free port and writes it to <run_dir>/adapter-listen.port, for
    # simulated adapters (ebcd.protocols.adapter.address).
    listen: str | None = None
    # public keys of the adapters, one `<23-digit room code>.pub` each, in [security] scheme
    # (relative to the config file's directory): that adapter's frames must then be signed.
    # None, or no file for a room: all-zero blocks are accepted, logged once per adapter.
    keys_dir: str | None = None
    # what the signature covers: header + body, or header + body + the block's u32 time
    # (both exist in the field's code, as UTCTimeFlag); a guess: header_body
    signed_data: Literal["header_body", "header_body_time"] = "header_body"
    heartbeat_s: float = Field(default=30.0, gt=0)  # adapters' heartbeat period; 3 missed: unknown
    reply_timeout_s: float = Field(default=5.0, gt=0)  # for the 0x12 reply to a command
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=256, ge=1)  # open on the listener at once; more are closed
    max_garbage_bytes: int = Field(default=65_536, ge=1024)  # skipped without a good frame: disconnect
    idle_timeout_s: float = Field(default=120.0, gt=0)  # a listener connection silent this long is closed
    agency: str = ""  # the 0x04 language block's agency name (no public code sets one)


class ReviewConfig(_Strict):
    """Manual review (人工审核): which accepted alerts wait for `ebcd alert approve`."""

    levels: list[int] = Field(default_factory=list)  # e.g. [1, 2]: red and orange alerts wait
    senders: list[str] = Field(default_factory=list)  # upstream senders whose alerts wait
    sources: list[Literal["mqtt", "cli"]] = Field(default_factory=list)  # every alert from these waits

    def holds(self, level: int, sender: str | None, source: str) -> bool:
        """True if an alert with these properties must wait for a duty officer's approval."""
        return (
            level in self.levels or (sender is not None and sender in self.senders) or source in self.sources
        )


class PriorityConfig(_Strict):
    """Which broadcast a terminal plays when two want it, and what happens to the loser."""

    # compared in this order, each higher wins: emergency (any 1xxxx event) over daily and test,
    # a higher tier (district > town > village) over a lower, a more severe level over a less severe
    order: tuple[Literal["emergency", "tier", "level"], ...] = ("emergency", "tier", "level")
    preempted: Literal["resume", "end"] = "resume"


class SecurityConfig(_Strict):
    """How commands to terminals are signed, and how terminals check them."""

    scheme: Literal["ed25519", "sm2", "none"] = "ed25519"
    private_key: str = "bench"  # ebcd's signing key file (0600), or "bench": the published test-bench key
    public_key: str = "bench"  # what terminals (and the simulators) verify with
    replay_window_s: float = Field(default=300.0, gt=0)  # terminals refuse commands older than this
    # Terminals' public keys, one `<23-digit code>.pub` each (ebcd.security.reports; relative to the
    # config file's directory): reports and presence must then be signed by their terminal, and
    # within replay_window_s. None: nothing is checked, and the broker's ACL is the only defence.
    terminal_keys_dir: str | None = None


class UpstreamSender(_Strict):
    """One upstream alert system and what it may address."""

    sender: str = Field(min_length=1, max_length=256)  # CAP <sender>, or the JSON alert's "sender"
    levels: list[int] = Field(default_factory=list)  # empty: every level
    event_types: list[str] = Field(default_factory=list)  # codes or patterns ("11B*"); empty: all
    area: list[str] = Field(default_factory=list)  # all | town:CODE | village:CODE | area:CODE; empty: all
    signed_by: list[str] = Field(default_factory=list)  # PEM certificates: its CAP must carry XML-DSig
    allow_sha1: bool = False  # accept RSA-SHA1 / SHA-1 digests from this sender (older feeds)
    # only if strict XML-DSig verification fails: verify once more with whitespace-only text between
    # elements dropped (documents pretty-printed after signing); README, "Real CAP feeds"
    whitespace_tolerant: bool = False


class UpstreamConfig(_Strict):
    """Upstream authority: with senders listed, an unlisted sender's alert is refused."""

    senders: list[UpstreamSender] = Field(default_factory=list)
    # a message with neither sender nor identifier is a duplicate of the same bytes within this long
    digest_window_s: float = Field(default=86_400.0, gt=0)


class IngestConfig(_Strict):
    """How much of an upstream payload ebcd reads (README, "Real CAP feeds"); the broker's
    max_packet_size must stay above max_payload_bytes, or senders never hear why."""

    # real CAP documents reach ~900 KB (inline audio, 41,009-point polygons); refused `too_large`
    max_payload_bytes: int = Field(default=2 * 1024 * 1024, ge=64 * 1024, le=16 * 1024 * 1024)
    max_depth: int = Field(default=64, ge=16, le=256)  # XML nesting; refused `forbidden_xml`
    max_elements: int = Field(default=100_000, ge=1_000, le=1_000_000)  # refused `too_large`


class EbdConfig(_Strict):
    """EBD packages with the platform above (city or province) over HTTP (`ebcd.platform`); off
    unless `listen` is set. Paths are relative to the config file's directory."""

    listen: str | None = None  # HOST:PORT of ebcd's HTTP server for packages from above
    upstream_url: str | None = None  # where ebcd POSTs its packages (state, logs, heartbeats, inventory)
    upstream_code: str | None = Field(default=None, pattern=r"^(\d{18}|\d{23})$")  # its EBRID (SRC)
    own_url: str | None = None  # ebcd's URL as the platform above reaches it (SRC/URL of what ebcd sends)
    verify_with: list[str] = Field(default_factory=list)  # PEM public keys of the platform above
    timezone: str = "Asia/Shanghai"  # the zone of every yyyy-MM-dd HH:mm:ss both ways
    heartbeat_s: float = Field(default=30.0, gt=0)  # ConnectionCheck up this often
    # what the platform above may address, as in [[upstream.senders]]
    levels: list[int] = Field(default_factory=list)
    event_types: list[str] = Field(default_factory=list)
    area: list[str] = Field(default_factory=list)
    max_package_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)  # a POST body, and a tar's files
    max_files: int = Field(default=32, ge=2, le=10_000)  # files in one tar
    # BrdStateCode as GS and DOMAIN.md number it ("gs": 0 unprocessed … 5 cancelled), or the older
    # GRPlatForm/Lishui peers ("gr": 0 failed, 1 playing, 2 done)
    state_codes: Literal["gs", "gr"] = "gs"
    report_interval_s: float = Field(default=1.0, gt=0)  # EBMStateResponse of a broadcast at most this often
    terminal_state_interval_s: float = Field(default=5.0, gt=0)  # EBRDTState of changed terminals
    post_timeout_s: float = Field(default=10.0, gt=0)  # one POST up, answer included
    retry_initial_s: float = Field(default=1.0, gt=0)  # a platform above that is down: backoff from
    retry_max_s: float = Field(default=30.0, gt=0)  # ... to this
    start_slack_s: float = Field(default=5.0, ge=0)  # a StartTime less than this ahead plays at once

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"listen {v!r}: expected HOST:PORT")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {v!r} is not an IANA zone name (e.g. Asia/Shanghai)") from None
        return v

    @model_validator(mode="after")
    def _complete(self) -> EbdConfig:
        if self.listen is not None:
            if self.upstream_code is None:
                raise ValueError("[ebd] listen needs upstream_code: the EBRID of the platform above")
            if not self.verify_with:
                raise ValueError("[ebd] listen needs verify_with: the platform above's public key(s) (PEM)")
        return self


class OperatorConfig(_Strict):
    """A room's operators on the control socket: OS users or groups, or a token in a file."""

    room: str = Field(pattern=r"^\d{23}$")  # the district, a town or a village room
    name: str | None = None
    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    token_file: str | None = None  # the CLI presents it with EBCD_TOKEN_FILE


class DaemonConfig(_Strict):
    """Where the daemon keeps its journal and socket, and serves metrics."""

    state_dir: str = "/var/lib/ebcd"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9469, ge=0, le=65535)
    socket_mode: int = 0o660
    # The control socket's limits (ebcd.control.socket): a connection that sends no request, or
    # reads no answer, for control_idle_timeout_s is closed; one more than control_max_connections
    # is answered `busy` and closed. The cap keeps the daemon's file descriptors for the broker,
    # the journal and the serial ports: it must stay far below LimitNOFILE (systemd/ebcd.service).
    control_idle_timeout_s: float = Field(default=10.0, gt=0)
    control_max_connections: int = Field(default=64, ge=1, le=1024)


class JournalConfig(_Strict):
    """What the journal keeps and for how long (`ebcd.journal.retention`)."""

    # raw upstream payloads already judged are cleared after this; the row and its verdict stay
    raw_retention_days: float = Field(default=30.0, gt=0)
    # ended (final) alerts are deleted with their deliveries, transitions and dedupe claims after
    # this many days since their last change; None: kept forever
    alert_retention_days: float | None = Field(default=None, gt=0)
    retention_interval_s: float = Field(default=3600.0, gt=0)  # between two pruning passes
    # delivery transitions (not awaited by anyone) wait up to this long to be committed with the
    # ones behind them: a burst of reports becomes one transaction and one fsync, not one each.
    # What a kill -9 can lose grows by as much (a lost transition means one re-send, which the
    # terminal answers from what it remembers); decisions (accept, cancel, ...) never wait for it
    group_commit_ms: float = Field(default=5.0, ge=0, le=1000)


class SimulatorConfig(_Strict):
    """How simulated terminals behave."""

    play_time_s: float = Field(default=1.0, ge=0)
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    connect_concurrency: int = Field(default=50, ge=1)
    # Broker login of the simulated terminals (ebcd.security.mqtt_auth); paths relative to the
    # config file's directory. A directory holding one file per terminal, named by its 23-digit
    # resource code (its MQTT user name), its password on the first line; the file `_all` serves
    # every terminal without a file of its own. None: the terminals log in anonymously.
    credentials_dir: str | None = None
    # mqtts:// only: a client certificate every simulated terminal presents (one for the bench),
    # for a broker that requires one; the CA to trust is [mqtt] ca_file.
    cert_file: str | None = None
    key_file: str | None = None
    # Where `ebcd simulate` puts the serial buses' pty links, for ports named `{run_dir}/...` in
    # rooms.csv (`ebcd run` reads it too, to find them); relative to the config file's directory.
    # --run-dir overrides it; unset: <temp dir>/ebcd-sim-<hash of the config path and the broker>.
    run_dir: str | None = None
    # The simulated terminals' private keys, one `<code>.key` each (`ebcd keys generate-terminals`
    # writes them to <out>/private); relative to the config file's directory. A terminal with a
    # key signs its reports and presence; None: none signs.
    terminal_keys_dir: str | None = None


class DutyRoomConfig(_Strict):
    """What `ebcd top` is shown (the control socket's `top` stream); the defaults need no section."""

    recent_alerts: int = Field(default=8, ge=0, le=200)  # settled or ended alerts beside those in flight
    recent_rejections: int = Field(default=20, ge=0, le=1000)  # refusals of upstream messages kept
    refresh_s: float = Field(default=1.0, gt=0, le=60)  # a snapshot at least this often
    min_interval_s: float = Field(default=0.25, ge=0.05, le=10)  # and at most one per this


class WebConfig(_Strict):
    """The wall screen's read-only live page; off unless `listen` is set."""

    listen: str | None = Field(default=None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):\d{1,5}$")
    token_file: str | None = None  # first line: the token (0600, like the other secrets)


class Config(_Strict):
    """The whole `ebcd.toml`."""

    district: DistrictConfig
    topology: TopologyConfig = TopologyConfig()
    mqtt: MqttConfig = MqttConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    serial: SerialConfig = SerialConfig()
    adapter: AdapterConfig = AdapterConfig()
    review: ReviewConfig = ReviewConfig()
    priority: PriorityConfig = PriorityConfig()
    security: SecurityConfig = SecurityConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    ingest: IngestConfig = IngestConfig()
    ebd: EbdConfig = EbdConfig()
    operators: list[OperatorConfig] = Field(default_factory=list)  # [[operators]] tables
    test_broadcast: list[TestBroadcastConfig] = Field(default_factory=list)  # [[test_broadcast]] tables
    daemon: DaemonConfig = DaemonConfig()
    journal: JournalConfig = JournalConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    duty_room: DutyRoomConfig = DutyRoomConfig()
    web: WebConfig = WebConfig()
    base_dir: Path = Path()


class ConfigError(Exception):
    """A config file that cannot be used; `errors` lists each problem with its place."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(errors))
        self.path = path
        self.errors = errors


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """Split `mqtt://host:port` or `mqtts://host:port` into (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def load_config(path: Path) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    raw["base_dir"] = path.resolve().parent
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(path, [_place(err) for err in e.errors()]) from None
    except CodeError as e:
        raise ConfigError(path, [str(e)]) from None


def _place(err: object) -> str:
    d = err if isinstance(err, dict) else {}
    loc = ".".join(str(p) for p in d.get("loc", ()))
    return f"[{loc}] {d.get('msg', err)}"


SYSTEM_CONFIG = Path("/etc/ebcd/ebcd.toml")  # where docs/install.md puts it
CONFIG_ENV = "EBCD_CONFIG"


def default_config_path() -> Path:
    """The config a command without `-c` reads: $EBCD_CONFIG, else /etc/ebcd/ebcd.toml on an
    installed server, else the shipped district (a checkout, a demo, a test bench)."""
    if named := os.environ.get(CONFIG_ENV):
        return Path(named)
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    return shipped_config_path()


def shipped_config_path() -> Path:
    """The default district's config: packaged in a wheel, or `config/` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_shipped_config" / "ebcd.toml", here.parent / "config" / "ebcd.toml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("the shipped config/ebcd.toml is not installed with ebcd")
