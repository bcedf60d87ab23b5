#!/usr/bin/env python3
"""Adapter link benchmark: the 0x49/0x50 codec's frames per second, and send to last acknowledgement.

1. Codec: a 0x04 start for one village room (5 codes, 40 characters of text) encoded (unsigned,
   Ed25519-signed, SM2-signed) and decoded (streaming decoder + body), frames per second.
   Baseline in the same run: the serial frame codec encoding and decoding a broadcast start to
   the same 5 terminals, and the bare CRC-32/MPEG-2 of the adapter frame's bytes.
2. Link: the shipped district's adapter rooms as simulated adapters on real sockets, one
   AdapterTransport and AdapterListener in the same process (as in the daemon): the time from
   send() to the last 0x12 acknowledgement (`received`) and to the last 0x18 (`playing`), median
   over N runs. Baseline in the same run: one bare TCP round trip (a frame out, a frame back) to
   each of the same simulated adapters, all at once.

    python bench/adapter.py [--runs 10]
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ebcd.config import load_config, shipped_config_path
from ebcd.metrics import Metrics
from ebcd.model.backoff import Backoff
from ebcd.protocols.adapter.address import Address, room_port_file
from ebcd.protocols.adapter.bodies import Language, StartStop, Switch, decode_body, encode_body
from ebcd.protocols.adapter.frame import Frame, FrameDecoder, encode_frame, sign_frame
from ebcd.protocols.adapter.link import AdapterLink
from ebcd.protocols.adapter.listener import AdapterListener
from ebcd.protocols.adapter.transport import AdapterTransport
from ebcd.protocols.crc import crc32_mpeg2
from ebcd.protocols.messages import AckStatus, PlayCommand, TerminalReport
from ebcd.protocols.serial import frame as serial
from ebcd.security.bench import bench_signer
from ebcd.security.signing import Signer
from ebcd.tiers.loader import load_district
from simulators.adapter import AdapterSimulator

EBMID = "43415230000000104010101202612030001"
TEXT = "山洪灾害预警：请沿河群众立即转移到安全地带，注意收听后续通知。" * 1


def rate(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Calls per second of `fn`, over about `seconds`."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return n / elapsed


def codec(codes: tuple[str, ...]) -> None:
    body = StartStop(
        EBMID, Switch.START, 4, "11A51", 2, 1_764_720_000, 1_764_723_600, 0xFF, codes, (Language(text=TEXT),)
    )
    frame = Frame(0x49, 0x04, encode_body(body))
    wire = encode_frame(frame)
    ed, sm2 = bench_signer("ed25519"), bench_signer("sm2")

    def decode() -> None:
        d = FrameDecoder()
        d.feed(wire)
        f = d.next_frame()
        assert f is not None
        decode_body(f.protocol_type, f.body)

    cmd = PlayCommand("a1", EBMID, 1, 1, 2, "11A51", TEXT, 3600.0)
    sframe = serial.Frame(codes[0], codes, serial.command_body(cmd))
    swire = serial.encode_frame(sframe)
    rows = [
        ("adapter 0x04 encode (unsigned)", rate(lambda: encode_frame(Frame(0x49, 0x04, encode_body(body))))),
        ("adapter 0x04 encode + Ed25519", rate(lambda: encode_frame(sign_frame(frame, ed, now=1)))),
        ("adapter 0x04 encode + SM2", rate(lambda: encode_frame(sign_frame(frame, sm2, now=1)), 2.0)),
        ("adapter 0x04 decode", rate(decode)),
        ("baseline: serial start encode", rate(lambda: serial.encode_frame(sframe))),
        ("baseline: serial start decode", rate(lambda: serial.decode_frame(swire))),
        ("baseline: CRC-32/MPEG-2 alone", rate(lambda: crc32_mpeg2(wire))),
    ]
    print(f"codec: 0x04 start of {len(wire)} bytes, {len(codes)} codes; serial start of {len(swire)} bytes")
    base = rows[4][1]
    for name, per_s in rows:
        print(f"  {name:<34}{per_s:>12,.0f} frames/s   {per_s / base:6.2f}x serial encode")


async def link(runs: int, signer: Signer | None, label: str) -> None:
    config = load_config(shipped_config_path())
    district = load_district(config)
    rooms = [v for v in district.villages() if v.link == "adapter"]
    terminals = [t for v in rooms for t in v.terminals]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        metrics = Metrics()
        reports: list[TerminalReport] = []
        listener_box: list[AdapterListener] = []
        links = {
            v.code: AdapterLink(
                v.code,
                Address("127.0.0.1", None, run_dir),
                backoff=Backoff(0.05, 0.5, 0.1),
                connect_timeout_s=5,
                reply_timeout_s=5,
                on_frame=lambda f: listener_box[0].handle(f),
                on_drop=lambda why: None,
            )
            for v in rooms
        }
        transport = AdapterTransport(
            links, metrics, signer=signer, on_report=reports.append, on_failed=lambda *a: None
        )
        listener = AdapterListener(
            Address("127.0.0.1", None, run_dir),
            district,
            transport,
            metrics,
            on_report=reports.append,
            on_presence=lambda p: None,
            on_unknown=lambda c, w: None,
            signer=signer,
            verifiers={},
        )
        listener_box.append(listener)
        verifier = None if signer is None else signer.verifier()
        sims = [
            AdapterSimulator(
                v.code,
                tuple(t.code for t in v.terminals),
                Address("127.0.0.1", None, run_dir),
                Address("127.0.0.1", None, run_dir),
                verifier,
                play_time_s=0.05,
            )
            for v in rooms
        ]
        tasks = [
            asyncio.create_task(listener.run()),
            *(asyncio.create_task(lk.run()) for lk in links.values()),
        ]
        await listener.ready.wait()
        for sim in sims:
            await sim.start()
        while not all(lk.connected.is_set() for lk in links.values()):
            await asyncio.sleep(0.05)
        acks, plays, bare = [], [], []
        for i in range(runs):
            reports.clear()
            cmd = PlayCommand(f"a{i}", f"{EBMID[:-4]}{i:04d}", 1, i + 1, 2, "11A51", TEXT, 3600.0)
            t0 = time.perf_counter()
            transport.send(cmd, terminals, first=True)
            t_ack = t_play = None
            while t_play is None:
                got = {r.terminal for r in reports if r.status is AckStatus.RECEIVED}
                if t_ack is None and len(got) == len(terminals):
                    t_ack = time.perf_counter() - t0
                playing = {r.terminal for r in reports if r.status is AckStatus.PLAYING}
                if len(playing) == len(terminals):
                    t_play = time.perf_counter() - t0
                await asyncio.sleep(0.001)
            acks.append(t_ack or t_play)
            plays.append(t_play)
            bare.append(await _bare_round_trips(run_dir, [v.code for v in rooms]))
            await asyncio.sleep(0.2)
        for sim in sims:
            await sim.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await transport.close()
    med_ack, med_play, med_bare = statistics.median(acks), statistics.median(plays), statistics.median(bare)
    print(
        f"link ({label}): {len(rooms)} adapters, {len(terminals)} terminals, {runs} runs\n"
        f"  send -> last 0x12 ack (received) median {med_ack * 1000:7.1f} ms  (min {min(acks) * 1000:.1f}, "
        f"max {max(acks) * 1000:.1f})  {med_ack / med_bare:5.1f}x baseline\n"
        f"  send -> last 0x18 (playing)      median {med_play * 1000:7.1f} ms  "
        f"(includes the simulators' {50} ms before reporting)\n"
        f"  baseline: one bare TCP round trip to every adapter at once: median {med_bare * 1000:.1f} ms"
    )


async def _bare_round_trips(run_dir: Path, rooms: list[str]) -> float:
    """Open a connection to each adapter, send a frame it refuses at once, read the reply."""
    junk = encode_frame(Frame(0x49, 0x3F, b"\x01"))  # a type the simulator answers with -1

    async def one(room: str) -> None:
        port = int((run_dir / room_port_file(room)).read_text())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        d = FrameDecoder(heads=(0x50,))
        writer.write(junk)
        while d.next_frame() is None:
            d.feed(await reader.read(4096))
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in rooms))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    config = load_config(shipped_config_path())
    rooms = [v for v in load_district(config).villages() if v.link == "adapter"]
    codec(tuple(t.code for t in rooms[0].terminals))
    asyncio.run(link(args.runs, bench_signer("ed25519"), "Ed25519-signed"))
    asyncio.run(link(args.runs, bench_signer("sm2"), "SM2-signed"))


if __name__ == "__main__":
    main()
