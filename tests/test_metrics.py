"""``GET /metrics``: the reason mapping and label bounding as tables, then a live server
with fake models driven by httpx, scraped and parsed with ``prometheus_client.parser``:
each counter moved by exactly what happened, the gauges equal ``/admin/state``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmux.actors.events import EventLog
from llmux.actors.messages import Finished, Piece, Started, Status
from llmux.config import parse_config
from llmux.metrics import (
    EVICT_REASONS,
    KILL_REASONS,
    UNLOAD_REASONS,
    JobWatch,
    Metrics,
    bounded,
    evict_reason,
    kill_reason,
    unload_reason,
)
from tests.conftest import Server, fake_model, live_workers, wait_until

ADMIN_KEY = "sk-metrics-admin-0123456789"
ALICE_KEY = "sk-metrics-alice-abcdefghij"
WRONG_KEY = "sk-metrics-wrong-zyxwvutsrq"
KEYS = {"keys": [{"name": "ops", "key": ADMIN_KEY, "admin": True},
                 {"name": "alice", "key": ALICE_KEY}]}
CHAT = "/v1/chat/completions"
CRASH_AFTER = 40

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- pure: reasons and labels -----------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), [
    ("evicted m-a (llm) for m-b (llm): needed 0.2 GB, free 0.1 GB", "evicted"),
    ("evicted m-a (llm) for m-b (llm): exclusive group 'llm'; finishing the running "
     "request", "evicted"),
    ("idle for 300 s", "idle"),
    ("idle for 5 s; finishing the running request", "idle"),
    ("unloaded by an admin", "admin"),
    ("unloaded by an admin; finishing the running request", "admin"),
    ("moving to cpu", "moved"),
    ("moving to cuda:0; finishing the running request", "moved"),
    ("worker died: fake-chat exited and was killed by SIGKILL", "crash"),
    ("something new", "other"),
])
def test_unload_reasons_map_to_a_fixed_set(text: str, reason: str) -> None:
    assert unload_reason(text) == reason
    assert reason in UNLOAD_REASONS


def test_evictions_are_for_room_or_for_an_exclusive_group() -> None:
    assert evict_reason("evicted a (llm) for b (llm): needed 4.0 GB, free 1.2 GB") == \
        "make_room"
    assert evict_reason("evicted a (tts) for b (tts): exclusive group 'tts'") == \
        "exclusive_group"
    assert set(EVICT_REASONS) == {"make_room", "exclusive_group"}


def test_kills_say_what_the_worker_ignored() -> None:
    assert kill_reason("worker ignored cancel past the request deadline: SIGKILL") == \
        "ignored_cancel"
    assert kill_reason("worker ignored unload and was killed by SIGTERM") == "ignored_unload"
    assert kill_reason("???") == "other"
    assert set(KILL_REASONS) == {"ignored_cancel", "ignored_unload", "other"}


def test_a_label_is_a_configured_name_or_the_default() -> None:
    assert bounded("chat", {"chat", "tts"}) == "chat"
    assert bounded("../../etc/passwd", {"chat"}) == ""
    assert bounded(None, {"chat"}) == ""
    assert bounded("x" * 10_000, {"chat"}, "unknown") == "unknown"


def unit_metrics() -> tuple[Metrics, EventLog]:
    config = parse_config({
        "physical_models": {"llm": fake_model(), "voice": fake_model() | {"type": "tts"}},
        "virtual_models": {"chat": {"physical": "llm"}, "tts": {"physical": "voice"}},
    })
    events = EventLog()
    snapshot: dict[str, Any] = {"devices": [], "models": []}
    return Metrics(config, events, lambda: snapshot), events


def samples(metrics: Metrics) -> Samples:
    return parse(metrics.exposition().decode())


def test_request_labels_are_bounded_to_configured_models() -> None:
    metrics, _ = unit_metrics()
    metrics.observe_request(route=CHAT, model="no-such-model", status=404, key="alice",
                            seconds=0.1)
    metrics.observe_request(route=CHAT, model="chat", status=200, key="", seconds=0.2)
    got = samples(metrics)
    assert value(got, "llmux_requests_total", route=CHAT, model="", status="404",
                 key="alice") == 1
    assert value(got, "llmux_requests_total", route=CHAT, model="chat", status="200",
                 key="none") == 1
    assert value(got, "llmux_request_duration_seconds_count", route=CHAT, model="chat") == 1


def transition(events: EventLog, model: str, origin: str, to: str, reason: str) -> None:
    events.record(model, "transition", reason, from_state=origin, to_state=to)


def test_lifecycle_events_count_loads_unloads_evictions_crashes_and_kills() -> None:
    metrics, events = unit_metrics()
    transition(events, "llm", "unloaded", "loading", "granted by the arbiter")
    transition(events, "llm", "loading", "ready", "worker 1 loaded and warmed up")
    events.record("llm", "evict", "evicted llm (llm) for voice (tts): needed 1 GB, free 0 GB")
    transition(events, "llm", "ready", "busy", "request 1 (chat)")
    transition(events, "llm", "busy", "draining", "evicted llm (llm) for voice (tts): "
               "needed 1 GB, free 0 GB; finishing the running request")
    transition(events, "llm", "draining", "unloading", "drained")
    transition(events, "llm", "unloading", "unloaded", "worker exited")
    transition(events, "voice", "unloaded", "loading", "granted by the arbiter")
    transition(events, "voice", "loading", "failed", "load failed: boom; retry in 1 s")
    transition(events, "voice", "failed", "loading", "granted by the arbiter")
    transition(events, "voice", "loading", "ready", "worker 2 loaded and warmed up")
    transition(events, "voice", "ready", "failed", "worker died: exited with code 3")
    transition(events, "voice", "failed", "loading", "granted by the arbiter")
    transition(events, "voice", "loading", "ready", "worker 3 loaded and warmed up")
    transition(events, "voice", "ready", "busy", "request 2 (speech)")
    events.record("voice", "kill", "worker ignored cancel past the request deadline: SIGKILL")
    transition(events, "voice", "busy", "failed", "worker died: was killed by SIGKILL")
    events.record("ghost", "refuse", "ghost needs 99 GB")
    got = samples(metrics)
    assert value(got, "llmux_model_loads_total", model="llm", result="loaded") == 1
    assert value(got, "llmux_model_loads_total", model="voice", result="loaded") == 2
    assert value(got, "llmux_model_loads_total", model="voice", result="failed") == 1
    assert value(got, "llmux_model_load_duration_seconds_count", model="voice") == 2
    assert value(got, "llmux_model_evictions_total", model="llm", reason="make_room") == 1
    assert value(got, "llmux_model_unloads_total", model="llm", reason="evicted") == 1
    assert value(got, "llmux_model_unloads_total", model="voice", reason="crash") == 1
    assert value(got, "llmux_model_unloads_total", model="voice", reason="killed") == 1
    assert value(got, "llmux_worker_crashes_total", model="voice") == 1
    assert value(got, "llmux_worker_kills_total", model="voice", reason="ignored_cancel") == 1
    assert value(got, "llmux_model_load_refusals_total", model="unknown") == 1


def test_a_job_watch_times_the_first_start_and_piece_and_counts_tokens() -> None:
    metrics, _ = unit_metrics()
    now = [10.0]
    watch = JobWatch(metrics, CHAT, "chat", clock=lambda: now[0])
    for at, reply in [(10.5, Status("loading")), (11.0, Started()), (11.25, Piece({})),
                      (12.0, Piece({})), (13.0, Finished({"usage": {
                          "prompt_tokens": 7, "completion_tokens": 5}}))]:
        now[0] = at
        watch(reply)
    got = samples(metrics)
    assert value(got, "llmux_queue_wait_seconds_sum", route=CHAT, model="chat") == 1.0
    assert value(got, "llmux_time_to_first_token_seconds_sum", route=CHAT,
                 model="chat") == 1.25
    assert value(got, "llmux_time_to_first_token_seconds_count", route=CHAT,
                 model="chat") == 1
    assert value(got, "llmux_input_tokens_total", model="chat") == 7
    assert value(got, "llmux_output_tokens_total", model="chat") == 5


# --- live ------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def config(**server: Any) -> dict[str, Any]:
    # One budget, two models that do not fit together: asking for the other evicts.
    # m-a's worker dies on its 41st token: a short reply is fine, a long one crashes it.
    return {
        "server": server,
        "devices": {"cpu": {"capacity": "300MB"}},
        "policy": {"min_residency_s": 0},
        "physical_models": {"m-a": fake_model(crash_after_tokens=CRASH_AFTER),
                            "m-b": fake_model()},
        "virtual_models": {"chat-a": {"physical": "m-a"}, "chat-b": {"physical": "m-b"}},
    }


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(**server: Any) -> Server:
        keys = tmp_path / "api_keys.yaml"
        keys.write_text(yaml.safe_dump(KEYS))
        started = Server(json.loads(json.dumps(config(**server))), tmp_path, "--api-keys",
                         str(keys), admin_key=ADMIN_KEY)
        servers.append(started)
        return started

    yield start
    for server in servers:
        server.stop()
    wait_until(lambda: not live_workers(), 10, "workers to exit")


def chat(server: Server, model: str, key: str = ALICE_KEY,
         content: str = "count these four words") -> httpx.Response:
    return httpx.post(f"{server.url}{CHAT}", headers=auth(key), timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": content}]})


def stream(server: Server, model: str) -> dict[str, int]:
    """A streamed chat; returns the usage its final chunk reported."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    usage: dict[str, int] = {}
    with httpx.stream("POST", f"{server.url}{CHAT}", headers=auth(ALICE_KEY), json=body,
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage["completion_tokens"] > 0
    return usage


def leave_mid_stream(server: Server, model: str) -> None:
    """Start a long streamed chat, read its first token, and hang up."""
    body = {"model": model, "stream": True,
            "messages": [{"role": "user", "content": "word " * 2000}]}  # ~10 s of tokens
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", f"{server.url}{CHAT}", headers=auth(ALICE_KEY),
                          json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content": "echo' in line or '"content":"echo' in line:
                break  # the first token came: the job is running; leave now


def total(usages: list[dict[str, int]], field: str) -> float:
    return float(sum(usage[field] for usage in usages))


def counters(got: Samples) -> Samples:
    """Every counter and histogram count (what moves when something happens)."""
    return {k: v for k, v in got.items() if k[0].endswith(("_total", "_count"))}


def moved(before: Samples, after: Samples) -> dict[tuple[str, tuple[str, ...]], float]:
    """What each counter moved by between two scrapes, zeros left out; labels as a
    tuple sorted by label name, for readable failures."""
    deltas = {}
    for key in counters(before).keys() | counters(after).keys():
        delta = after.get(key, 0.0) - before.get(key, 0.0)
        if delta:
            name, labels = key
            deltas[(name, tuple(v for _, v in sorted(labels)))] = delta
    return deltas


def test_metrics_move_by_exactly_what_happened_and_match_the_admin_state(
        keyed_server: Any) -> None:
    server = keyed_server()
    polls = 0

    def settled() -> bool:
        nonlocal polls
        polls += 1  # each one is an /admin/state request, counted too
        state = server.state()
        models = {m["id"]: (m["state"], m["in_flight"]) for m in state["models"]}
        return models == {"m-a": ("unloaded", 0), "m-b": ("ready", 0)} and \
            state["devices"][0]["reserved_bytes"] == 0

    def scrape() -> tuple[str, Samples]:
        response = httpx.get(f"{server.url}/metrics", timeout=10)  # open on loopback
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text, parse(response.text)

    _, before = scrape()
    usage_a = []
    for _ in range(2):
        reply = chat(server, "chat-a")
        assert reply.status_code == 200, reply.text
        usage_a.append(reply.json()["usage"])
    failed = chat(server, "chat-a", content="word " * 60)  # the worker dies mid-reply
    assert failed.status_code == 503, failed.text
    usage_a.append(stream(server, "chat-a"))  # loads m-a again
    assert chat(server, "no-such-model").status_code == 404
    assert chat(server, "chat-a", key=WRONG_KEY).status_code == 401
    reply = chat(server, "chat-b")  # evicts m-a: the budget holds one of them
    assert reply.status_code == 200, reply.text
    usage_b = [reply.json()["usage"]]
    leave_mid_stream(server, "chat-b")
    wait_until(lambda: '"POST /v1/chat/completions" 499 key=alice' in server.logs(), 15,
               "the request log line of the client that left")
    wait_until(settled, 15, "m-a to leave and m-b to be idle and ready")
    text, after = scrape()
    state = server.state()

    assert moved(before, after) == {
        ("llmux_requests_total", ("alice", "chat-a", CHAT, "200")): 3,
        ("llmux_requests_total", ("alice", "chat-a", CHAT, "503")): 1,
        ("llmux_requests_total", ("alice", "", CHAT, "404")): 1,
        ("llmux_requests_total", ("none", "", CHAT, "401")): 1,
        ("llmux_requests_total", ("alice", "chat-b", CHAT, "200")): 1,
        ("llmux_requests_total", ("alice", "chat-b", CHAT, "499")): 1,
        ("llmux_requests_total", ("ops", "", "/admin/state", "200")): polls,
        ("llmux_requests_total", ("none", "", "/metrics", "200")): 1,  # the first scrape
        ("llmux_request_duration_seconds_count", ("chat-a", CHAT)): 4,
        ("llmux_request_duration_seconds_count", ("", CHAT)): 2,
        ("llmux_request_duration_seconds_count", ("chat-b", CHAT)): 2,
        ("llmux_request_duration_seconds_count", ("", "/admin/state")): polls,
        ("llmux_request_duration_seconds_count", ("", "/metrics")): 1,
        # Every job that reached its model: its start and its first token (the failed
        # one crashed after CRASH_AFTER tokens; the client that left read one).
        ("llmux_queue_wait_seconds_count", ("chat-a", CHAT)): 4,
        ("llmux_queue_wait_seconds_count", ("chat-b", CHAT)): 2,
        ("llmux_time_to_first_token_seconds_count", ("chat-a", CHAT)): 4,
        ("llmux_time_to_first_token_seconds_count", ("chat-b", CHAT)): 2,
        # Tokens of finished jobs only.
        ("llmux_input_tokens_total", ("chat-a",)): total(usage_a, "prompt_tokens"),
        ("llmux_output_tokens_total", ("chat-a",)): total(usage_a, "completion_tokens"),
        ("llmux_input_tokens_total", ("chat-b",)): total(usage_b, "prompt_tokens"),
        ("llmux_output_tokens_total", ("chat-b",)): total(usage_b, "completion_tokens"),
        ("llmux_model_loads_total", ("m-a", "loaded")): 2,
        ("llmux_model_loads_total", ("m-b", "loaded")): 1,
        ("llmux_model_load_duration_seconds_count", ("m-a",)): 2,
        ("llmux_model_load_duration_seconds_count", ("m-b",)): 1,
        ("llmux_worker_crashes_total", ("m-a",)): 1,
        ("llmux_model_unloads_total", ("m-a", "crash")): 1,
        ("llmux_model_evictions_total", ("m-a", "make_room")): 1,
        ("llmux_model_unloads_total", ("m-a", "evicted")): 1,
    }

    device = state["devices"][0]
    for field in ("capacity_bytes", "used_bytes", "reserved_bytes", "free_bytes"):
        assert value(after, f"llmux_device_{field}", device="cpu") == device[field], field
    for model in state["models"]:
        one_hot = {dict(labels)["state"]: v for (name, labels), v in after.items()
                   if name == "llmux_model_state" and dict(labels)["model"] == model["id"]}
        assert one_hot[model["state"]] == 1 and sum(one_hot.values()) == 1, one_hot
        assert value(after, "llmux_model_queue_depth", model=model["id"]) == \
            model["queue_depth"]
        assert value(after, "llmux_model_in_flight", model=model["id"]) == model["in_flight"]
        assert value(after, "llmux_model_footprint_bytes", model=model["id"],
                     device="cpu") == model["footprint_bytes"]
    for secret in (ADMIN_KEY, ALICE_KEY, WRONG_KEY):
        assert secret not in text


def test_metrics_can_be_admin_only(keyed_server: Any) -> None:
    server = keyed_server(metrics="admin")
    url = f"{server.url}/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers=auth(ALICE_KEY), timeout=10).status_code == 403
    # A route's label is its template, never the path asked for; no route: "unmatched".
    assert httpx.get(f"{server.url}/v1/models/chat-a", headers=auth(ALICE_KEY),
                     timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/no/such/page", timeout=10).status_code == 404
    scrape = httpx.get(url, headers=auth(ADMIN_KEY), timeout=10)
    assert scrape.status_code == 200
    got = parse(scrape.text)
    assert value(got, "llmux_requests_total", route="/v1/models/{model_id:path}", model="",
                 status="200", key="alice") == 1
    assert value(got, "llmux_requests_total", route="unmatched", model="", status="404",
                 key="none") == 1
    assert "/v1/models/chat-a" not in scrape.text and "/no/such" not in scrape.text
    assert value(got, "llmux_requests_total", route="/metrics", model="", status="403",
                 key="alice") == 1
    assert value(got, "llmux_requests_total", route="/metrics", model="", status="401",
                 key="none") == 1
    assert ADMIN_KEY not in scrape.text and ALICE_KEY not in scrape.text


def test_a_crash_and_a_kill_are_counted_apart(start_server: Any) -> None:
    server = start_server({
        "policy": {"request_deadline_s": 2},
        "physical_models": {"crasher": fake_model(crash_after_tokens=1) | {"preload": True},
                            "hanger": fake_model(hang_after_tokens=1) | {"preload": True}},
        "virtual_models": {"crash": {"physical": "crasher"}, "hang": {"physical": "hanger"}},
    })
    wait_until(lambda: {m["state"] for m in server.state()["models"]} == {"ready"}, 15,
               "both models to preload")
    assert chat(server, "crash").status_code == 503
    assert chat(server, "hang").status_code == 503  # the deadline; the worker hangs on

    def scraped() -> Samples:
        return parse(httpx.get(f"{server.url}/metrics", timeout=10).text)

    # The hung worker ignores the cancel: it is killed CANCEL_GRACE_S after the deadline.
    wait_until(lambda: value(scraped(), "llmux_worker_kills_total", model="hanger",
                             reason="ignored_cancel") == 1, 20, "the hung worker's kill")
    wait_until(lambda: value(scraped(), "llmux_model_unloads_total", model="hanger",
                             reason="killed") == 1, 10, "the killed worker to be reaped")
    got = scraped()
    assert value(got, "llmux_worker_crashes_total", model="crasher") == 1
    assert value(got, "llmux_model_unloads_total", model="crasher", reason="crash") == 1
    assert value(got, "llmux_worker_crashes_total", model="hanger") == 0
    assert value(got, "llmux_model_state", model="hanger", state="failed") == 1
