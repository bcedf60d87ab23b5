"""The wall screen's page: a real daemon with `[web] listen`, real HTTP, and headless Chromium.

The daemon and the simulators of 桃溪镇 run as in tests/cli (subprocesses, short timers). The
browser test loads the page, reads the DOM it built from the server-sent events, sends an alert
and reads it again: the coverage reaches 1.0 and a terminal's dot turns from its liveness colour
to acknowledged. Screenshots go to EBCD_ARTEFACTS when it is set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from ebcd.metrics import Metrics
from ebcd.tiers.district import District
from ebcd.web.server import MAX_CONNECTIONS, WebServer
from tests.cli.test_commands import (
    START_TIMEOUT_S,
    TOWN_AREA,
    TOWN_CODE,
    Cli,
    _explain,
    _poll,
    _read,
    _spawn,
    _stop,
    ask,
    fast_config_file,
)
from tests.conftest import Mosquitto, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Page:
    cli: Cli
    url: str


@pytest.fixture(scope="module")
def page(
    mosquitto: Mosquitto, district: District, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Page]:
    work = tmp_path_factory.mktemp("web")
    config = fast_config_file(work)
    port = free_port()
    config.write_text(config.read_text(encoding="utf-8") + f'\n[web]\nlisten = "127.0.0.1:{port}"\n')
    state_dir = work / "state"
    simulated = {t.code for t in district.towns[TOWN_CODE].terminals()}
    run = ["run", "-c", str(config), "--broker", mosquitto.url, "--state-dir", str(state_dir)]
    daemon = _spawn([*run, "--metrics-port", "-1"], work / "daemon.log")
    env = Cli(config, state_dir, daemon, work / "daemon.log", work / "simulate.log", simulated)
    try:
        _poll(env, "the daemon connected", lambda: '"mqtt.connected"' in _read(env.daemon_log), 30)
        assert f"http://127.0.0.1:{port}/" in _read(env.daemon_log)
        env.sims = _spawn(
            ["simulate", "-c", str(config), "--broker", mosquitto.url, "--only", f"town:{TOWN_AREA}"],
            env.sim_log,
        )

        def all_online() -> bool:
            rows = ask(env.socket, "terminals")["terminals"]
            return {r["code"] for r in rows if r["state"] == "online"} == simulated

        _poll(env, "the simulated terminals online", all_online, START_TIMEOUT_S)
        yield Page(env, f"http://127.0.0.1:{port}")
    finally:
        sims_rc = _stop(env.sims, stacks_on_usr1=True)
        daemon_rc = _stop(env.daemon)
    assert daemon_rc == 0, f"ebcd run exited {daemon_rc} on SIGTERM\n{env.logs()}"
    assert sims_rc == 0


def get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, method=method)  # noqa: S310 -- a URL this test built
    try:
        with urllib.request.urlopen(req, timeout=20) as r:  # noqa: S310
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def test_the_page_and_the_ledger_are_served_read_only(page: Page, district: District) -> None:
    status, body, kind = get(page.url + "/")
    assert (status, kind.split(";")[0]) == (200, "text/html")
    assert b"app.js" in body
    status, body, _ = get(page.url + "/ledger.json")
    ledger = json.loads(body)
    assert len(ledger["terminals"]) == len(district)
    assert {t["name"] for t in ledger["towns"]} == {t.name for t in district.towns.values()}
    for method in ("POST", "PUT", "DELETE"):
        status, body, _ = get(page.url + "/events", method)
        assert status == 405, method
    assert get(page.url + "/nothing-here")[0] == 404


def test_the_event_stream_sends_the_room_with_every_terminals_liveness(page: Page) -> None:
    req = urllib.request.Request(page.url + "/events")  # noqa: S310
    with urllib.request.urlopen(req, timeout=20) as r:  # noqa: S310
        assert r.headers["content-type"].startswith("text/event-stream")
        line = r.readline()
    doc = json.loads(line.removeprefix(b"data: "))
    online = {c for c, s in doc["liveness"].items() if s == "online"}
    assert online == page.cli.simulated
    assert "alerts" in doc["room"]


async def test_beyond_localhost_the_page_needs_a_token(district: District) -> None:
    args = {"ledger": {}, "snapshot": lambda _: {}, "watch": asyncio.Event, "unwatch": lambda _: None}
    with pytest.raises(ValueError, match="token_file"):
        WebServer("0.0.0.0", 0, token=None, metrics=Metrics(), **args)  # noqa: S104 -- refused, the point
    web = WebServer("127.0.0.1", 0, token="s3cret", metrics=Metrics(), **args)  # noqa: S106 -- a test token
    await web.start()
    try:
        base = f"http://127.0.0.1:{web.bound_port}"
        assert (await asyncio.to_thread(get, base + "/"))[0] == 401
        assert (await asyncio.to_thread(get, base + "/?token=wrong"))[0] == 401
        assert (await asyncio.to_thread(get, base + "/?token=s3cret"))[0] == 200
    finally:
        await web.close()


async def test_more_requests_than_the_bound_are_answered_busy_and_counted() -> None:
    metrics = Metrics()
    args = {"ledger": {}, "snapshot": lambda _: {}, "watch": asyncio.Event, "unwatch": lambda _: None}
    web = WebServer("127.0.0.1", 0, token=None, metrics=metrics, refresh_s=0.5, **args)
    await web.start()
    streams = []
    try:
        for _ in range(MAX_CONNECTIONS):  # event streams stay open
            reader, writer = await asyncio.open_connection("127.0.0.1", web.bound_port)
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            streams.append(writer)
        status, _body, _kind = await asyncio.to_thread(get, f"http://127.0.0.1:{web.bound_port}/")
        assert status == 503
        value = metrics.registry.get_sample_value("ebcd_dropped_messages_total", {"where": "web_connections"})
        assert value == 1.0
    finally:
        for writer in streams:
            writer.close()
        await web.close()


class Browser:
    """Headless Chromium driven over the DevTools protocol (the page keeps its event stream open,
    so a one-shot --dump-dom would never return)."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1600,1000",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().count("\n") >= 1):
            assert self.proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = active.read_text().split()[0]
        targets = json.loads(get(f"http://127.0.0.1:{port}/json/list")[1])
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = ws_connect(ws_url, max_size=None, open_timeout=30)
        self.n = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result

    def value(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, what: str, expression: str, timeout_s: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.value(expression)
            if got:
                return got
            assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


DOT = "(c => c && [c.dataset.state, c.getAttribute('fill')])(document.getElementById('t-{code}'))"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_in_a_browser_an_alert_reaches_coverage_1_and_a_dot_changes_colour(
    page: Page, tmp_path: Path
) -> None:
    code = sorted(page.cli.simulated)[0]
    where = Path(os.environ.get("EBCD_ARTEFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=page.url + "/")
        browser.wait("the page live", "document.getElementById('conn').textContent === 'live'")
        before = browser.wait("the dot of a terminal", DOT.format(code=code))
        sent = page.cli.send(f"town:{TOWN_AREA}", "--text", "墙屏测试")
        assert sent.returncode == 0, _explain(sent)
        alert_id = sent.stdout.strip()
        # the page follows the newest alert by itself; click its row as the duty officer would
        browser.wait("the alert's row", f"!!document.querySelector('tr.alert[data-id=\"{alert_id}\"]')")
        browser.value(f"document.querySelector('tr.alert[data-id=\"{alert_id}\"]').click()")
        browser.wait("coverage 1.0", "document.getElementById('coverage').dataset.value === '1'")
        assert (
            browser.value("document.getElementById('selected').textContent") == f"alert {alert_id} completed"
        )
        after = browser.wait(
            "the dot acknowledged", DOT.format(code=code) + "[0] === 'acked' && " + DOT.format(code=code)
        )
        assert after[0] == "acked"
        assert before == ["online", "#0072B2"]  # no alert yet: its liveness
        assert after[1] == "#009E73", after  # acknowledged: another colour
        browser.screenshot(where / "web-page.png")
        assert (where / "web-page.png").stat().st_size > 10_000
    finally:
        browser.close()
