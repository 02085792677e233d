"""Guarantee 1: "In-flight work finishes before eviction. A victim drains its running
request; the router mode of llama.cpp kills it (ggml-org/llama.cpp#22447)."
"""

from __future__ import annotations

import threading
from typing import Any

import httpx

from tests.conftest import fake_config, fake_model, wait_until
from tests.guarantees.common import chat, events

REPLY = "word " * 30


def test_a_running_stream_finishes_whole_before_its_model_is_evicted(
    start_server: Any,
) -> None:
    server = start_server({
        "devices": {"cpu": {"capacity": "300MB"}},  # room for one model
        # a's turn ends while it streams, so the arbiter evicts it mid-request
        "policy": {"min_residency_s": 0, "max_turn_wait_s": 0.5},
        **fake_config(a=fake_model(tokens_per_s=20, reply=REPLY), b=fake_model()),
    })
    body = {"model": "a", "messages": [{"role": "user", "content": "go"}], "stream": True}
    texts: list[str] = []
    other: list[httpx.Response] = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if '"content": "word ' in line and not other:
                # a is streaming: now b wants the device, which a must leave for it
                thread = threading.Thread(target=lambda: other.append(chat(server, "b")))
                thread.start()
                wait_until(lambda: any(e["model"] == "a" for e in events(server, "evict")),
                           20, "the arbiter to evict a")
            if line:
                texts.append(line)
    thread.join(60)
    streamed = "".join(line for line in texts if '"content": "word ' in line)
    assert streamed.count("word ") == 30, "a's reply was cut by the eviction"
    assert texts[-1] == "data: [DONE]"
    assert '"finish_reason": "stop"' in "".join(texts)
    assert other[0].status_code == 200, other[0].text
    a_moves = [(e["from_state"], e["to_state"]) for e in events(server, "transition")
               if e["model"] == "a"]
    assert ("busy", "draining") in a_moves and ("draining", "unloading") in a_moves
    assert server.model("a")["jobs_cancelled"] == 0
