"""Guarantee 9: "No silent reloads. A request whose settings fit the loaded
configuration is served as loaded; a reload for settings is an explicit, logged,
counted event."

llmux has no per-request load settings: virtual models and sampling parameters are
applied per request in the loaded worker, so no request can cause a reload.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import fake_model
from tests.guarantees.common import chat, transitions_to

CONFIG = {
    "physical_models": {"phys": fake_model()},
    "virtual_models": {
        "quick": {"physical": "phys", "enable_thinking": False,
                  "sampling": {"temperature": 0.2, "max_tokens": 50}},
        "deep": {"physical": "phys", "enable_thinking": True,
                 "system_prompt_prefix": "Reasoning: high", "sampling": {"top_p": 0.9}},
    },
}


def test_requests_with_other_settings_are_served_by_the_loaded_worker(
    start_server: Any,
) -> None:
    server = start_server(CONFIG)
    assert chat(server, "quick").status_code == 200
    pid = server.model("phys")["pid"]
    variants: list[tuple[str, dict[str, Any]]] = [
        ("deep", {}), ("quick", {"temperature": 1.5, "top_p": 0.5}),
        ("deep", {"max_tokens": 3, "seed": 7}), ("quick", {"stop": ["x"], "n": 1}),
        ("deep", {"reasoning_effort": "low", "presence_penalty": 1.0}),
    ]
    for model, settings in variants:
        assert chat(server, model, **settings).status_code == 200, (model, settings)
    body = {"model": "deep", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=30) as response:
        assert response.status_code == 200
        assert list(response.iter_lines())[-2] == "data: [DONE]"
    phys = server.model("phys")
    assert phys["load_count"] == 1 and phys["pid"] == pid
    assert transitions_to(server, "phys", "loading") == 1
