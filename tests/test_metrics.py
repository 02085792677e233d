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
    return {
        "server": server,
        "devices": {"cpu": {"capacity": "300MB"}},
        "policy": {"min_residency_s": 0},
        "physical_models": {"m-a": fake_model(), "m-b": fake_model()},
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


def chat(server: Server, model: str, key: str = ALICE_KEY) -> httpx.Response:
    return httpx.post(f"{server.url}{CHAT}", headers=auth(key), timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "count these four words"}]})


def stream(server: Server, model: str) -> int:
    """A streamed chat; returns the completion tokens its final chunk reported."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    tokens = -1
    with httpx.stream("POST", f"{server.url}{CHAT}", headers=auth(ALICE_KEY), json=body,
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    assert tokens > 0
    return tokens


def settled(server: Server) -> bool:
    state = server.state()
    states = {m["id"]: m["state"] for m in state["models"]}
    return states == {"m-a": "unloaded", "m-b": "ready"} and \
        state["devices"][0]["reserved_bytes"] == 0


def test_metrics_count_what_happened_and_match_the_admin_state(keyed_server: Any) -> None:
    server = keyed_server()
    tokens_a = 0
    for _ in range(2):
        reply = chat(server, "chat-a")
        assert reply.status_code == 200, reply.text
        tokens_a += reply.json()["usage"]["completion_tokens"]
    tokens_a += stream(server, "chat-a")
    assert chat(server, "no-such-model").status_code == 404
    assert chat(server, "chat-a", key=WRONG_KEY).status_code == 401
    reply = chat(server, "chat-b")  # evicts m-a: the budget holds one of them
    assert reply.status_code == 200, reply.text
    tokens_b = reply.json()["usage"]["completion_tokens"]
    wait_until(lambda: settled(server), 15, "m-a to leave and m-b to be ready")

    scrape = httpx.get(f"{server.url}/metrics", timeout=10)  # open on loopback: no key
    state = server.state()
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    got = parse(text)

    requests = {dict(labels)["model"] + " " + dict(labels)["status"] + " "
                + dict(labels)["key"]: count for (name, labels), count in got.items()
                if name == "llmux_requests_total" and dict(labels)["route"] == CHAT}
    assert requests == {"chat-a 200 alice": 3, "chat-b 200 alice": 1, " 404 alice": 1,
                        " 401 none": 1}
    assert value(got, "llmux_requests_total", route="/admin/state", model="", status="200",
                 key="ops") >= 1
    for model, jobs in (("chat-a", 3), ("chat-b", 1)):
        for histogram in ("llmux_queue_wait_seconds", "llmux_time_to_first_token_seconds",
                          "llmux_request_duration_seconds"):
            assert value(got, f"{histogram}_count", route=CHAT, model=model) == jobs, \
                (histogram, model)
    assert value(got, "llmux_request_duration_seconds_count", route=CHAT, model="") == 2
    assert value(got, "llmux_output_tokens_total", model="chat-a") == tokens_a
    assert value(got, "llmux_output_tokens_total", model="chat-b") == tokens_b
    assert value(got, "llmux_input_tokens_total", model="chat-a") > 0

    for model in ("m-a", "m-b"):
        assert value(got, "llmux_model_loads_total", model=model, result="loaded") == 1
        assert value(got, "llmux_model_load_duration_seconds_count", model=model) == 1
    assert value(got, "llmux_model_evictions_total", model="m-a", reason="make_room") == 1
    assert value(got, "llmux_model_unloads_total", model="m-a", reason="evicted") == 1
    assert not [k for k in got if k[0] in ("llmux_worker_crashes_total",
                                          "llmux_worker_kills_total")]

    device = state["devices"][0]
    for field in ("capacity_bytes", "used_bytes", "reserved_bytes", "free_bytes"):
        assert value(got, f"llmux_device_{field}", device="cpu") == device[field], field
    for model in state["models"]:
        one_hot = {dict(labels)["state"]: v for (name, labels), v in got.items()
                   if name == "llmux_model_state" and dict(labels)["model"] == model["id"]}
        assert one_hot[model["state"]] == 1 and sum(one_hot.values()) == 1, one_hot
        assert value(got, "llmux_model_queue_depth", model=model["id"]) == model["queue_depth"]
        assert value(got, "llmux_model_in_flight", model=model["id"]) == model["in_flight"]
        assert value(got, "llmux_model_footprint_bytes", model=model["id"],
                     device="cpu") == model["footprint_bytes"]
    for secret in (ADMIN_KEY, ALICE_KEY, WRONG_KEY):
        assert secret not in text


def test_metrics_can_be_admin_only(keyed_server: Any) -> None:
    server = keyed_server(metrics="admin")
    url = f"{server.url}/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers=auth(ALICE_KEY), timeout=10).status_code == 403
    scrape = httpx.get(url, headers=auth(ADMIN_KEY), timeout=10)
    assert scrape.status_code == 200
    got = parse(scrape.text)
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
