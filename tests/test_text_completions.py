"""``POST /v1/completions`` without ``max_tokens``: OpenAI's default of 16, through the
openai SDK against a live server whose fake model would otherwise write 40 tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server, fake_model, sdk_client, serving

FORTY_WORDS = " ".join(f"w{i}" for i in range(40))
CONFIG: dict[str, Any] = {
    "devices": {"cpu": {"capacity": "1GB"}},
    "physical_models": {"llm": fake_model(reply=FORTY_WORDS, tokens_per_s=0),
                        # loads for longer than the preflight: its stream begins first
                        "slow": fake_model(load_time_s=1.5, context_length=5)},
    "virtual_models": {"plain": {"physical": "llm"},
                       "capped": {"physical": "llm", "sampling": {"max_tokens": 24}},
                       "slow-loader": {"physical": "slow"}},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(json.loads(json.dumps(CONFIG)), tmp_path_factory.mktemp("cmpl")) as server:
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with sdk_client(server) as c:
        yield c


def test_a_completion_without_max_tokens_ends_after_16_tokens(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="plain", prompt="count")
    assert reply.choices[0].text == " ".join(FORTY_WORDS.split()[:16]) + " "
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_a_streamed_completion_without_max_tokens_ends_after_16_tokens(
        client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="plain", prompt="count", stream=True))
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) == 16
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_request_s_max_tokens_wins_over_the_default(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="plain", prompt="count", max_tokens=30)
    assert reply.usage is not None and reply.usage.completion_tokens == 30


def test_the_virtual_model_s_max_tokens_wins_over_the_default(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="capped", prompt="count")
    assert reply.usage is not None and reply.usage.completion_tokens == 24


def test_chat_completions_keep_no_small_default(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="plain",
                                           messages=[{"role": "user", "content": "count"}])
    assert reply.choices[0].message.content == FORTY_WORDS
    assert reply.choices[0].finish_reason == "stop"


def test_with_include_usage_every_chunk_but_the_last_has_null_usage(server: Server) -> None:
    reply = httpx.post(f"{server.url}/v1/completions", timeout=30, json={
        "model": "plain", "prompt": "count", "stream": True,
        "stream_options": {"include_usage": True}})
    datas = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(d) for d in datas[:-1]]
    assert datas[-1] == "[DONE]" and len(chunks) > 2
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(("extra", "param", "contains"), [
    ({"suffix": "end"}, "suffix", "'suffix' (fill in the middle) is not supported."),
    ({"prompt": ["a", "b"], "stream": True}, "prompt", "Streaming takes one prompt"),
    ({"prompt": ["a"] * 17}, "prompt", "'prompt' holds at most 16 items, got 17."),
    ({"prompt": []}, "prompt", "non-empty list of strings"),
    ({"prompt": None}, "prompt", "non-empty list of strings"),
    ({"n": 2}, "n", "Only n=1"), ({"logprobs": 2}, "logprobs", "not supported"),
    ({"echo": "yes"}, "echo", "must be a boolean"),
])
def test_completion_mistakes_get_a_400_naming_the_field(server: Server, extra: dict[str, Any],
                                                        param: str, contains: str) -> None:
    reply = httpx.post(f"{server.url}/v1/completions", timeout=30,
                       json={"model": "plain", "prompt": "count", **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and contains in error["message"]


def test_up_to_16_prompts_are_answered_in_order(client: openai.OpenAI) -> None:
    prompts = [f"p{i}" for i in range(16)]
    reply = client.completions.create(model="plain", prompt=prompts, max_tokens=1, echo=True)
    assert [(c.index, c.text) for c in reply.choices] == [
        (i, f"p{i}w0 ") for i in range(16)]
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_a_streamed_completion_echoes_its_prompt_first(client: openai.OpenAI) -> None:
    """With ``echo`` the stream opens with the prompt, as the whole reply does."""
    chunks = list(client.completions.create(model="plain", prompt="count: ", stream=True,
                                            echo=True, max_tokens=2))
    assert chunks[0].choices[0].text == "count: "
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "count: w0 w1 "


def test_an_error_after_the_stream_began_is_its_last_event(server: Server) -> None:
    """A cold load outlasts the preflight: the stream says it is loading, then carries
    the worker's refusal as one error event, and no ``[DONE]``."""
    reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "slow-loader", "prompt": "word " * 10, "stream": True})
    assert reply.status_code == 200
    lines = reply.text.splitlines()
    assert any(line.startswith(": loading slow") for line in lines)
    datas = [line[6:] for line in lines if line.startswith("data: ")]
    error = json.loads(datas[-1])["error"]
    assert error["code"] == "context_length_exceeded"
    assert "[DONE]" not in datas
