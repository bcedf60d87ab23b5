"""An accepted alert and its deliveries, as the core keeps them, with the counts that roll up.

Plain data with derived views; only `ebcd.delivery.core` changes these, through its one door.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ebcd.delivery.records import AlertRecord, DeliveryRecord
from ebcd.delivery.state import BUCKET, EBM_STATE, ENDED, OPEN, AState, Bucket, DState, Progress
from ebcd.model.alert import AlertRequest
from ebcd.tiers.district import District
from ebcd.tiers.rollup import Tally

_BUCKET_VALUE: dict[DState, str] = {state: bucket.value for state, bucket in BUCKET.items()}

MAX_REFUSALS_KEPT = 1000  # per alert, for its report (each one is also a log line)


@dataclass(slots=True)
class Delivery:
    """The delivery of one alert to one terminal."""

    terminal: str
    state: DState = DState.PENDING
    progress: Progress | None = None
    acked: bool = False  # acknowledged in the current revision: counts as acked from now on
    finished: bool = False  # done, or stopped by ebcd, in this revision: never sent again
    resume: bool = False  # the next attempt resumes an interrupted broadcast
    attempts: int = 0  # attempts sent in this revision
    budget_base: int = 0  # `attempts` when the retry budget was last renewed (a return, a resume)
    cause: str | None = None
    due: float | None = None  # the armed timer: ack deadline (SENT), retry (UNCERTAIN), play (ACKNOWLEDGED)
    gen: int = 0  # timer generation: a heap entry of an older generation is stale
    acked_at: float | None = None
    sent_n: int = 0  # the core's send number of its latest attempt (not journalled)

    @property
    def bucket(self) -> Bucket:
        """How the delivery counts in the alert state."""
        return Bucket.ACKED if self.acked else BUCKET[self.state]

    @property
    def open(self) -> bool:
        """Not acknowledged and still with work ahead (a send, an ack timer or a retry)."""
        if self.acked:
            return False
        return self.state in OPEN or (self.state is DState.UNCERTAIN and self.due is not None)

    @property
    def holds(self) -> bool:
        """In a state that occupies the terminal: in flight, retrying, or playing."""
        if self.state is DState.SENT:
            return True
        if self.state is DState.UNCERTAIN:
            return self.due is not None
        return self.state is DState.ACKNOWLEDGED and self.due is not None

    def record(self, alert_id: str, revision: int, *, left: bool = False) -> DeliveryRecord:
        """The journal's record of this delivery."""
        return DeliveryRecord(
            alert_id=alert_id,
            terminal=self.terminal,
            revision=revision,
            state=self.state,
            progress=self.progress,
            acked=self.acked,
            finished=self.finished,
            resume=self.resume,
            attempts=self.attempts,
            budget_base=self.budget_base,
            cause=self.cause,
            retry=self.due is not None and self.state in (DState.UNCERTAIN, DState.ACKNOWLEDGED),
            left=left,
        )


def _zero_counts() -> dict[Bucket, int]:
    return dict.fromkeys(Bucket, 0)


