"""Fault profiles for simulated terminals: which terminals misbehave, and how.

A profile is `kind=share` pairs, e.g. `offline=5%,slow=2%,refuse=1%,lose_acks=3%,flap=10%`, or a
named profile. Terminals are drawn with a seeded generator, so a profile and a seed always pick
the same terminals, and the choice is reported so tests and people can check the outcome.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Fault(StrEnum):
    """What a simulated terminal does wrong."""

    OFFLINE = "offline"  # never connects
    SLOW = "slow"  # acknowledges late
    REFUSE = "refuse"  # refuses every broadcast with a cause
    LOSE_ACKS = "lose_acks"  # loses its acknowledgements of the first copy of each command
    FLAP = "flap"  # disconnects and reconnects now and then


NAMED_PROFILES = {
    "none": "",
    "offline5": "offline=5%",
    "flaky": "offline=3%,slow=3%,refuse=1%,lose_acks=5%",
    "flapping": "flap=10%",
}


class FaultSpecError(ValueError):
    """A fault profile that cannot be read."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The fault (if any) of every terminal."""

    faults: dict[str, Fault] = field(default_factory=dict)

    def of(self, terminal: str) -> Fault | None:
        """The fault of one terminal, None if it behaves."""
        return self.faults.get(terminal)

    def terminals(self, fault: Fault) -> list[str]:
        """Terminals with this fault, sorted."""
        return sorted(t for t, f in self.faults.items() if f is fault)

    def summary(self) -> dict[str, list[str]]:
        """fault name -> terminals, for reports."""
        return {f.value: self.terminals(f) for f in Fault if self.terminals(f)}


def parse_profile(spec: str) -> dict[Fault, float]:
    """`offline=5%,slow=0.02` -> {Fault.OFFLINE: 0.05, Fault.SLOW: 0.02}."""
    spec = NAMED_PROFILES.get(spec, spec)
    shares: dict[Fault, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            fault = Fault(name.strip())
        except ValueError:
            known = ", ".join(f.value for f in Fault)
            raise FaultSpecError(
                f"unknown fault {name!r} (known: {known}; profiles: {', '.join(NAMED_PROFILES)})"
            ) from None
        if not sep:
            raise FaultSpecError(f"fault {name!r} needs a share, e.g. {name}=5%")
        try:
            share = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        except ValueError:
            raise FaultSpecError(f"fault {name!r}: share {value!r} is not a number") from None
        if not 0 <= share <= 1:
            raise FaultSpecError(f"fault {name!r}: share {value!r} is not between 0 and 100%")
        shares[fault] = share
    if sum(shares.values()) > 1:
        raise FaultSpecError("fault shares add up to more than 100%")
    return shares


def plan(terminals: Sequence[str], spec: str, seed: int = 0) -> FaultPlan:
    """Draw which terminals get which fault: round(share × count) each, without overlap."""
    shares = parse_profile(spec)
    pool = list(terminals)
    random.Random(seed).shuffle(pool)
    faults: dict[str, Fault] = {}
    i = 0
    for fault, share in shares.items():
        n = round(share * len(pool))
        for code in pool[i : i + n]:
            faults[code] = fault
        i += n
    return FaultPlan(faults)
