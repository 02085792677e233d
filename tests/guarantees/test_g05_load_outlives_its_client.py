"""Guarantee 5: "A load does not belong to one client. A started load completes
(bounded by its timeout) even if the client that caused it leaves; a client that
retries with a short timeout causes exactly one load (ollama/ollama#7408)."
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import fake_config, fake_model, wait_until
from tests.guarantees.common import chat, transitions_to


def test_a_client_retrying_with_a_1s_timeout_against_a_5s_load_causes_one_load(
    start_server: Any,
) -> None:
    server = start_server(fake_config(slow=fake_model(load_time_s=5)))
    attempts, started = 0, time.monotonic()
    while True:
        attempts += 1
        try:
            reply = chat(server, "slow", timeout=1)
            break
        except httpx.TimeoutException:
            assert time.monotonic() - started < 60, "the load never completed"
    assert reply.status_code == 200, reply.text
    assert attempts >= 3, "the load was not slow enough to prove anything"
    model = server.model("slow")
    assert model["load_count"] == 1 and model["state"] == "ready"
    assert transitions_to(server, "slow", "loading") == 1


def test_a_load_completes_after_the_client_that_caused_it_left(start_server: Any) -> None:
    server = start_server(fake_config(slow=fake_model(load_time_s=2)))
    try:
        chat(server, "slow", timeout=0.5)
    except httpx.TimeoutException:
        pass
    assert server.model("slow")["state"] == "loading"
    wait_until(lambda: server.model("slow")["state"] == "ready", 30,
               "the abandoned load to complete")
    assert server.model("slow")["queue_depth"] == 0
