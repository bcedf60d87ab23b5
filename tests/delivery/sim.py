"""A deterministic simulation of the delivery core: a fake fleet, a fake clock, a lossy network.

The core (`ebcd.delivery.core.Core`) is driven by a workload of `Step`s (alerts of random priority,
reviews, updates, cancels, reports lost, duplicated, delayed and reordered, terminals dying and
coming back, rooms going down, the clock jumping, the daemon restarting from its journal). The
fleet plays honestly: each Play that reaches a terminal is acknowledged (received, playing, then
done after the play time), a terminal plays one broadcast at a time (a newer Play replaces it, a
resume plays only what it had not finished), plays an (alert, revision) once and acknowledges
every copy, and answers a Stop with stopped. After every step the invariants of
`tests.delivery.invariants` are checked; a broken one raises `Broken` with the step it broke at.

Everything a step does depends on its own arguments and the state only (its randomness is seeded
from its last argument), so a failing workload replays exactly, and removing steps from it still
gives a valid workload (`tests.delivery.shrink`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ebcd.delivery.core import RESEND_KINDS, AlertSpec, Core, Policy, Refused, ReportVerdict
from ebcd.delivery.liveness import Heard
from ebcd.delivery.preemption import CRITERIA
from ebcd.delivery.records import AlertRecord, AlertTransition, DeliveryRecord, Note, Play, Stop
from ebcd.delivery.recovery import resend_in_flight, restore
from ebcd.delivery.state import AState, DState
from ebcd.model.alert import AlertRequest, CodeTarget, Origin
from ebcd.model.backoff import Backoff
from ebcd.protocols.messages import AckStatus, Liveness, TerminalPresence, TerminalReport
from tests.delivery.invariants import Broken, Checks, diff, snapshot

START = 1000.0  # the fake monotonic clock at the start
WALL = 1.7e9  # wall clock = monotonic + WALL
EVENT_TYPES = ("11B03", "20000", "00000")  # emergency (rainstorm), daily broadcast, test
TIERS = (Origin.DISTRICT, Origin.TOWN, Origin.VILLAGE)
ROOMS = {Origin.TOWN: "34010400000000000000001", Origin.VILLAGE: "34010400100000000000002"}
TTLS_S = (15.0, 40.0, 120.0, 600.0, 3600.0)
JUMPS_S = (30.0, 100.0, 700.0, 4000.0)
ORDERS = tuple(itertools.permutations(CRITERIA))
HEAL_S = 400.0  # how long the healed network runs before the end-of-run checks
MAX_EVENTS_PER_STEP = 200_000  # a step that never ends is a livelock


class Step(NamedTuple):
    """One thing that happens; `args` are interpreted against the state (modulo its size)."""

    kind: str
    args: tuple[int, ...]

    def __repr__(self) -> str:
        return f"Step({self.kind!r}, {self.args!r})"


class Scenario(NamedTuple):
    """The fleet, the network and the policy of one run."""

    terminals: int = 8
    loss_pct: int = 5  # commands and reports lost
    dup_pct: int = 5  # reports duplicated
    delay_pct: int = 5  # reports delayed by seconds (reordered past other reports)
    refuse_pct: int = 0  # commands refused by the terminal
    fail_pct: int = 0  # commands the link could not send (send_failed)
    play_ms: int = 1000  # how long a broadcast plays
    ack_timeout_ms: int = 1500
    max_attempts: int = 3
    max_play_s: int = 30
    end: int = 0  # pre-empted policy: 0 resume, 1 end
    order: int = 0  # index into ORDERS (priority criteria)

    def policy(self) -> Policy:
        """The core's policy for this scenario."""
        return Policy(
            ack_timeout_s=self.ack_timeout_ms / 1000,
            max_attempts=self.max_attempts,
            backoff=Backoff(initial_s=0.5, max_s=4.0, jitter=0.2),
            max_play_s=float(self.max_play_s),
            priority_order=ORDERS[self.order % len(ORDERS)],
            preempted="end" if self.end else "resume",
        )