@dataclass(slots=True)
class Alert:
    """One accepted alert and its deliveries."""

    id: str
    ebmid: str
    request: AlertRequest
    rank: tuple[int, ...]
    order: int  # acceptance order: among equals, the earlier alert keeps a terminal
    accepted_at: float  # wall clock, for people
    expires: float  # monotonic
    expires_at: float  # wall clock, for the journal
    deliveries: dict[str, Delivery] = field(default_factory=dict)
    revision: int = 1
    state: AState = AState.PENDING_APPROVAL
    closed: bool = False  # past its time to live, or ended: nothing is sent for it any more
    reason: str | None = None
    source: str = ""
    actor: str = ""
    gen: int = 0  # generation of its time-to-live timer
    counts: dict[Bucket, int] = field(default_factory=_zero_counts)
    open: int = 0  # deliveries with work ahead
    left: dict[str, Delivery] = field(default_factory=dict)  # terminals an update took out of the area
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (terminal, cause) of refusals heard
    # the roll-up by town, kept up to date from the moves between buckets since the last state
    # document (a document costs the towns and the moves, not every terminal); None until the first
    _towns: Counter[tuple[str | None, Bucket]] | None = None
    _moves: list[tuple[str, Bucket, int]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """Cancelled, expired or rejected."""
        return self.state in ENDED

    @property
    def targets(self) -> int:
        """Terminals addressed by the current revision."""
        return len(self.deliveries)

    def count(self, terminal: str, bucket: Bucket, n: int) -> None:
        """`n` (1 or -1) deliveries more in `bucket`: the core calls this for every change of bucket."""
        self.counts[bucket] += n
        if self._towns is not None:
            self._moves.append((terminal, bucket, n))

    def town_tallies(self, town_of: Mapping[str, str]) -> dict[str, Tally]:
        """How the alert stands in each town it reaches (`town_of`: terminal -> town, the same
        mapping at every call: the district's)."""
        if self._towns is None:
            self._towns = Counter((town_of.get(code), d.bucket) for code, d in self.deliveries.items())
        else:
            towns = self._towns
            for code, bucket, n in self._moves:
                towns[(town_of.get(code), bucket)] += n
        self._moves.clear()
        out: dict[str, Tally] = {}
        for (town, bucket), n in self._towns.items():
            if town is not None and n:
                out.setdefault(town, Tally()).add(bucket.value, n)
        return out

    def buckets(self) -> dict[str, str]:
        """terminal -> how it counts (acked, failed, uncertain, pending, cancelled)."""
        acked = Bucket.ACKED.value  # `d.bucket.value` inlined: this runs per terminal per state doc
        return {t: acked if d.acked else _BUCKET_VALUE[d.state] for t, d in self.deliveries.items()}

    def note_refusal(self, terminal: str, cause: str) -> None:
        """Keep a refusal for the report (the newest MAX_REFUSALS_KEPT)."""
        self.refusals.append((terminal, cause))
        del self.refusals[:-MAX_REFUSALS_KEPT]

    def record(self) -> AlertRecord:
        """The journal's record of this alert."""
        return AlertRecord(
            alert_id=self.id,
            ebmid=self.ebmid,
            request=self.request.model_dump(mode="json"),
            revision=self.revision,
            state=self.state,
            accepted_at=self.accepted_at,
            expires_at=self.expires_at,
            order=self.order,
            source=self.source,
            actor=self.actor,
            reason=self.reason,
            closed=self.closed,
        )

    def state_doc(self, district: District, now: float) -> dict[str, Any]:
        """The alert state of CONTRACT.md, as published on the state topic."""
        targets = self.targets
        towns = {
            code: {"name": district.towns[code].name, **t.as_dict()}
            for code, t in sorted(self.town_tallies(district.town_of).items())
        }
        req = self.request
        c = self.counts
        return {
            "id": self.id,
            "identifier": req.identifier,
            "sender": req.sender,
            "ebmid": self.ebmid,
            "revision": self.revision,
            "state": self.state.value,
            "ebm_state": EBM_STATE[self.state],
            "level": req.level,
            "event_type": req.event_type,
            "test": req.test,
            "text": req.text,
            "targets": targets,
            "acked": c[Bucket.ACKED],
            "failed": c[Bucket.FAILED],
            "uncertain": c[Bucket.UNCERTAIN],
            "pending": c[Bucket.PENDING],
            "cancelled": c[Bucket.CANCELLED],
            "coverage": round(c[Bucket.ACKED] / targets, 4) if targets else 0.0,
            "towns": towns,
            "accepted_at": self.accepted_at,
            "ttl_remaining_s": 0.0 if self.closed else max(0.0, round(self.expires - now, 1)),
            "closed": self.closed,
            "reason": self.reason,
        }
