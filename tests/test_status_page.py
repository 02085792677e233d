"""The status page and its live feed: ``GET /`` (and ``/status``) serves one
self-contained HTML file to anybody; ``GET /admin/events`` streams the state and every
event to an admin key, and forgets a client the moment it leaves. The page itself runs
in headless chromium (Debian's, driven by selenium through its chromedriver)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import httpx
import psutil
import pytest
import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from llmux.actors.events import EventLog
from llmux.http.events import AdminEvents, Pacing, Subscription
from llmux.http.openapi import openapi_document
from llmux.runtime import Runtime
from tests.conftest import Server, fake_config, fake_model, serving, wait_until

ADMIN_KEY = "sk-status-admin-0123456789"
USER_KEY = "sk-status-user-0123456789"
KEYS = {"keys": [{"name": "operator", "key": ADMIN_KEY, "admin": True},
                 {"name": "user", "key": USER_KEY}]}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# 400 MB: "small" (est. 200 MB) and "big" (est. 300 MB) do not fit together.
CONFIG: dict[str, Any] = {
    "devices": {"cpu": {"capacity": "400MB"}},
    **fake_config(small=fake_model(), big=fake_model(footprint="250MB")
                  | {"estimated_vram": "300MB"}),
}
PAGE = (files("llmux.http") / "static" / "status.html").read_text(encoding="utf-8")
Sse = tuple[str, str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(json.loads(json.dumps(CONFIG)), tmp_path_factory.mktemp("status"),
                 keys=KEYS, admin_key=ADMIN_KEY) as server:
        yield server


def sse_events(lines: Iterator[str]) -> Iterator[Sse]:
    """(event name, data) for each event of an SSE body; comments are skipped."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))


def subscribers(server: Server) -> int:
    count: int = server.state()["event_subscribers"]
    return count


def chat(server: Server, model: str) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text


def read_until(events: Iterator[Sse], wanted: Any, what: str, limit: int = 300) -> list[Sse]:
    """Events up to and including the first for which ``wanted(name, data)`` holds."""
    seen: list[Sse] = []
    for name, data in events:
        seen.append((name, data))
        if wanted(name, json.loads(data)):
            return seen
        assert len(seen) < limit, f"no {what} in {seen}"
    raise AssertionError(f"the stream ended before {what}: {seen}")


# -- the page ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/status"])
def test_the_page_is_served_to_anybody_as_html(server: Server, path: str) -> None:
    response = httpx.get(f"{server.url}{path}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == PAGE
    assert "<title>llmux status</title>" in response.text


def test_the_page_loads_nothing_from_anywhere() -> None:
    assert "http://" not in PAGE and "https://" not in PAGE
    assert not re.search(r"<script[^>]*\bsrc\s*=", PAGE, re.IGNORECASE)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?!data:)[^"'\s>]""", PAGE,
                         re.IGNORECASE)
    assert "@import" not in PAGE and "url(" not in PAGE
    assert ".innerHTML" not in PAGE and "insertAdjacentHTML" not in PAGE


def test_the_page_may_run_only_its_own_inline_blocks(server: Server) -> None:
    policy = httpx.get(f"{server.url}/status").headers["content-security-policy"]
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    blocks = re.findall(r"<(script|style)>(.*?)</\1>", PAGE, re.DOTALL)
    assert len(blocks) == 3

    def digest(body: str) -> str:
        return f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"

    assert directives["script-src"] == " ".join(digest(b) for t, b in blocks if t == "script")
    assert directives["style-src"] == " ".join(digest(b) for t, b in blocks if t == "style")
    assert directives["default-src"] == "'none'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"


def test_the_document_describes_the_page_as_html_and_the_feed_as_sse() -> None:
    paths = openapi_document("1")["paths"]
    for path in ("/", "/status"):
        assert set(paths[path]["get"]["responses"]["200"]["content"]) == {"text/html"}
    assert set(paths["/admin/events"]["get"]["responses"]["200"]["content"]) == {
        "text/event-stream"}


# -- the pure parts of the page, under node ----------------------------------------------