# kind -> weight in generated workloads
WEIGHTS: dict[str, int] = {
    "alert": 10,
    "approve": 3,
    "reject": 1,
    "update": 3,
    "cancel": 2,
    "resend": 2,
    "advance": 24,
    "lose": 2,
    "dup": 2,
    "delay": 2,
    "die": 2,
    "born": 3,
    "heartbeat": 2,
    "stale_will": 1,
    "room_down": 1,
    "room_up": 2,
    "sweep": 1,
    "jump": 1,
    "restart": 2,
}
KINDS = tuple(WEIGHTS)
N_ARGS = 4  # the last one salts the step's own randomness


def generate(seed: int, steps: int) -> tuple[Scenario, list[Step]]:
    """The scenario and workload of a seed."""
    rng = random.Random(seed)
    sc = Scenario(
        terminals=rng.randint(6, 12),
        loss_pct=rng.choice((0, 0, 5, 15, 30)),
        dup_pct=rng.choice((0, 5, 20)),
        delay_pct=rng.choice((0, 5, 20)),
        refuse_pct=rng.choice((0, 0, 5)),
        fail_pct=rng.choice((0, 0, 10)),
        play_ms=rng.choice((200, 500, 1000, 3000)),
        ack_timeout_ms=rng.choice((500, 1500, 5000)),
        max_attempts=rng.randint(1, 4),
        max_play_s=rng.choice((5, 30, 60)),
        end=int(rng.random() < 0.25),
        order=rng.randrange(len(ORDERS)),
    )
    kinds = rng.choices(KINDS, weights=[WEIGHTS[k] for k in KINDS], k=steps)
    return sc, [Step(k, tuple(rng.randrange(1 << 16) for _ in range(N_ARGS))) for k in kinds]


# -- the fleet ------------------------------------------------------------------------------
Key = tuple[str, int]  # (alert, revision)


@dataclass
class Terminal:
    """A loudspeaker: plays one broadcast at a time, each (alert, revision) once."""

    code: str
    online: bool = True
    session: int = 1
    playing: Key | None = None
    ends_at: float = math.inf
    remaining: dict[Key, float] = field(default_factory=dict)  # what is left of interrupted ones
    done: set[Key] = field(default_factory=set)
    disturbed_at: float = -math.inf  # last reboot, death, room down or silence sweep


Message = TerminalReport | TerminalPresence


