"""Simulated IP/4G terminals: each one its own MQTT connection, with birth, heartbeat and will.

With `[simulator] credentials_dir` each terminal logs in as a real one does: its 23-digit
resource code as user name (what the broker ACL's `%u` patterns expect) and its own password
(ebcd.security.mqtt_auth); over mqtts:// they verify the broker with `[mqtt] ca_file`.

With `[simulator] terminal_keys_dir` (`ebcd keys generate-terminals`) each terminal that has a
private key there signs its reports and presence, its last will included (ebcd.security.reports).
Ed25519 costs ~0.06 ms a signed report; SM2 in pure Python 8-18 ms, so the 674 x 3 reports of a
district-wide alert take ~0.1 s of this process's CPU with Ed25519 and 16-36 s with SM2.
Sessions count connections from the clock in whole seconds at start, so that a restarted
simulator's sessions are ahead of its last ones by about the seconds between (see the bound on
session steps in ebcd.delivery.liveness), and in one process a new fleet starts above every
session an earlier one used (two `ebcd simulate` started within the same second share numbers).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import structlog

from ebcd.config import Config
from ebcd.protocols.messages import Liveness, TerminalPresence, TerminalReport
from ebcd.protocols.mqtt import codec as mqtt_codec
from ebcd.protocols.mqtt.codec import CodecError, Topics
from ebcd.protocols.mqtt.link import MqttLink, Will
from ebcd.protocols.mqtt.transport import group_topics_of
from ebcd.security.mqtt_auth import terminal_passwords, tls_context
from ebcd.security.replay import REPLAY_WINDOW_S
from ebcd.security.reports import load_terminal_signers, sign_presence, sign_report
from ebcd.security.signing import Signer, Verifier
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal
from simulators.adapter import AdapterSimulator, alert_of, note_alert
from simulators.faults import Fault, FaultPlan
from simulators.serial_bus import SerialBusSimulator
from simulators.terminal import CachingVerifier, CommandCheck, Step, TerminalBehaviour

log = structlog.get_logger("ebcd.simulator")

FLAP_INTERVAL_S = 4.0
FLAP_DOWN_S = 1.5
CONNECT_WAIT_S = 10.0  # a connection not up by then lets the next one start (and is logged)


class SimTerminal:
    """One simulated terminal on its own MQTT connection."""

    highest_session: ClassVar[int] = 0  # of every one in this process: a new fleet starts above it

    def __init__(
        self,
        district: District,
        terminal: Terminal,
        host: str,
        port: int,
        behaviour: TerminalBehaviour,
        *,
        session_base: int,
        tls_context: ssl.SSLContext | None = None,
        password: str | None = None,
        signer: Signer | None = None,
        source_address: str = "",
    ) -> None:
        self.terminal = terminal
        self.signer = signer  # None: reports and presence go unsigned
        self.behaviour = behaviour
        self.topics = Topics(district.code)
        self.session = session_base
        self._timers: dict[tuple[str, int], list[asyncio.TimerHandle]] = {}
        subs = [self.topics.terminal_cmd(terminal.code)]
        subs += [self.topics.group_cmd(room) for room in group_topics_of(district, terminal)]
        self.link = MqttLink(
            host=host,
            port=port,
            client_id=f"sim-{terminal.code}",
            # a terminal with a password logs in with its code as user name, as real ones do
            username=terminal.code if password is not None else None,
            password=password,
            tls=tls_context is not None,
            tls_context=tls_context,
            subscriptions=subs,
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=self._will,
            keepalive_s=30,
            publish_workers=2,
            queue_size=1000,
            quiet=True,
            reconnect_initial_s=0.5,
            reconnect_max_s=10.0,
            source_address=source_address,
        )

    def _presence(self, state: Liveness, *, heartbeat: bool = False) -> bytes:
        presence = TerminalPresence(self.terminal.code, state, self.session, heartbeat)
        if self.signer is not None:
            presence = replace(presence, signature=sign_presence(self.signer, presence, now=time.time()))
        return mqtt_codec.encode_presence(presence)

    def _will(self) -> Will:
        self.session += 1  # every connection is a new session; its will carries its number
        SimTerminal.highest_session = max(SimTerminal.highest_session, self.session)
        return Will(self.topics.presence(self.terminal.code), self._presence(Liveness.OFFLINE))

    async def _on_connect(self) -> None:
        self.link.enqueue(self.topics.presence(self.terminal.code), self._presence(Liveness.ONLINE))

    def heartbeat(self) -> None:
        """Send a heartbeat if connected."""
        if self.link.connected.is_set():
            self.link.enqueue(
                self.topics.presence(self.terminal.code), self._presence(Liveness.ONLINE, heartbeat=True)
            )

    def _on_message(self, topic: str, payload: bytes, retain: bool, properties: Any) -> None:
        try:
            cmd = mqtt_codec.decode_command(payload)
        except CodecError as e:
            log.warning("simulator.bad_command", terminal=self.terminal.code, error=str(e))
            return
        key = (cmd.alert_id, cmd.revision)
        note_alert(cmd.ebmid, cmd.alert_id)
        played_before = self.behaviour.plays[key]
        current_before = self.behaviour.current
        steps = self.behaviour.on_command(cmd, retained=retain)
        if current_before is not None and self.behaviour.current != current_before:
            for handle in self._timers.pop(current_before, []):  # replaced or stopped: no 'done' for it
                handle.cancel()
        if self.behaviour.plays[key] > played_before:
            log.info(
                "terminal.played", terminal=self.terminal.code, alert_id=cmd.alert_id, revision=cmd.revision
            )
        loop = asyncio.get_running_loop()
        handles = self._timers.setdefault(key, [])
        handles[:] = [h for h in handles if not h.cancelled()]
        for step in steps:
            handles.append(loop.call_later(step.delay_s, self._send, step))

    def _send(self, step: Step) -> None:
        self.behaviour.reported(step.report)
        report: TerminalReport = step.report
        if self.signer is not None:
            report = replace(report, signature=sign_report(self.signer, report, now=time.time()))
        self.link.enqueue(self.topics.report(self.terminal.code), mqtt_codec.encode_report(report))


def fleet_login(
    config: Config, codes: Sequence[str], *, tls: bool
) -> tuple[ssl.SSLContext | None, dict[str, str] | None]:
    """The TLS context (for an mqtts:// broker) and the passwords (code -> password, if
    `[simulator] credentials_dir` is set) of these terminals; MqttAuthError naming the config
    key and the file for anything missing or unsafe."""
    sim = config.simulator
    context = None
    if tls:
        context = tls_context(
            base=config.base_dir,
            section="[simulator]",
            ca_file=config.mqtt.ca_file,  # the broker's CA: the same for ebcd and its terminals
            cert_file=sim.cert_file,
            key_file=sim.key_file,
        )
    passwords = None
    if sim.credentials_dir:
        passwords = terminal_passwords(
            sim.credentials_dir, codes, base=config.base_dir, key="[simulator] credentials_dir"
        )
    return context, passwords


def fleet_signers(config: Config, codes: Sequence[str]) -> dict[str, Signer] | None:
    """code -> signer of each of these terminals with a private key in `[simulator]
    terminal_keys_dir` (None if it is unset); KeyFileError naming the file for an unsafe one."""
    directory = config.simulator.terminal_keys_dir
    if directory is None:
        return None
    path = Path(directory)
    return load_terminal_signers(path if path.is_absolute() else config.base_dir / path, codes)


class MqttFleet:
    """Every simulated MQTT terminal of (part of) a district."""

    def __init__(
        self,
        district: District,
        terminals: Sequence[Terminal],
        host: str,
        port: int,
        *,
        plan: FaultPlan,
        play_time_s: float,
        heartbeat_interval_s: float,
        connect_concurrency: int = 50,
        verifier: Verifier | None = None,
        replay_window_s: float = REPLAY_WINDOW_S,
        tls_context: ssl.SSLContext | None = None,
        passwords: Mapping[str, str] | None = None,
        signers: Mapping[str, Signer] | None = None,
        source_addresses: Sequence[str] = (),
    ) -> None:
        """`tls_context`: connect over TLS with it; `passwords`: terminal code -> its password
        (see `fleet_login`); without one a terminal connects anonymously. `signers`: terminal
        code -> its key (see `fleet_signers`); without one a terminal signs nothing.
        `source_addresses`: local addresses the terminals' connections come from, taken in turn
        (each address has its own ephemeral ports: ~28,000 on Linux, fewer than a large fleet on
        one host needs); none: the system picks."""
        self.district = district
        self.plan = plan
        self.heartbeat_interval_s = heartbeat_interval_s
        self.connect_concurrency = connect_concurrency
        session_base = max(int(time.time()), SimTerminal.highest_session)  # see the module's docstring
        shared = CachingVerifier(verifier) if verifier is not None else None

        def check() -> CommandCheck | None:
            return CommandCheck(shared, window_s=replay_window_s) if shared is not None else None

        self.terminals = [
            SimTerminal(
                district,
                t,
                host,
                port,
                TerminalBehaviour(t.code, play_time_s, plan.of(t.code), check=check()),
                session_base=session_base,
                tls_context=tls_context,
                password=passwords.get(t.code) if passwords is not None else None,
                signer=signers.get(t.code) if signers is not None else None,
                source_address=source_addresses[i % len(source_addresses)] if source_addresses else "",
            )
            for i, t in enumerate(terminals)
        ]
        self._links: dict[str, asyncio.Task[None]] = {}  # terminal -> the task running its connection
        self.buses: list[SerialBusSimulator] = []  # serial buses run beside the fleet, for reports
        self.adapters: list[AdapterSimulator] = []  # simulated adapter rooms run beside the fleet
        self.started = asyncio.Event()

    def plays(self) -> dict[tuple[str, str, int], int]:
        """(terminal, alert, revision) -> times played, on MQTT, the serial buses and the adapters beside.

        An adapter hears EBM ids, not alert ids: its plays are named by the alert an MQTT terminal
        of this process heard with the same EBM id (else by the EBM id), and the n-th distinct
        start of an EBM id counts as revision n."""
        out = {(s.terminal.code, a, r): n for s in self.terminals for (a, r), n in s.behaviour.plays.items()}
        for bus in self.buses:
            for p in bus.plays:
                key = (p.terminal, p.alert_id, p.revision)
                out[key] = out.get(key, 0) + 1
        for adapter in self.adapters:
            for code, ebmid, nth in adapter.played:
                key = (code, alert_of(ebmid), nth)
                out[key] = out.get(key, 0) + 1
        return out

    async def run(self) -> None:
        """Connect every terminal (a few at a time), keep them alive, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            sem = asyncio.Semaphore(self.connect_concurrency)
            online = [s for s in self.terminals if s.behaviour.fault is not Fault.OFFLINE]

            async def admitted(sim: SimTerminal) -> None:
                try:
                    await asyncio.wait_for(sim.link.connected.wait(), CONNECT_WAIT_S)
                except TimeoutError:
                    log.warning("simulator.slow_connect", terminal=sim.terminal.code, waited_s=CONNECT_WAIT_S)
                finally:
                    sem.release()

            waiting = []
            for sim in online:  # up to connect_concurrency connecting at once, not one after another
                await sem.acquire()
                self._connect(sim, tg)
                waiting.append(tg.create_task(admitted(sim), name=f"sim-admit-{sim.terminal.code}"))
            await asyncio.gather(*waiting)
            log.info("simulator.connected", terminals=len(online), offline=len(self.terminals) - len(online))
            self.started.set()
            tg.create_task(self._heartbeats(), name="sim-heartbeats")
            flappers = [s for s in online if s.behaviour.fault is Fault.FLAP]
            if flappers:
                tg.create_task(self._flap(flappers, tg), name="sim-flap")

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            for sim in self.terminals:
                sim.heartbeat()

    def _connect(self, sim: SimTerminal, tg: asyncio.TaskGroup) -> None:
        self._links[sim.terminal.code] = tg.create_task(sim.link.run(), name=f"sim-{sim.terminal.code}")

    async def _flap(self, flappers: list[SimTerminal], tg: asyncio.TaskGroup) -> None:
        while True:
            await asyncio.sleep(FLAP_INTERVAL_S)
            for sim in flappers:
                self._links[sim.terminal.code].cancel()
            await asyncio.sleep(FLAP_DOWN_S)
            for sim in flappers:
                self._connect(sim, tg)