NODE_HARNESS = r"""
const sample = 'event: state\ndata: {"a": 1}\n\n: keep-alive\n\n' +
  'event: event\r\ndata: line1\r\ndata:line2\r\n\r\nid: 7\ndata: plain\n\nevent: x\ndata\n\n' +
  'data: unfinished';
const whole = createSSEParser()(sample);
let splitsAgree = true;
for (let i = 0; i <= sample.length; i++) {
  for (let j = i; j <= sample.length; j += 3) {
    const feed = createSSEParser();
    const got = [sample.slice(0, i), sample.slice(i, j), sample.slice(j)].flatMap(feed);
    if (JSON.stringify(got) !== JSON.stringify(whole)) splitsAgree = false;
  }
}
const device = {free_bytes: 100e6, ledger: [
  {model: "a", bytes: 150e6, measured: true, residency: "loaded"},
  {model: "b", bytes: 150e6, measured: false, residency: "loading"}]};
const full = {free_bytes: -50e6, ledger: [
  {model: "a", bytes: 450e6, measured: false, residency: "loaded"}]};
console.log(JSON.stringify({
  whole, splitsAgree,
  segments: deviceSegments(device, [{id: "a", estimated_bytes: 200e6}]),
  overfull: deviceSegments(full, []).map((s) => [s.kind, s.percent]),
  bytes: [formatBytes(150e6), formatBytes(4.06e9), formatBytes(null)],
  ago: [formatAgo(null), formatAgo(0.2), formatAgo(12.7), formatAgo(600), formatAgo(7380)],
}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_pages_parser_and_helpers_under_node(tmp_path: Path) -> None:
    pure = re.findall(r"<script>(.*?)</script>", PAGE, re.DOTALL)[0]
    assert "document" not in pure and "fetch(" not in pure
    script = tmp_path / "harness.js"
    script.write_text(pure + NODE_HARNESS)
    run = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=30,
                         check=True)
    result = json.loads(run.stdout)
    assert result["whole"] == [
        {"event": "state", "data": '{"a": 1}'},
        {"event": "event", "data": "line1\nline2"},
        {"event": "message", "data": "plain"},
        {"event": "x", "data": ""},
    ]
    assert result["splitsAgree"] is True
    assert [(s["model"], s["kind"], s["estimate"], round(s["percent"], 3))
            for s in result["segments"]] == [
        ("a", "measured", 200e6, 37.5), ("b", "reserved", None, 37.5), (None, "free", None, 25)]
    assert result["overfull"] == [["estimated", 100], ["free", 0]]
    assert result["bytes"] == ["150 MB", "4.1 GB", "?"]
    assert result["ago"] == ["never", "just now", "12 s ago", "10 min ago", "2 h 3 min ago"]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_asks_for_the_key_then_shows_a_load_live_and_unloads(
        server: Server, tmp_path: Path) -> None:
    """The page's own scripts under node, with a minimal DOM, against the live server:
    a wrong key shows the server's error, the right one opens the feed, a load shows
    without a reload, the Unload button asks, then unloads."""
    driver = (Path(__file__).parent / "data" / "status_page_driver.js").read_text()
    script = tmp_path / "page.js"
    script.write_text("\n".join([driver, *re.findall(r"<script>(.*?)</script>", PAGE,
                                                      re.DOTALL), "scenario();"]))
    run = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60,
                         env={"LLMUX_URL": server.url, "LLMUX_ADMIN_KEY": ADMIN_KEY,
                              "LLMUX_FIRST_KEY": "sk-wrong-0123456789", "PATH": "/usr/bin"})
    steps = {s["step"]: s["page"] for s in map(json.loads, run.stdout.splitlines())
             if "step" in s}
    assert run.returncode == 0, (run.stdout, run.stderr)
    asked = steps["the key form shows the error"]
    assert (asked["conn"], asked["loginError"]) == ("admin key needed",
                                                    "The API key is not valid.")
    loaded = steps["small loaded"]
    assert re.search(r"small: \d+ MB measured, estimated 200 MB", loaded["devices"]), loaded
    assert "small transition unloaded \u2192 loading granted by the arbiter" in loaded["events"]
    assert loaded["models"]["small"][:3] == ["smallsmall", "llm / fake", "cpu"]
    unloaded = steps["small unloaded"]
    assert unloaded["confirmed"] == ["Unload small?"]
    assert unloaded["notice"] == "Unload small: accepted"
    assert "small transition ready \u2192 unloading unloaded by an admin" in unloaded["events"]


# -- the page in a real browser -----------------------------------------------------------

# Root in a container, and no network: no sandbox, no GPU, nothing fetched on start.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1280,1000"]
WAIT_S = 30  # per step; the machine is shared, a step normally takes well under 1 s
# "alpha" and "beta" (est. 300 MB each) do not fit together in 400 MB.
SWAP_CONFIG: dict[str, Any] = {
    "devices": {"cpu": {"capacity": "400MB"}},
    "policy": {"min_residency_s": 0},
    **fake_config(alpha=fake_model(footprint="250MB") | {"estimated_vram": "300MB"},
                  beta=fake_model(footprint="250MB") | {"estimated_vram": "300MB"}),
}
# What the page shows, read in one go (the page redraws whole tables: elements found one
# by one could go stale in between).
READ_PAGE = """
const text = (id) => document.getElementById(id).textContent;
const shown = (id) => document.getElementById(id).checkVisibility();
const models = {};
for (const row of document.querySelectorAll("#models tr")) {
  models[row.cells[0].querySelector("b").textContent] = row.cells[3].textContent.trim();
}
return {
  conn: text("conn"), login: shown("login"), loginMessage: text("login-message"),
  loginError: shown("login-error") ? text("login-error") : "", main: shown("main"),
  models,
  events: [...document.querySelectorAll("#events li")].map((li) => li.textContent),
  bars: [...document.querySelectorAll("#devices .card")].map((card) =>
    [...card.querySelectorAll(".bar .seg")].map((seg) => seg.title)),
  marker: window.llmuxTestMarker || null,
  storedKey: sessionStorage.getItem("llmux.adminKey"),
};
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromedriver are not installed: `make setup` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver: selenium then never looks for (downloads) one of its own.
    service = ChromeService(executable_path=driver,
                            log_output=str(tmp_path / "chromedriver.log"))
    chrome = webdriver.Chrome(options=options, service=service)
    chrome.set_page_load_timeout(WAIT_S)
    chrome.set_script_timeout(WAIT_S)
    try:
        yield chrome
    finally:
        chrome.quit()


