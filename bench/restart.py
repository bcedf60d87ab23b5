#!/usr/bin/env python3
"""Recovery benchmark: kill -9 of the daemon mid-alert, then time to resumed fan-out.

Per round: a private Mosquitto, `ebcd simulate` (half the terminals acknowledge 3 s late) and
`ebcd run`; a district-wide alert; once ~half is acknowledged the daemon is SIGKILLed and
started again on the same journal. Prints, per round and as medians: seconds from the restart to
the control socket answering, to the alert being back (recovered from the journal), to the
first acknowledgement after the restart, and to the alert completing. Asserts nothing.

    python bench/restart.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ebcd.control.socket import SOCKET_NAME, ControlClient, NoDaemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ask(client: ControlClient, op: str, **args: Any) -> dict[str, Any] | None:
    try:
        answer = await client.request(op, **args)
    except (NoDaemon, OSError):
        return None
    return answer if answer.get("ok") else None


async def one_round(work: Path, config: str) -> dict[str, float]:
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
    )
    mosq = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    broker = f"mqtt://127.0.0.1:{port}"
    time.sleep(0.5)
    base = [sys.executable, "-m", "ebcd"]
    sims = subprocess.Popen(
        [
            *base,
            "simulate",
            "-c",
            config,
            "--broker",
            broker,
            "--faults",
            "slow=50%",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = work / "state"
    run = [
        *base,
        "run",
        "-c",
        config,
        "--broker",
        broker,
        "--state-dir",
        str(state),
        "--metrics-port",
        "-1",
        "--log-level",
        "warning",
    ]
    daemon = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = ControlClient(state / SOCKET_NAME)
    try:
        while not (
            (t := await ask(client, "terminals"))
            and sum(x["state"] == "online" for x in t["terminals"]) >= 760
        ):
            await asyncio.sleep(0.2)
        sent = await ask(
            client,
            "send",
            alert={
                "level": 1,
                "event_type": "11B03",
                "targets": [{"kind": "all"}],
                "text": "bench",
                "ttl_s": 600,
            },
        )
        assert sent is not None
        alert_id = sent["id"]
        while not ((s := await ask(client, "status", id=alert_id)) and s["state"]["acked"] >= 300):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        t0 = time.monotonic()
        daemon = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marks: dict[str, float] = {}
        recovered_acked = None
        while "completed" not in marks:
            s = await ask(client, "status", id=alert_id)
            now = time.monotonic() - t0
            if s is not None:
                marks.setdefault("socket", now)
                acked = s["state"]["acked"]
                if recovered_acked is None:
                    recovered_acked, marks["recovered"] = acked, now
                elif acked > recovered_acked:
                    marks.setdefault("first_ack", now)
                if s["state"]["state"] == "completed":
                    marks["completed"] = now
            await asyncio.sleep(0.02)
        return marks
    finally:
        for p in (daemon, sims):
            p.send_signal(signal.SIGTERM)
        for p in (daemon, sims):
            p.wait(30)
        mosq.terminate()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "-c", "--config", default=str(Path(__file__).resolve().parents[1] / "config" / "ebcd.toml")
    )
    opts = parser.parse_args()
    rounds = []
    for i in range(opts.rounds):
        marks = await one_round(Path(tempfile.mkdtemp(prefix=f"ebcd-restart-{i}-")), opts.config)
        rounds.append(marks)
        print("round", i + 1, "  ".join(f"{k} {v:.2f} s" for k, v in marks.items()))
    for key in ("socket", "recovered", "first_ack", "completed"):
        values = [r[key] for r in rounds if key in r]
        if values:
            print(
                f"median {key:10} {statistics.median(values):.2f} s after the restart ({len(values)} rounds)"
            )


if __name__ == "__main__":
    asyncio.run(main())
