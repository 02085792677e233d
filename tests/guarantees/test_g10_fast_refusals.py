"""Guarantee 10: "Refusals are fast and explained. A load that could only fit by
evicting a model that may never be evicted (pinned, or of a higher class under
`strict_priority`), or that is bigger than the device, is refused at once with an
error that says why, instead of waiting out its deadline. (Waiting is for models that
are merely busy.)"
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import fake_model, wait_until
from tests.guarantees.common import chat

CONFIG = {
    "devices": {"cpu": {"capacity": "500MB"}},
    "policy": {"strict_priority": True, "request_deadline_s": 120},
    "physical_models": {
        "keeper": fake_model() | {"pinned": True},
        "ears": fake_model() | {"type": "asr", "preload": True},
        "big": fake_model() | {"estimated_vram": "250MB"},
        "huge": fake_model() | {"estimated_vram": "400MB"},
    },
    "virtual_models": {name: {"physical": name} for name in ("keeper", "ears", "big",
                                                             "huge")},
}


def refused_at_once(server: Any, model: str) -> str:
    started = time.monotonic()
    reply = chat(server, model, timeout=60)
    assert time.monotonic() - started < 3, "refused only after waiting"
    assert reply.status_code == 507, reply.text
    assert reply.json()["error"]["code"] == "insufficient_memory"
    assert reply.headers["x-should-retry"] == "false"  # the openai SDK would retry a 5xx
    message: str = reply.json()["error"]["message"]
    return message


def test_loads_that_can_never_fit_are_refused_at_once_with_the_reason(
    start_server: Any, tmp_path: Path,
) -> None:
    # huge was measured at 2 GB on an earlier run (the config's check sees only estimates)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "footprints.json").write_text(json.dumps({"huge@cpu": 2 * 10**9}))
    server = start_server(CONFIG)
    wait_until(lambda: {server.model(m)["state"] for m in ("keeper", "ears")} == {"ready"},
               30, "the pinned and preloaded models to load")
    assert refused_at_once(server, "huge") == (
        "huge (llm) needs 2.0 GB but cpu offers at most 500.0 MB")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=2)
    with client, pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="huge", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 507
    assert len([e for e in server.state()["events"]
                if e["kind"] == "refuse" and e["model"] == "huge"]) == 2  # no SDK retry
    # room only by evicting the pinned keeper or the higher-class ears (strict priority)
    message = refused_at_once(server, "big")
    assert message.startswith("big (llm) needs 250.0 MB but cpu can only ever offer ")
    assert "keeper (pinned, " in message and "ears (asr, " in message
    assert message.endswith("may not be evicted for it")
    assert {e["model"] for e in server.state()["events"] if e["kind"] == "refuse"} == \
        {"huge", "big"}
    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert sorted(health["loaded"]) == ["ears", "keeper"]