def read_page(browser: WebDriver) -> dict[str, Any]:
    page: dict[str, Any] = browser.execute_script(READ_PAGE)
    return page


def wait_for(browser: WebDriver, what: str, predicate: Any) -> dict[str, Any]:
    """The page once ``predicate(page)`` holds; on a time-out, what it showed last."""
    last: dict[str, Any] = {}

    def check(driver: WebDriver) -> dict[str, Any] | None:
        nonlocal last
        last = read_page(driver)
        return last if predicate(last) else None

    try:
        page: dict[str, Any] = WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(check)
    except Exception as exc:
        raise AssertionError(f"the page never showed {what}; it showed {last}") from exc
    return page


def log_in(browser: WebDriver, key: str) -> None:
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()


def test_the_page_in_chromium_asks_for_the_key_then_shows_a_swap_live(
        tmp_path: Path, browser: WebDriver) -> None:
    """A wrong key shows the server's error (not a blank page); the right one shows the
    models; a request to beta evicts alpha, and the page shows beta loaded, alpha's
    eviction with its reason and the memory bar of each device, without a reload."""
    keys = tmp_path / "api_keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    server = Server(json.loads(json.dumps(SWAP_CONFIG)), tmp_path, "--api-keys", str(keys),
                    admin_key=ADMIN_KEY)
    workers: list[psutil.Process] = []
    try:
        browser.get(f"{server.url}/")
        asked = wait_for(browser, "the key form", lambda p: p["login"])
        assert asked["loginMessage"] == "This server needs its admin key."
        assert (asked["main"], asked["conn"]) == (False, "admin key needed")

        log_in(browser, "sk-wrong-0123456789")
        refused = wait_for(browser, "the refusal", lambda p: p["loginError"])
        assert refused["loginError"] == "The API key is not valid."
        assert refused["loginMessage"] == "The server refused this key."
        assert (refused["login"], refused["main"]) == (True, False)
        assert browser.save_screenshot(str(tmp_path / "status-page-refused.png"))

        log_in(browser, ADMIN_KEY)
        shown = wait_for(browser, "the models", lambda p: p["main"] and p["models"])
        assert shown["models"] == {"alpha": "unloaded", "beta": "unloaded"}
        assert (shown["login"], shown["loginError"], shown["storedKey"]) == (
            False, "", ADMIN_KEY)
        wait_for(browser, "the live feed", lambda p: p["conn"] == "live")
        browser.execute_script("window.llmuxTestMarker = 'no reload since';")

        chat(server, "alpha")
        wait_for(browser, "alpha loaded", lambda p: p["models"]["alpha"] in ("ready", "busy"))
        chat(server, "beta")
        evicted = re.compile(r"alpha evict evicted alpha \(llm\) for beta \(llm\): "
                             r"needed 300\.0 MB, free \d+\.\d MB$")
        page = wait_for(browser, "beta loaded and alpha evicted", lambda p: (
            p["models"] == {"alpha": "unloaded", "beta": "ready"}
            and any(evicted.search(e) for e in p["events"])
            and any(s.startswith("beta ") for bar in p["bars"] for s in bar)))
        assert page["marker"] == "no reload since"
        assert page["conn"] == "live"
        # A request's ready <-> busy comes on the feed marked routine: not listed.
        browser.execute_script("""
            const at = Date.now() / 1000;
            addEvent({at, model: "beta", kind: "transition", reason: "request 9 (chat)",
                      from_state: "ready", to_state: "busy", routine: true});
            addEvent({at, model: "beta", kind: "refuse", reason: "a marker event",
                      from_state: null, to_state: null, routine: false});""")
        listed = read_page(browser)["events"]
        assert any(e.endswith("beta refuse a marker event") for e in listed), listed
        assert not [e for e in listed if "request 9" in e], listed
        devices = server.state()["devices"]
        assert len(page["bars"]) == len(devices) == 1
        [bar] = page["bars"]
        assert re.fullmatch(r"beta \d+ MB \(measured\)", bar[0]), bar
        assert re.fullmatch(r"free \d+ MB \(free\)", bar[-1]), bar
        assert not any(s.startswith("alpha") for s in bar)

        screenshot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert screenshot.stat().st_size > 10_000

        # An admin action asks first, then shows the server's answer.
        unload = browser.find_element(
            By.XPATH, "//tbody[@id='models']/tr[td[1]/b='beta']//button[.='Unload']")
        unload.click()
        question = WebDriverWait(browser, WAIT_S).until(lambda d: d.switch_to.alert)
        assert question.text == "Unload beta?"
        question.accept()
        page = wait_for(browser, "beta unloaded", lambda p: p["models"]["beta"] == "unloaded")
        assert browser.find_element(By.ID, "notice").text == "Unload beta: accepted"
        assert page["marker"] == "no reload since"

        # No script error, nothing the policy blocked: only the feed's two 401s (no key
        # yet, then the wrong one).
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        unauthorized = f"{server.url}/admin/events - Failed to load resource: the server " \
                  "responded with a status of 401"
        assert [e["source"] for e in severe if e["message"].startswith(unauthorized)] == [
            "network"] * 2
        assert [e for e in severe if not e["message"].startswith(unauthorized)] == []
        workers = psutil.Process(server.proc.pid).children(recursive=True)
    finally:
        server.stop()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []


