#!/usr/bin/env python3
"""EBD benchmark: a city platform's POST of an EBM to coverage 1.0 reported up, for the shipped district.

Starts a private Mosquitto, `ebcd simulate` and `ebcd run` (with `[ebd]`) as separate processes, as
deployed, and a simulated city platform in this process. Per run: the city POSTs a district-wide
EBM (signed SM2, as the field signs); timed are the answer (EBDResponse) and the EBMStateResponse
that says CoverageRate 1.0000 arriving at the city. Baseline in the same run, on the same daemon:
the same district-wide alert sent through the control socket and watched to 769 acknowledgements
(the fan-out alone, no EBD). Prints figures; asserts nothing.

    python bench/ebd.py [--runs 5] [--report-interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fanout import free_port, send_until_all_acked, wait_socket

from ebcd.config import load_config, shipped_config_path
from ebcd.control.socket import SOCKET_NAME, ControlClient
from ebcd.protocols.ebd.signature import public_pem
from ebcd.tiers.loader import load_district
from simulators.city_platform import BENCH_CITY_CODE, CityPlatform, bench_city_signer, ebcd_keys


def covered(city: CityPlatform, ebmid: str) -> bool:
    return any(g.body.get("Coverage", {}).get("CoverageRate") == "1.0000" for g in city.states_of(ebmid))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--report-interval", type=float, default=1.0, help="[ebd] report_interval_s")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ebcd-bench-ebd-"))
    shipped = shipped_config_path().parent
    for name in ("rooms.csv", "terminals.csv"):
        shutil.copy(shipped / name, work / name)
    (work / "city.pem").write_bytes(public_pem(bench_city_signer().key.public_key()))
    city_port, ebd_port, mqtt_port = free_port(), free_port(), free_port()
    toml = (shipped / "ebcd.toml").read_text(encoding="utf-8") + (
        f'\n[ebd]\nlisten = "127.0.0.1:{ebd_port}"\nupstream_url = "http://127.0.0.1:{city_port}/ebd"\n'
        f'upstream_code = "{BENCH_CITY_CODE}"\nverify_with = ["city.pem"]\n'
        f"report_interval_s = {opts.report_interval}\n"
    )
    config_path = work / "ebcd.toml"
    config_path.write_text(toml, encoding="utf-8")
    config = load_config(config_path)
    district = load_district(config)
    (work / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\n"
    )
    mosq = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    broker = f"mqtt://127.0.0.1:{mqtt_port}"
    sims = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ebcd",
            "simulate",
            "-c",
            str(config_path),
            "--broker",
            broker,
            "--play-time",
            "0.2",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "sim.log").open("ab"),
    )
    state = work / "state"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ebcd",
            "run",
            "-c",
            str(config_path),
            "--broker",
            broker,
            "--state-dir",
            str(state),
            "--metrics-port",
            "-1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "daemon.log").open("ab"),
    )
    city = CityPlatform(
        code=BENCH_CITY_CODE,
        signer=bench_city_signer(),
        district_code=district.code,
        ebcd_keys=ebcd_keys(config),
        to_url=f"http://127.0.0.1:{ebd_port}/ebd",
    )
    await city.start("127.0.0.1", city_port)
    ebd_times, answer_times, base_times = [], [], []
    try:
        client = ControlClient(state / SOCKET_NAME)
        await wait_socket(client, len(district))
        for _ in range(opts.runs):
            ebm = city.ebm(areas=[district.area], level=4, event="00000", title="测试", msg_type=3)
            t0 = time.perf_counter()
            code, desc = await city.send(ebm)
            answer_times.append(time.perf_counter() - t0)
            if code != 1:
                raise SystemExit(f"the EBM was refused: {code} {desc}")
            await city.wait(lambda ebm=ebm: covered(city, ebm.ebmid), 120)
            ebd_times.append(time.perf_counter() - t0)
            await asyncio.sleep(1.5)  # its 'done' reports pass

            t0 = time.perf_counter()
            await send_until_all_acked(client, len(district))
            base_times.append(time.perf_counter() - t0)
            await asyncio.sleep(1.5)
    finally:
        await city.down()
        for p in (daemon, sims):
            p.send_signal(signal.SIGTERM)
        for p in (daemon, sims):
            p.wait(30)
        mosq.terminate()
    ebd, base = statistics.median(ebd_times), statistics.median(base_times)
    print(
        f"{len(district)} terminals, {opts.runs} runs, report_interval_s {opts.report_interval}, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'path':52} {'median s':>9} {'min s':>7} {'max s':>7} {'time/base':>9}")
    rows = {
        "EBD POST -> EBDResponse answer": answer_times,
        "EBD POST -> CoverageRate 1.0000 at the city": ebd_times,
        "control socket send -> 769 acks (baseline)": base_times,
    }
    for name, t in rows.items():
        print(
            f"{name:52} {statistics.median(t):9.3f} {min(t):7.3f} {max(t):7.3f} "
            f"{statistics.median(t) / base:9.2f}"
        )
    print(json.dumps({"ebd_median_s": ebd, "baseline_median_s": base}))


if __name__ == "__main__":
    asyncio.run(main())