class Sim(Checks):
    """The driver: the core, the fleet, the network and the journal (the invariants: `Checks`)."""

    def __init__(self, sc: Scenario, *, trace: bool = False, engine: type[Core] = Core) -> None:
        self.sc = sc
        self.engine = engine  # the core, or a variant of it (the findings' tests run naive ones)
        self.codes = [f"T{i:02d}" for i in range(sc.terminals)]
        self.policy = sc.policy()
        self.play_s = sc.play_ms / 1000
        self.now = START
        self.core = engine(self.codes, self.policy, seed=0)
        self.restarts = 0
        self.rng = random.Random(0)
        self.terms = {c: Terminal(c) for c in self.codes}
        self.net: list[tuple[float, int, Message, int]] = []  # (arrival, n, message, attempt answered)
        self.net_n = 0
        self.down: set[str] = set()  # terminals whose room link is down
        self.perfect = False  # the healed network of the end-of-run checks
        self.journal_alerts: dict[str, AlertRecord] = {}
        self.journal_deliveries: dict[str, dict[str, DeliveryRecord]] = {}  # alert -> terminal -> latest
        self.n_alerts = 0
        self.expiry: dict[str, float] = {}  # the driver's own reckoning of each alert's time to live
        self.since: dict[str, float] = {}  # when each alert's current revision began
        self.done: set[tuple[str, int, str]] = set()  # (alert, revision, terminal) reported done
        self.stopped: set[tuple[str, int, str]] = set()  # (alert, revision, terminal) commanded to stop
        self.acks: set[tuple[str, int, str]] = set()  # acknowledgements the core applied
        self.acked_max: dict[Key, int] = {}
        self.last_play: dict[str, Key] = {}  # the last (alert, revision) commanded to each terminal
        self.attempts: Counter[tuple[str, int, str]] = Counter()  # Plays commanded per (alert, rev, terminal)
        self.ambiguous: set[tuple[str, int, str]] = set()  # acknowledged by a stale report
        self.stats: Counter[str] = Counter()
        self.trace: list[str] | None = [] if trace else None
        self.step_no = -1
        self.dirty: set[str] = set()  # alerts changed since the last check
        self.plays: list[tuple[float, Play]] = []  # every Play the core decided, when
        self.alert_log: list[AlertTransition] = []
        for code in self.codes:  # every terminal announces itself at start
            self.core.presence(TerminalPresence(code, Liveness.ONLINE, 1), self.now)
        self.handle()

    # -- plumbing ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.now - START:9.3f} {text}")

    def fail(self, why: str) -> Broken:
        where = f"step {self.step_no} at " if self.step_no >= 0 else ""
        return Broken(f"{where}t={self.now - START:.3f}: {why}")

    def chance(self, pct: int) -> bool:
        return not self.perfect and self.rng.random() * 100 < pct

    def send(self, msg: Message, at: float, attempt: int = 0) -> None:
        """A message from a terminal to ebcd, through the lossy network."""
        if self.chance(self.sc.loss_pct):
            self.stats["lost"] += 1
            return
        for _ in range(2 if self.chance(self.sc.dup_pct) else 1):
            late = self.chance(self.sc.delay_pct)
            latency = self.rng.uniform(2.0, 20.0) if late else self.rng.uniform(0.005, 0.3)
            self.net_n += 1
            heapq.heappush(self.net, (at + latency, self.net_n, msg, attempt))

    def report(self, t: Terminal, key: Key, status: AckStatus, at: float, cause: str | None = None) -> None:
        attempt = self.attempts[(key[0], key[1], t.code)]
        self.send(TerminalReport(t.code, key[0], key[1], status, cause), at, attempt)

    # -- the core, and what it decides -------------------------------------------------------
    def handle(self) -> None:
        """Drain the core: journal what changed, perform its effects, check every command."""
        out = self.core.drain()
        self.stats["transitions"] += len(out.transitions)
        self.alert_log.extend(out.alerts)
        for tr in out.transitions:
            r = tr.record
            self.journal_deliveries.setdefault(r.alert_id, {})[r.terminal] = r
            self.stats[f"{tr.event}"] += 1
        self.dirty |= out.changed  # journalled at the end of the step (the latest record is what counts)
        failed: list[Play] = []
        for e in out.effects:
            if isinstance(e, Play):
                self.check_play(e)
                if self.chance(self.sc.fail_pct):
                    failed.append(e)
                    self.say(f"play {e.alert_id}/{e.revision} {e.terminals}: the link could not send")
                    continue
                self.play(e)
            elif isinstance(e, Stop):
                self.stop(e)
            elif isinstance(e, Note):
                self.stats[f"note_{e.kind}"] += 1
        for e in failed:
            self.core.send_failed(e.alert_id, e.revision, e.terminals, "link could not send", self.now)
            self.handle()

    def reachable(self, code: str) -> bool:
        return self.terms[code].online and code not in self.down

    def catch_up(self, t: Terminal, now: float) -> None:
        """The terminal's broadcast ends by itself: it reports done."""
        if t.playing is not None and t.ends_at <= now:
            key, at = t.playing, t.ends_at
            t.done.add(key)
            t.remaining.pop(key, None)
            t.playing, t.ends_at = None, math.inf
            if t.code not in self.down:
                self.report(t, key, AckStatus.DONE, at)

    def interrupt(self, t: Terminal, now: float) -> None:
        if t.playing is not None:
            t.remaining[t.playing] = max(0.0, t.ends_at - now)
            t.playing, t.ends_at = None, math.inf

    def play(self, p: Play) -> None:
        key = (p.alert_id, p.revision)
        self.say(f"play {key} resume={p.resume} -> {','.join(p.terminals)}")
        for code in p.terminals:
            t = self.terms[code]
            if not self.reachable(code) or self.chance(self.sc.loss_pct):
                continue
            self.catch_up(t, self.now)
            if self.chance(self.sc.refuse_pct):
                self.report(t, key, AckStatus.REFUSED, self.now, "volume locked by the room")
            elif key in t.done:
                self.report(t, key, AckStatus.DONE, self.now)  # a copy of what it played: acknowledged
            elif t.playing == key:
                self.report(t, key, AckStatus.PLAYING, self.now)
            else:
                self.interrupt(t, self.now)
                t.playing = key
                t.ends_at = self.now + t.remaining.get(key, self.play_s)
                self.report(t, key, AckStatus.RECEIVED, self.now)
                self.report(t, key, AckStatus.PLAYING, self.now)

    def stop(self, s: Stop) -> None:
        key = (s.alert_id, s.revision)
        self.say(f"stop {key} -> {','.join(s.terminals)} ({s.why})")
        for code in s.terminals:
            self.stopped.add((s.alert_id, s.revision, code))
            t = self.terms[code]
            if not self.reachable(code) or self.chance(self.sc.loss_pct):
                continue
            self.catch_up(t, self.now)
            if t.playing == key:
                self.interrupt(t, self.now)
                self.report(t, key, AckStatus.STOPPED, self.now)

    def arrive(self, msg: Message, attempt: int = 0) -> None:
        """A message reaches ebcd (unless its room's link is down)."""
        if msg.terminal in self.down:
            return
        if isinstance(msg, TerminalPresence):
            heard = self.core.presence(msg, self.now)
            if heard is Heard.WENT_OFFLINE:  # (a last will, maybe of a session already replaced)
                self.terms[msg.terminal].disturbed_at = self.now
            self.say(f"presence {msg.terminal} {msg.state} s{msg.session}: {heard}")
            self.handle()
            return
        alert = self.core.alerts.get(msg.alert_id)
        d = alert.deliveries.get(msg.terminal) if alert else None
        expect_applied = (
            alert is not None and d is not None and d.attempts > 0 and msg.revision == alert.revision
        )
        key3 = (msg.alert_id, msg.revision, msg.terminal)
        if msg.status in (AckStatus.RECEIVED, AckStatus.PLAYING) and attempt < self.attempts[key3]:
            # an answer to an earlier attempt, after a later one went out: reports carry no attempt
            # number the core could tell them apart by, so it takes this one for the latest
            self.ambiguous.add(key3)
        verdict = self.core.report(msg, self.now)
        self.say(f"report {msg.terminal} {msg.alert_id}/{msg.revision} {msg.status}: {verdict}")
        if expect_applied and verdict != ReportVerdict.APPLIED:
            raise self.fail(f"{msg} to a delivery in flight was {verdict}")
        if verdict == ReportVerdict.APPLIED:
            if msg.status is AckStatus.DONE:
                self.done.add(key3)
            if msg.status in (AckStatus.RECEIVED, AckStatus.PLAYING, AckStatus.DONE):
                self.acks.add(key3)
        self.handle()

    def run_until(self, target: float) -> None:
        """Let the fleet, the network and the core's timers run until `target`, in time order."""
        for _ in range(MAX_EVENTS_PER_STEP):
            wake = self.core.next_wake()
            t_core = math.inf if wake is None else wake
            t_term = min((t.ends_at for t in self.terms.values() if t.online), default=math.inf)
            t_net = self.net[0][0] if self.net else math.inf
            t = min(t_core, t_term, t_net)
            if t > target:
                self.now = max(self.now, target)
                return
            self.now = max(self.now, t)
            if t == t_core:
                self.core.tick(self.now)
                self.handle()
            elif t == t_term:
                for term in self.terms.values():
                    if term.online:
                        self.catch_up(term, self.now)
            else:
                _, _, msg, attempt = heapq.heappop(self.net)
                self.arrive(msg, attempt)
        raise self.fail("livelock: the step never ends")

    # -- for tests that script their own workload -------------------------------------------
    def accept(self, request: AlertRequest, codes: Sequence[str] | None = None, *, hold: bool = False) -> str:
        """Accept an alert now (to every terminal unless `codes`); returns its id."""
        self.n_alerts += 1
        n = self.n_alerts
        codes = list(self.codes if codes is None else codes)
        spec = AlertSpec(f"A{n}", f"E{n}", request, self.now + WALL, "test", "test")
        alert = self.core.accept(spec, codes, self.now, hold=hold, wall_now=self.now + WALL)
        self.expiry[alert.id] = self.now + request.ttl_s
        self.since[alert.id] = self.now
        self.dirty.add(alert.id)
        self.handle()
        self.check()
        return alert.id

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass, then check every invariant."""
        self.run_until(self.now + seconds)
        self.check()

    def settled_at(self, alert_id: str, state: AState) -> float | None:
        """When the alert last reached `state` (monotonic), None if it never did."""
        times = [t.at for t in self.alert_log if t.alert_id == alert_id and t.new is state]
        return times[-1] if times else None

    # -- the workload ------------------------------------------------------------------------
    def pick(self, n: int, items: Sequence[str]) -> str | None:
        return items[n % len(items)] if items else None

    def mask(self, n: int) -> list[str]:
        chosen = [c for i, c in enumerate(self.codes) if n >> i & 1]
        return chosen or list(self.codes)

    def request(self, cls: int, tier_level: int, ttl: int) -> AlertRequest:
        tier = TIERS[tier_level % 3]
        return AlertRequest(
            level=tier_level // 3 % 4 + 1,
            event_type=EVENT_TYPES[cls % 3],
            targets=[CodeTarget(kind="all")],
            text="模拟演练广播",
            test=cls % 3 == 2,
            ttl_s=TTLS_S[ttl % len(TTLS_S)],
            origin=tier,
            origin_room=ROOMS.get(tier),
        )

    def do(self, step: Step) -> None:
        """Apply one step, then check every invariant."""
        self.step_no += 1
        self.rng.seed(step.args[-1])
        a = step.args
        self.stats[f"step_{step.kind}"] += 1
        getattr(self, f"step_{step.kind}")(*a[:-1])
        self.check()

    def flush(self) -> None:
        """Journal the alerts that changed (their delivery records are journalled as drained)."""
        for alert_id in self.dirty:
            self.journal_alerts[alert_id] = self.core.alerts[alert_id].record()

    def step_alert(self, cls: int, tier_level: int, spec: int) -> None:
        self.n_alerts += 1
        n = self.n_alerts
        req = self.request(cls, tier_level, spec >> 2)
        hold = spec % 4 == 0
        codes = self.mask(spec >> 5)
        alert = self.core.accept(
            AlertSpec(f"A{n}", f"E{n}", req, self.now + WALL, "sim", "sim"),
            codes, self.now, hold=hold, wall_now=self.now + WALL,
        )  # fmt: skip
        self.say(f"accept {alert.id} {req.event_type} {req.origin} L{req.level} hold={hold} -> {codes}")
        self.expiry[alert.id] = self.now + req.ttl_s
        self.since[alert.id] = self.now
        self.journal_alerts[alert.id] = alert.record()
        self.handle()

    def alert_ids(self, *, pending: bool = False) -> list[str]:
        ids = sorted(self.core.alerts, key=lambda i: self.core.alerts[i].order)
        if pending:
            return [i for i in ids if self.core.alerts[i].state is AState.PENDING_APPROVAL]
        return ids

    def step_approve(self, n: int, _b: int, _c: int) -> None:
        alert_id = self.pick(n, self.alert_ids(pending=True))
        if alert_id is not None:
            self.say(f"approve {alert_id}")
            self.core.approve(alert_id, self.now)
            self.handle()

    def step_reject(self, n: int, _b: int, _c: int) -> None:
        alert_id = self.pick(n, self.alert_ids(pending=True))
        if alert_id is not None:
            self.say(f"reject {alert_id}")
            self.core.reject(alert_id, "not approved", self.now)
            self.handle()

    def step_update(self, n: int, cls_tier: int, spec: int) -> None:
        alert_id = self.pick(n, self.alert_ids())
        if alert_id is None:
            return
        alert = self.core.alerts[alert_id]
        req = self.request(cls_tier >> 8, cls_tier, spec >> 10)
        codes = [] if spec % 32 == 0 else self.mask(spec)  # (an area with no terminal of ours, sometimes)
        self.say(f"update {alert_id} {req.event_type} {req.origin} L{req.level} -> {codes}")
        try:
            self.core.update(alert_id, req, codes, self.now)
        except Refused as e:
            if not (alert.closed or alert.state is AState.PENDING_APPROVAL):
                raise self.fail(f"update of {alert_id} in {alert.state} refused: {e.code}") from e
            self.stats["update_refused"] += 1
            return
        self.expiry[alert_id] = self.now + req.ttl_s
        self.since[alert_id] = self.now
        self.handle()

    def step_cancel(self, n: int, _b: int, _c: int) -> None:
        alert_id = self.pick(n, self.alert_ids())
        if alert_id is None:
            return
        closed = self.core.alerts[alert_id].closed
        self.say(f"cancel {alert_id} (closed={closed})")
        try:
            self.core.cancel(alert_id, "cancelled by the duty officer", self.now)
        except Refused as e:
            if not closed or e.code != "ended":
                raise self.fail(f"cancel of {alert_id} refused with {e.code} (closed={closed})") from e
            self.stats["cancel_refused"] += 1
            return
        if closed:
            raise self.fail(f"cancel of the closed alert {alert_id} was not refused")
        self.handle()

    def step_resend(self, n: int, which: int, _c: int) -> None:
        """The duty officer finishes a partial alert: a new attempt to what did not acknowledge."""
        alert_id = self.pick(n, self.alert_ids())
        if alert_id is None:
            return
        alert = self.core.alerts[alert_id]
        kinds = [k for i, k in enumerate(RESEND_KINDS) if which >> i & 1] or list(RESEND_KINDS)
        states = set().union(*(RESEND_KINDS[k] for k in kinds))
        open_to = {
            code
            for code, d in alert.deliveries.items()
            if d.state in states and not d.acked and not d.finished
        }
        played = {code for code, d in alert.deliveries.items() if d.acked or d.finished}
        over = alert.closed or self.now >= alert.expires or alert.state is AState.PENDING_APPROVAL
        self.say(f"resend {alert_id} {kinds} (over={over}) -> {sorted(open_to)}")
        try:
            codes = self.core.resend(alert_id, kinds, "resent by the duty officer", self.now)
        except Refused as e:
            if not over and open_to:
                raise self.fail(f"resend of {alert_id} in {alert.state} refused: {e.code}") from e
            want = {"nothing_to_resend"} if not over else {"ended", "expired", "not_approved"}
            if e.code not in want:
                raise self.fail(f"resend of {alert_id} refused with {e.code}, expected {want}") from e
            self.stats["resend_refused"] += 1
            return
        if over:
            raise self.fail(f"resend of {alert_id} in {alert.state} closed={alert.closed} was not refused")
        if set(codes) != open_to or set(codes) & played:
            raise self.fail(f"resend of {alert_id} went to {codes}, not to {sorted(open_to)}")
        for code in codes:
            d = alert.deliveries[code]
            if d.state not in (DState.SENT, DState.WAITING):
                raise self.fail(f"resent {alert_id}/{code} is {d.state} ({d.cause}), not sent or waiting")
        self.handle()

    def step_advance(self, dt: int, scale: int, _c: int) -> None:
        seconds = dt % 400 / 100 * (10 if scale % 5 == 0 else 1)
        self.run_until(self.now + seconds)

    def step_jump(self, n: int, tick_first: int, _c: int) -> None:
        """The daemon sleeps (a suspended VM) past time to live; the fleet and the network go on."""
        target = self.now + JUMPS_S[n % len(JUMPS_S)]
        self.say(f"jump to {target - START:.3f}")
        for t in self.terms.values():
            if t.online:
                self.catch_up(t, target)
        self.now = target
        if tick_first % 2:
            self.core.tick(self.now)
            self.handle()
        self.run_until(target)

    def net_index(self, n: int) -> int | None:
        return n % len(self.net) if self.net else None

    def step_lose(self, n: int, _b: int, _c: int) -> None:
        i = self.net_index(n)
        if i is not None:
            self.net.pop(i)
            heapq.heapify(self.net)

    def step_dup(self, n: int, latency: int, _c: int) -> None:
        i = self.net_index(n)
        if i is not None:
            at, _, msg, attempt = self.net[i]
            self.net_n += 1
            heapq.heappush(self.net, (at + latency % 500 / 100, self.net_n, msg, attempt))

    def step_delay(self, n: int, latency: int, _c: int) -> None:
        i = self.net_index(n)
        if i is not None:
            at, k, msg, attempt = self.net[i]
            self.net[i] = (at + latency % 3000 / 100, k, msg, attempt)
            heapq.heapify(self.net)

    def step_die(self, n: int, will: int, _c: int) -> None:
        t = self.terms[self.codes[n % len(self.codes)]]
        if not t.online:
            return
        self.catch_up(t, self.now)
        self.interrupt(t, self.now)
        t.online = False
        t.disturbed_at = self.now
        self.say(f"{t.code} dies")
        if will % 4:  # the broker publishes its last will (else the will is lost)
            self.send(TerminalPresence(t.code, Liveness.OFFLINE, t.session), self.now)

    def step_born(self, n: int, reboot: int, _c: int) -> None:
        t = self.terms[self.codes[n % len(self.codes)]]
        self.catch_up(t, self.now)
        if not t.online or reboot % 2:
            self.interrupt(t, self.now)
            t.disturbed_at = self.now
        t.online = True
        t.session += 1
        self.say(f"{t.code} born, session {t.session}")
        self.send(TerminalPresence(t.code, Liveness.ONLINE, t.session), self.now)

    def step_heartbeat(self, n: int, _b: int, _c: int) -> None:
        t = self.terms[self.codes[n % len(self.codes)]]
        if t.online:
            self.send(TerminalPresence(t.code, Liveness.ONLINE, t.session, heartbeat=True), self.now)

    def step_stale_will(self, n: int, _b: int, _c: int) -> None:
        t = self.terms[self.codes[n % len(self.codes)]]
        if t.session > 1:
            self.send(TerminalPresence(t.code, Liveness.OFFLINE, t.session - 1), self.now)

    def step_room_down(self, n: int, _b: int, _c: int) -> None:
        codes = [c for c in self.mask(n) if c not in self.down][: max(1, len(self.codes) // 3)]
        self.down.update(codes)
        for c in codes:
            self.terms[c].disturbed_at = self.now
        self.say(f"room down: {codes}")
        self.core.terminals_unknown(codes, self.now, "room link down")
        self.handle()

    def step_room_up(self, _a: int, _b: int, _c: int) -> None:
        back, self.down = sorted(self.down), set()
        self.say(f"room up: {back}")
        for c in back:  # the room's terminals are heard again
            t = self.terms[c]
            if t.online:
                self.send(TerminalPresence(c, Liveness.ONLINE, t.session, heartbeat=True), self.now)

    def step_sweep(self, n: int, _b: int, _c: int) -> None:
        gone = self.core.sweep(self.now, 5.0 + n % 60)
        for c in gone:
            self.terms[c].disturbed_at = self.now
        self.say(f"sweep: {gone}")
        self.handle()

    def step_restart(self, downtime: int, _b: int, _c: int) -> None:
        """The daemon dies and is rebuilt from its journal; messages sent meanwhile are lost."""
        before = snapshot(self.core)
        target = self.now + downtime % 300 / 100
        while self.net and self.net[0][0] <= target:
            heapq.heappop(self.net)
        for t in self.terms.values():
            if t.online:
                self.catch_up(t, target)
        while self.net and self.net[0][0] <= target:  # done reports of the downtime, lost too
            heapq.heappop(self.net)
        self.now = target
        self.restarts += 1
        self.core = self.engine(self.codes, self.policy, seed=self.restarts)
        by_alert = {alert_id: list(rows.values()) for alert_id, rows in self.journal_deliveries.items()}
        restore(self.core, self.journal_alerts.values(), by_alert, now=self.now, wall_now=self.now + WALL)
        plays = resend_in_flight(self.core)
        after = snapshot(self.core)
        if diff(before, after):
            raise self.fail("the rebuild differs:\n  " + "\n  ".join(diff(before, after)))  # 6
        self.say(f"restart: resend {plays}")
        self.handle()
        for p in plays:
            self.check_play(p)
            self.play(p)
        for t in self.terms.values():  # the terminals' next heartbeats reach the new daemon
            if t.online:
                self.send(TerminalPresence(t.code, Liveness.ONLINE, t.session, heartbeat=True), self.now)
        self.run_until(self.now)  # the new daemon's timers (time to live may have passed meanwhile)

    # -- the end of a run: heal the network and let everything finish -----------------------
    def heal(self) -> None:
        """Perfect network, every room up, every terminal reconnects; then nothing may be left."""
        self.step_no += 1
        self.perfect = True
        self.down.clear()
        for t in self.terms.values():
            self.catch_up(t, self.now)
            if not t.online:
                t.disturbed_at = self.now
            t.online = True
            t.session += 1
            self.send(TerminalPresence(t.code, Liveness.ONLINE, t.session), self.now)
        self.run_until(self.now + HEAL_S)
        self.check()
        self.check_healed()