# -- the feed ------------------------------------------------------------------------------


def test_the_feed_needs_a_key_and_an_admin_one(server: Server) -> None:
    url = f"{server.url}/admin/events"
    missing = httpx.get(url)
    assert missing.status_code == 401
    assert missing.json()["error"]["message"] == ("Send your API key as "
                                                  "'Authorization: Bearer <key>'.")
    user = httpx.get(url, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert user.status_code == 403
    assert user.json()["error"]["message"] == (
        "The API key 'user' is not an admin key; /admin/events needs one.")


def test_the_feed_sends_the_state_then_each_event_and_a_fresh_state(server: Server) -> None:
    with httpx.stream("GET", f"{server.url}/admin/events", headers=ADMIN,
                      timeout=httpx.Timeout(10.0)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        events = sse_events(response.iter_lines())  # keep it: dropping it closes the stream
        name, data = next(events)
        assert name == "state"
        first = json.loads(data)
        assert {m["id"]: m["state"] for m in first["models"]} == {"small": "unloaded",
                                                                "big": "unloaded"}
        assert [d["id"] for d in first["devices"]] == ["cpu"]

        chat(server, "small")
        seen = read_until(events, lambda n, d: n == "event" and d["model"] == "small"
                          and d["to_state"] == "ready", "small becoming ready")
        assert ("small", "unloaded", "loading") in [
            (d["model"], d["from_state"], d["to_state"])
            for d in (json.loads(data) for name, data in seen if name == "event")]
        read_until(events, lambda n, d: n == "state" and any(
            m["id"] == "small" and m["state"] in ("ready", "busy") for m in d["models"]),
            "a state with small loaded")

        chat(server, "big")
        seen = read_until(events, lambda n, d: n == "event" and d["kind"] == "evict",
                          "the eviction")
        evicted = json.loads(seen[-1][1])
        assert evicted["model"] == "small"
        assert re.fullmatch(r"evicted small \(llm\) for big \(llm\): needed 300\.0 MB, "
                            r"free \d+\.\d MB", evicted["reason"]), evicted
        state = json.loads(read_until(events, lambda n, d: n == "state" and any(
            m["id"] == "big" and m["state"] in ("ready", "busy") for m in d["models"]),
            "a state with big loaded")[-1][1])
        assert [e for e in state["events"] if e["kind"] == "evict"][-1] == evicted


def test_a_client_that_leaves_is_unsubscribed(server: Server) -> None:
    baseline = subscribers(server)
    for _ in range(3):
        with httpx.stream("GET", f"{server.url}/admin/events", headers=ADMIN,
                          timeout=10) as response:
            events = sse_events(response.iter_lines())
            assert next(events)[0] == "state"
            assert subscribers(server) == baseline + 1
        wait_until(lambda: subscribers(server) == baseline, 5,
                   "the stream to unsubscribe")


def test_the_feed_ends_when_the_server_drains(tmp_path: Path) -> None:
    # NOTE: not start_server: its clean-up would also wait for the module's server.
    server = Server(fake_config(small=fake_model()), tmp_path)  # open: no keys, loopback
    try:
        with httpx.stream("GET", f"{server.url}/admin/events", timeout=10) as response:
            events = sse_events(response.iter_lines())
            assert next(events)[0] == "state"
            server.proc.send_signal(signal.SIGTERM)
            assert list(events) == []  # it ends, well before the 30 s grace period
        assert server.proc.wait(timeout=10) == 0
        assert "drained in" in server.logs()
    finally:
        server.stop()


# -- the pure parts of the feed ------------------------------------------------------------


def test_pacing_sends_a_state_after_events_at_most_every_interval() -> None:
    pacing = Pacing(last_write=0.0, last_state=0.0, state_interval_s=0.25, keepalive_s=15.0)
    assert pacing.due(0.1) is None
    assert pacing.wait_s(0.1) == pytest.approx(14.9)
    pacing.wrote(0.1, "event")
    assert pacing.due(0.1) is None
    assert pacing.wait_s(0.1) == pytest.approx(0.15)
    assert pacing.due(0.25) == "state"
    pacing.wrote(0.25, "state")
    pacing.wrote(0.3, "event")
    assert pacing.due(0.4) is None
    assert pacing.due(0.5) == "state"


def test_pacing_sends_a_keepalive_after_silence() -> None:
    pacing = Pacing(last_write=10.0, last_state=10.0, keepalive_s=15.0)
    assert pacing.due(24.9) is None
    assert pacing.due(25.0) == "keepalive"
    pacing.wrote(25.0, "comment")
    assert pacing.due(25.0) is None
    assert pacing.wait_s(26.0) == pytest.approx(14.0)


def test_pacing_owes_no_state_once_a_state_followed_the_events() -> None:
    """A state sent after events settles them: the next state waits for new events."""
    pacing = Pacing(last_write=0.0, last_state=0.0, state_interval_s=0.25, keepalive_s=15.0)
    pacing.wrote(0.1, "event")
    pacing.wrote(0.3, "state")
    assert pacing.due(1.0) is None
    assert pacing.wait_s(1.0) == pytest.approx(14.3)


def feed_on(log: EventLog, clock: Callable[[], float]) -> AdminEvents:
    """The event feed of a runtime that is only ``log``: its state counts the events."""
    runtime = SimpleNamespace(events=log, snapshot=lambda: {"events": len(list(log))})
    return AdminEvents(cast(Runtime, runtime), clock=clock)


@pytest.mark.anyio
async def test_after_a_keepalive_the_feed_waits_for_the_next_event() -> None:
    """A keep-alive comment counts as a write: the next comes after another silence."""
    log = EventLog()
    now = 0.0
    feed = feed_on(log, lambda: now)
    stream = feed.stream(Subscription(log), None)
    assert (await anext(stream)).serialize().startswith(b"event: state")
    now = 15.0
    assert (await anext(stream)).serialize() == b": keep-alive\n\n"
    log.record("m", "transition", "after the keep-alive")
    with anyio.fail_after(5):
        assert (await anext(stream)).serialize().startswith(b"event: event")
    await stream.aclose()


@pytest.mark.anyio
async def test_a_client_that_lost_every_event_still_gets_the_state_that_has_them() -> None:
    """The comment promises a state: it comes even when no event is left to send."""
    log = EventLog()
    now = 0.0
    feed = feed_on(log, lambda: now)
    stream = feed.stream(Subscription(log, buffer=0), None)
    assert (await anext(stream)).serialize() == b'event: state\ndata: {"events": 0}\n\n'
    for i in range(3):
        log.record("m", "transition", f"step {i}")  # the feed is not reading: all lost
    assert (await anext(stream)).serialize() == (
        b": dropped 3 events: the next state has them\n\n")
    now = 1.0
    with anyio.fail_after(5):
        assert (await anext(stream)).serialize() == b'event: state\ndata: {"events": 3}\n\n'
    await stream.aclose()


@pytest.mark.anyio
async def test_a_subscription_asked_after_the_drain_began_ends_at_once() -> None:
    """A drain that began between two reads ends the next one, without its timeout."""
    log = EventLog()
    subscription = Subscription(log)
    drain = anyio.Event()
    drain.set()
    with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
        await subscription.next(30.0, drain)
    assert log.subscribers == 0


@pytest.mark.anyio
async def test_a_slow_client_loses_events_instead_of_blocking_the_actors() -> None:
    log = EventLog()
    subscription = Subscription(log, buffer=2)
    for i in range(5):
        log.record("m", "transition", f"step {i}")  # returns at once: never waits
    assert subscription.dropped == 3
    received = [await subscription.next(1.0, None) for _ in range(2)]
    assert [e.reason for e in received if e is not None] == ["step 0", "step 1"]
    assert await subscription.next(0.01, None) is None
    subscription.end()
    subscription.end()
    assert log.subscribers == 0


@pytest.mark.anyio
async def test_a_client_that_fell_behind_hears_what_it_lost_then_gets_a_state() -> None:
    log = EventLog()
    now = 0.0
    feed = feed_on(log, lambda: now)
    stream = feed.stream(Subscription(log, buffer=2), None)
    assert (await anext(stream)).serialize() == b'event: state\ndata: {"events": 0}\n\n'
    for i in range(5):
        log.record("m", "transition", f"step {i}")
    assert (await anext(stream)).serialize() == (
        b": dropped 3 events: the next state has them\n\n")
    for i in range(2):
        name, data = (await anext(stream)).serialize().decode().splitlines()[:2]
        assert name == "event: event"
        assert json.loads(data.removeprefix("data: "))["reason"] == f"step {i}"
    now = 1.0
    assert (await anext(stream)).serialize() == b'event: state\ndata: {"events": 5}\n\n'
    await stream.aclose()
    assert log.subscribers == 0


@pytest.mark.anyio
async def test_a_routine_event_reaches_the_feed_but_is_not_kept() -> None:
    log = EventLog()
    subscription = Subscription(log)
    log.record("m", "transition", "loaded", from_state="loading", to_state="ready")
    for i in range(600):  # more than the log keeps: routine ones push nothing out
        log.record("m", "transition", f"request {i}", routine=True,
                   from_state="ready", to_state="busy")
    assert [e.reason for e in log] == ["loaded"]
    assert log.counts["transition"] == 601
    first, second = [await subscription.next(1.0, None) for _ in range(2)]
    assert first is not None and second is not None
    assert (first.routine, second.routine, second.reason) == (False, True, "request 0")
    assert second.to_dict()["routine"] is True  # the page skips it in its list
    subscription.end()


@pytest.mark.anyio
async def test_a_draining_server_ends_a_waiting_subscription() -> None:
    log = EventLog()
    subscription = Subscription(log)
    drain = anyio.Event()

    async def drain_soon() -> None:
        drain.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain_soon)
        with pytest.raises(anyio.EndOfStream):
            await subscription.next(30.0, drain)
    assert log.subscribers == 0
