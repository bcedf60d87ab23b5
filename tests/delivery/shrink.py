"""Running seeded workloads, and shrinking a failing one to the steps that matter (ddmin).

Every step's effect depends on its own arguments and the state only, so a failing workload
replays exactly and any sub-sequence of it is a valid workload too: `shrink` removes chunks of
steps while the same kind of failure remains, down to a 1-minimal sequence, and `explain` prints it
ready to paste into `run(...)`, with the trace of the shrunk run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from tests.delivery.invariants import Broken
from tests.delivery.sim import Scenario, Sim, Step, generate


def run(sc: Scenario, steps: Sequence[Step], *, trace: bool = False, heal: bool = True) -> Sim:
    """Run a workload; raises Broken (with the step number) when an invariant fails."""
    sim = Sim(sc, trace=trace)
    for step in steps:
        sim.do(step)
    if heal:
        sim.heal()
    return sim


Make = Callable[[Scenario], Sim]


def fails(sc: Scenario, steps: Sequence[Step], make: Make = Sim) -> tuple[str, int] | None:
    """How a workload fails (the message and the step it failed at), or None."""
    sim = make(sc)
    try:
        for step in steps:
            sim.do(step)
        sim.heal()
    except Broken as e:
        return str(e).split(": ", 1)[1], sim.step_no
    except Exception as e:  # noqa: BLE001 - a crash of the core is a failure to shrink too
        return f"{type(e).__name__}: {e}", sim.step_no
    return None


def steps_of(seed: int) -> int:
    """30 to 120 steps: short workloads reach shallow bugs fast, long ones the deep ones."""
    return 30 + seed * 7919 % 91


def run_seeds(seeds: Sequence[int]) -> tuple[Counter[str], int, int | None]:
    """Run the seeds' workloads: what happened in them, their steps, and the first seed that failed."""
    seen: Counter[str] = Counter()
    steps = 0
    for seed in seeds:
        sc, workload = generate(seed, steps_of(seed))
        sim = Sim(sc)
        try:
            for step in workload:
                sim.do(step)
            sim.heal()
        except Exception:  # noqa: BLE001 - any failure (an invariant, a crash) is the seed's
            return seen, steps, seed
        seen.update(sim.stats)
        steps += len(workload)
    return seen, steps, None


def _kind(failure: str) -> str:
    """The kind of a failure: its message without the figures that change as the workload shrinks."""
    return "".join(ch for ch in failure if not ch.isdigit())[:50]


def shrink(sc: Scenario, steps: Sequence[Step], budget: int = 2000, make: Make = Sim) -> list[Step]:
    """A 1-minimal sub-sequence of a failing workload that still fails the same way (ddmin)."""
    first = fails(sc, steps, make)
    if first is None:
        return list(steps)
    kind = _kind(first[0])
    current = list(steps[: first[1] + 1])  # what came after the failing step is not needed
    n, tries = 2, 0
    while len(current) >= 2 and tries < budget:
        chunk = math.ceil(len(current) / n)
        for i in range(0, len(current), chunk):
            candidate = current[:i] + current[i + chunk :]
            tries += 1
            got = fails(sc, candidate, make)
            if got is not None and _kind(got[0]) == kind:
                current = candidate[: got[1] + 1]
                n = max(n - 1, 2)
                break
        else:
            if chunk == 1:
                break
            n = min(n * 2, len(current))
    return current


def explain(sc: Scenario, steps: Sequence[Step], seed: int | None = None, make: Make = Sim) -> str:
    """The failure, the shortest workload that reproduces it, and the trace of that workload."""
    short = shrink(sc, steps, make=make)
    sim = make(sc)
    sim.trace = []
    failure = "no failure"
    try:
        for step in short:
            sim.do(step)
        sim.heal()
    except Exception as e:  # noqa: BLE001 - the failure is what this reports
        failure = f"{type(e).__name__}: {e}"
    lines = [
        f"seed {seed}: {failure}" if seed is not None else failure,
        f"shrunk from {len(steps)} to {len(short)} steps; replay with tests.delivery.shrink.run:",
        f"    run({sc!r}, [",
        *(f"        {s!r}," for s in short),
        "    ])",
        "trace of the shrunk run (time since start, what happened):",
        *(f"    {line}" for line in (sim.trace or [])[-120:]),
    ]
    return "\n".join(lines)
