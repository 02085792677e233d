"""Fuzzing with schemathesis, driven by llmux's own ``/openapi.json``, against a live
server of fake models: whatever a client sends, no 5xx, no hang, and every error is an
OpenAI-shaped JSON body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from llmux.http.openapi import openapi_document
from tests.conftest import Server, fake_model

pytestmark = pytest.mark.slow

ADMIN_KEY = "sk-fuzz-admin-0123456789"
EXAMPLES = 120  # per operation: a few thousand cases over every route


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = tmp / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"name": "fuzz-admin", "key": ADMIN_KEY,
                                          "admin": True}]}))
    config: dict[str, Any] = {
        "server": {"max_body_bytes": "256KiB", "max_upload_bytes": "256KiB"},
        "devices": {"cpu": {"capacity": "1GB"}},
        "physical_models": {
            "llm": fake_model(tool_calls=True, reasoning="hmm", context_length=400)
            | {"capabilities": ["tools", "vision"]},
            "embedder": fake_model(embedding_dim=8) | {"type": "embedding"},
            "asr": fake_model(reply="words") | {"type": "asr", "capabilities": ["translate"]},
            "voice": fake_model(sample_rate=16000) | {"type": "tts"},
            "reader": fake_model() | {"type": "ocr"},
            "forecaster": fake_model() | {"type": "forecast"},
        },
        "virtual_models": {name: {"physical": name} for name in
                           ("llm", "embedder", "asr", "voice", "reader", "forecaster")},
    }
    server = Server(config, tmp, "--api-keys", str(keys), admin_key=ADMIN_KEY)
    yield server
    server.stop()


# NOTE: schemathesis's own pytest plugin does not run under pytest 9; its strategies
# are driven by hypothesis directly, one test per operation of the document.
# /admin/events never ends by itself: a client that reads the whole body would hang.
OPERATIONS = [op for op in (result.ok() for result in schemathesis.openapi.from_dict(
    openapi_document("fuzz")).get_all_operations()) if op.path != "/admin/events"]


def assert_openai_error(response: Any) -> None:
    content_type = " ".join(response.headers.get("content-type", []))
    assert content_type.startswith("application/json"), (response.status_code,
                                                          response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method} {op.path}")
def test_no_request_gets_a_server_error(fuzz_server: Server, operation: Any) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def fuzz(case: Any) -> None:
        response = case.call(base_url=fuzz_server.url, timeout=15,
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code < 500, (case.method, case.formatted_path,
                                            response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert_openai_error(response)

    fuzz()


def test_the_fuzzed_server_still_answers(fuzz_server: Server) -> None:
    reply = httpx.get(f"{fuzz_server.url}/health", timeout=5)
    assert reply.status_code == 200
