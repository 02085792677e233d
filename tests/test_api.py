"""The OpenAI-compatible API through real clients: the ``openai`` SDK (sync and async,
streaming and not) and httpx, against one live server with fake backends and keys."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmux.audio.decode import ACCEPTED_FORMATS, decode_to_pcm, duration_s
from llmux.audio.encode import SPEECH_FORMATS
from llmux.chat.virtual import apply_virtual, template_effort
from llmux.config import VirtualModel
from tests.conftest import Server, fake_model, live_workers, wait_until
from tests.test_audio import upload

ADMIN_KEY = "sk-admin-0123456789"
FULL_KEY = "sk-full-abcdefghij"
LIMITED_KEY = "sk-limited-klmnopqr"
KEYS = {"keys": [
    {"name": "admin", "key": ADMIN_KEY, "admin": True},
    {"name": "everything", "key": "sha256:" + hashlib.sha256(FULL_KEY.encode()).hexdigest()},
    {"name": "chat-only", "key": LIMITED_KEY, "models": ["chat"]},
]}

CONFIG: dict[str, Any] = {
    "server": {"max_body_bytes": "64KiB", "max_upload_bytes": "1MB"},
    "devices": {"cpu": {"capacity": "2GB"}},
    "physical_models": {
        "tool-llm": fake_model(tool_calls=True, reasoning="thinking it over",
                               context_length=200) | {"capabilities": ["tools"]},
        "plain-llm": fake_model(reply="plain answer"),
        "slow-loader": fake_model(load_time_s=1.5, context_length=5),
        "embedder": fake_model(embedding_dim=16) | {"type": "embedding"},
        # padded as Whisper's text is (" Hello."): every format, streamed too, strips it
        "asr": fake_model(reply=" hello from the fake recogniser ")
        | {"type": "asr", "capabilities": ["translate"]},
        "asr-en": fake_model() | {"type": "asr"},
        "voice": fake_model(sample_rate=22050, tokens_per_s=0)
        | {"type": "tts", "voices": {"joe": "joe-medium", "amy": "amy-low"}},
        "slow-voice": fake_model(tokens_per_s=10, context_length=100) | {"type": "tts"},
        "looker": fake_model() | {"type": "vlm"},
    },
    "virtual_models": {
        "chat": {"physical": "tool-llm"},
        "plain": {"physical": "plain-llm"},
        "oss-high": {"physical": "plain-llm", "system_prompt_prefix": "Reasoning: high",
                     "chat_template_kwargs": {"flavour": "oss"}},
        "slow-loader": {"physical": "slow-loader"},
        "embed": {"physical": "embedder"},
        "whisper": {"physical": "asr"},
        "whisper-en": {"physical": "asr-en"},
        "tts": {"physical": "voice"},
        "slow-tts": {"physical": "slow-voice"},
        "vision": {"physical": "looker"},
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("api")
    keys = tmp / "api_keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    server = Server(json.loads(json.dumps(CONFIG)), tmp, "--api-keys", str(keys),
                    admin_key=ADMIN_KEY)
    server.keys_path = keys  # type: ignore[attr-defined]
    yield server
    server.stop()
    wait_until(lambda: not live_workers(), 10, "workers to exit")


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=FULL_KEY, max_retries=0) as c:
        yield c


def post(server: Server, path: str, key: str | None = FULL_KEY, *,
         headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", headers=auth | (headers or {}), timeout=30,
                      **kwargs)


def assert_error(response: httpx.Response, status: int, *, contains: str = "",
                 param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


USER = [{"role": "user", "content": "hello there"}]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "look a thing up",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]


# -- chat --------------------------------------------------------------------------------


def test_chat_whole_and_streamed_with_the_sync_sdk(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="plain", messages=USER, temperature=0.2,
                                           top_p=0.9, seed=7, stop=["zzz"],
                                           presence_penalty=0.1, max_completion_tokens=50)
    assert reply.choices[0].message.content == "plain answer"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    stream = client.chat.completions.create(model="plain", messages=USER, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "plain answer"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 2


@pytest.mark.anyio
async def test_chat_with_reasoning_through_the_async_sdk(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=FULL_KEY,
                                  max_retries=0) as client:
        reply = await client.chat.completions.create(model="chat", messages=USER)
        message = reply.choices[0].message
        assert message.content == "echo: hello there"
        assert message.model_extra and message.model_extra["reasoning_content"] == \
            "thinking it over"
        stream = await client.chat.completions.create(model="chat", messages=USER,
                                                      stream=True, max_tokens=4)
        reasoning, content = "", ""
        async for chunk in stream:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            finish = chunk.choices[0].finish_reason
        assert (reasoning, content, finish) == ("thinking it over", "echo: ", "length")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_round_trip_with_the_sdk(client: openai.OpenAI, stream: bool) -> None:
    messages: list[Any] = [{"role": "user", "content": "find llamas"}]
    if stream:
        calls: dict[int, dict[str, str]] = {}
        for chunk in client.chat.completions.create(model="chat", messages=messages,
                                                    tools=TOOLS, stream=True):
            for call in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += (call.function and call.function.name) or ""
                entry["arguments"] += (call.function and call.function.arguments) or ""
            finish = chunk.choices[0].finish_reason or "-"
        assert finish == "tool_calls"
        call_id, name, arguments = calls[0]["id"], calls[0]["name"], calls[0]["arguments"]
    else:
        reply = client.chat.completions.create(model="chat", messages=messages, tools=TOOLS,
                                               tool_choice="auto")
        assert reply.choices[0].finish_reason == "tool_calls"
        tool_call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
        call_id, name = tool_call.id, tool_call.function.name  # type: ignore[union-attr]
        arguments = tool_call.function.arguments  # type: ignore[union-attr]
    assert name == "lookup" and json.loads(arguments) == {"text": "find llamas"}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "llamas live in the Andes"},
    ]
    answer = client.chat.completions.create(model="chat", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == "tool said: llamas live in the Andes"


def test_tools_offered_to_a_model_without_tools_are_ignored_unless_demanded(
    server: Server, client: openai.OpenAI,
) -> None:
    reply = client.chat.completions.create(model="plain", messages=USER, tools=TOOLS)
    assert reply.choices[0].message.content == "plain answer"
    body = {"model": "plain", "messages": USER, "tools": TOOLS, "tool_choice": "required"}
    assert_error(post(server, "/v1/chat/completions", json=body), 400,
                 contains="cannot call tools", param="tool_choice")


def test_an_error_after_the_stream_started_is_one_error_event_then_the_end(
    server: Server,
) -> None:
    # cold-loading takes longer than the preflight: the 200 stream has begun when the
    # worker refuses the prompt
    body = {"model": "slow-loader", "stream": True,
            "messages": [{"role": "user", "content": "word " * 10}]}
    response = post(server, "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = response.text.splitlines()
    assert any(line.startswith(": loading slow-loader") for line in lines)
    events = [line for line in lines if line.startswith("data: ")]
    error = json.loads(events[-1][6:])["error"]
    assert error["message"].startswith("This model's maximum context length is 5 tokens; the "
                                       "prompt has 10")
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_prompt_over_the_context_is_a_400_as_openai_words_it(client: openai.OpenAI,
                                                              stream: bool) -> None:
    # agent frameworks trim their history on this code or on "maximum context length"
    client.chat.completions.create(model="chat", messages=USER)  # loaded: it refuses at once
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "word " * 300}], stream=stream)
    assert_context_refusal(caught.value, 200)


def assert_context_refusal(error: openai.BadRequestError, context: int) -> None:
    assert error.code == "context_length_exceeded"
    assert error.type == "invalid_request_error" and error.param is None
    message = typing.cast(dict[str, Any], error.body)["message"]
    assert message.startswith(f"This model's maximum context length is {context} tokens; "
                              "the prompt has ")
    assert message.endswith(". Shorten the conversation or the prompt.")


@pytest.mark.parametrize("include_usage", [False, True], ids=["finish-chunk", "usage-chunk"])
def test_a_chat_stream_sends_usage_once(client: openai.OpenAI, include_usage: bool) -> None:
    # OpenAI: with include_usage, only the last chunk (no choices) has it; without,
    # llmux puts it on the finish chunk, where Open WebUI reads it.
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    chunks = list(client.chat.completions.create(model="plain", messages=USER, stream=True,
                                                 stream_options=options))
    assert_usage_once(chunks, include_usage)


def sse_objects(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON objects of an SSE reply, in order, without ``[DONE]``."""
    assert response.status_code == 200, response.text
    datas = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


def test_with_include_usage_every_chunk_but_the_last_has_null_usage(server: Server) -> None:
    # the openai SDK's docstring: "All other chunks will also include a usage field,
    # but with a null value."
    chunks = sse_objects(post(server, "/v1/chat/completions", json={
        "model": "plain", "messages": USER, "stream": True,
        "stream_options": {"include_usage": True}}))
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_without_include_usage_only_the_finish_chunk_has_usage(server: Server) -> None:
    chunks = sse_objects(post(server, "/v1/chat/completions", json={
        "model": "plain", "messages": USER, "stream": True}))
    assert ["usage" in c for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_demanded_tool_call_streams_null_content_as_the_whole_reply_has(
        server: Server, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="chat", messages=USER, tools=TOOLS,
                                           tool_choice="required")
    strict: Any = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    with client.chat.completions.stream(model="chat", messages=USER, tools=strict,
                                        tool_choice="required") as stream:
        streamed = stream.get_final_completion()
    assert whole.choices[0].message.content is None
    assert streamed.choices[0].message.content is None
    assert streamed.choices[0].message.tool_calls


def test_a_reply_that_may_be_text_opens_with_empty_content(server: Server) -> None:
    # whether an "auto" reply calls a tool is known only once the model writes it
    chunks = sse_objects(post(server, "/v1/chat/completions", json={
        "model": "chat", "messages": USER, "stream": True, "tools": TOOLS}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_only_modalities_are_served(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="plain", messages=USER, modalities=["text"])
    assert reply.choices[0].message.content == "plain answer"


def assert_usage_once(chunks: list[Any], include_usage: bool) -> None:
    (carrier,) = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert carrier is chunks[-1] and carrier.choices == []
        assert chunks[-2].choices[0].finish_reason == "stop"
    else:
        assert carrier.choices[0].finish_reason == "stop"
    assert carrier.usage is not None and carrier.usage.completion_tokens == 2


# -- completions and embeddings ----------------------------------------------------------


def test_text_completions_whole_streamed_batched_and_echoed(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="chat", prompt="once upon", max_tokens=20)
    assert reply.choices[0].text == "echo: once upon"
    batch = client.completions.create(model="chat", prompt=["a", "b c"], echo=True)
    assert [c.text for c in batch.choices] == ["aecho: a", "b cecho: b c"]
    assert [c.index for c in batch.choices] == [0, 1]
    stream = client.completions.create(model="chat", prompt="x y", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "echo: x y"


def test_a_streamed_completion_over_the_context_is_a_400(client: openai.OpenAI) -> None:
    client.completions.create(model="chat", prompt="x")  # loaded: it refuses at once
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="chat", prompt="word " * 300, stream=True)
    assert_context_refusal(caught.value, 200)


@pytest.mark.parametrize("include_usage", [False, True], ids=["finish-chunk", "usage-chunk"])
def test_a_completion_stream_sends_usage_once(client: openai.OpenAI,
                                              include_usage: bool) -> None:
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    chunks = list(client.completions.create(model="plain", prompt="x y", stream=True,
                                            stream_options=options))
    assert_usage_once(chunks, include_usage)


def test_embeddings_in_input_order_as_floats_and_base64(client: openai.OpenAI,
                                                        server: Server) -> None:
    texts = ["alpha", "beta", "alpha"]
    floats = post(server, "/v1/embeddings", json={"model": "embed", "input": texts}).json()
    vectors = [d["embedding"] for d in floats["data"]]
    assert len(vectors) == 3 and len(vectors[0]) == 16 and vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    sdk = client.embeddings.create(model="embed", input=texts)  # the SDK asks for base64
    for got, want in zip(sdk.data, vectors, strict=True):
        assert got.embedding == pytest.approx(want, abs=1e-6)
    single = client.embeddings.create(model="embed", input="beta", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(vectors[1])
    raw = post(server, "/v1/embeddings", json={"model": "embed", "input": "beta",
                                               "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack("<16f", packed)) == pytest.approx(vectors[1], abs=1e-6)


def test_embedding_errors(server: Server) -> None:
    assert_error(post(server, "/v1/embeddings", json={"model": "embed", "input": [1, 2]}),
                 400, contains="token ids", param="input")
    assert_error(post(server, "/v1/embeddings", json={"model": "embed", "input": []}),
                 400, param="input")
    assert_error(post(server, "/v1/embeddings", json={"model": "embed", "input": "x",
                                                      "dimensions": 8}), 400,
                 contains="16 dimensions", param="dimensions")
    assert_error(post(server, "/v1/embeddings", json={"model": "plain", "input": "x"}), 400,
                 contains="cannot embed text")


# -- models ------------------------------------------------------------------------------


def test_models_list_every_virtual_model_with_llmux_fields(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == set(CONFIG["virtual_models"])
    chat = client.models.retrieve("chat")
    assert chat.owned_by == "llmux" and chat.created > 0
    extra = chat.model_extra["llmux"]  # type: ignore[index]
    assert extra["type"] == "llm" and extra["physical_model"] == "tool-llm"
    assert extra["capabilities"] == ["tools"] and isinstance(extra["loaded"], bool)
    with pytest.raises(openai.NotFoundError,
                       match="Available models: chat, embed, oss-high, plain"):
        client.models.retrieve("nope")


def test_a_limited_key_sees_and_uses_only_its_models(server: Server) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=LIMITED_KEY,
                       max_retries=0) as limited:
        assert [m.id for m in limited.models.list()] == ["chat"]
        with pytest.raises(openai.PermissionDeniedError, match="'chat-only' may not use"):
            limited.chat.completions.create(model="plain", messages=USER)
        with pytest.raises(openai.PermissionDeniedError):
            limited.embeddings.create(model="embed", input="x")
        assert limited.chat.completions.create(model="chat", messages=USER).choices


# -- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer", "Bearer sk-wrong-key"],
                         ids=["none", "basic", "empty", "wrong"])
def test_requests_without_a_valid_key_get_401(server: Server, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("GET", "/admin/state")):
        response = httpx.request(method, f"{server.url}{path}", headers=headers,
                                 json={"model": "chat", "messages": USER}, timeout=10)
        error = assert_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert error["type"] == "authentication_error"
        assert "sk-wrong-key" not in response.text


def test_admin_routes_need_an_admin_key(server: Server) -> None:
    headers = {"Authorization": f"Bearer {FULL_KEY}"}
    assert_error(httpx.get(f"{server.url}/admin/state", headers=headers), 403,
                 contains="not an admin key")
    assert_error(post(server, "/admin/models/plain/load"), 403)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(f"{server.url}/admin/state", headers=admin).status_code == 200
    assert post(server, "/admin/models/plain/unload", key=ADMIN_KEY).status_code == 202


def test_open_routes_need_no_key(server: Server) -> None:
    for path in ("/health", "/openapi.json", "/v1/audio/models", "/v1/audio/voices"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


def test_keys_are_reloaded_when_the_file_changes(server: Server) -> None:
    path: Path = server.keys_path  # type: ignore[attr-defined]
    original = path.read_text()
    new_key = "sk-added-later-xyz"
    try:
        path.write_text(yaml.safe_dump({"keys": [*KEYS["keys"],
                                                 {"name": "later", "key": new_key}]}))
        headers = {"Authorization": f"Bearer {new_key}"}
        wait_until(lambda: httpx.get(f"{server.url}/v1/models", headers=headers)
                   .status_code == 200, 5, "the new key to work")
    finally:
        path.write_text(original)
    wait_until(lambda: httpx.get(f"{server.url}/v1/models", headers=headers)
               .status_code == 401, 5, "the removed key to stop working")


def test_the_log_names_keys_and_never_shows_them(server: Server) -> None:
    post(server, "/v1/embeddings", json={"model": "embed", "input": "x"})
    post(server, "/v1/embeddings", key="sk-wrong-key", json={"model": "embed", "input": "x"})
    logs = server.logs()
    assert '"POST /v1/embeddings" 200 key=everything' in logs
    for secret in (ADMIN_KEY, FULL_KEY, LIMITED_KEY, "sk-wrong-key"):
        assert secret not in logs


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "param", "contains"), [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b"", 400, None, "empty"),
    ({"messages": USER}, 400, "model", "'model' is required"),
    ({"model": 3, "messages": USER}, 400, "model", "must be a string"),
    ({"model": "chat"}, 400, "messages", "'messages' is required"),
    ({"model": "chat", "messages": []}, 400, "messages", "at least one"),
    ({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "must be one of"),
    ({"model": "chat", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400,
     "messages[0].content[0]", "type is one of"),
    ({"model": "chat", "messages": USER, "temperature": "hot"}, 400, "temperature",
     "must be a number"),
    ({"model": "chat", "messages": USER, "temperature": 3}, 400, "temperature", "between"),
    ({"model": "chat", "messages": USER, "n": 2}, 400, "n", "Only n=1"),
    ({"model": "chat", "messages": USER, "max_tokens": 0}, 400, "max_tokens", "between"),
    ({"model": "chat", "messages": USER, "seed": 2**70}, 400, "seed", "must fit in 64 bits"),
    ({"model": "chat", "messages": USER, "stream": "yes"}, 400, "stream", "boolean"),
    ({"model": "chat", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools[0]",
     "must be"),
    ({"model": "chat", "messages": USER, "reasoning_effort": "extreme"}, 400,
     "reasoning_effort", "must be one of"),
    ({"model": "whisper", "messages": USER}, 400, "model", "cannot chat"),
    ({"model": "plain", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     400, "messages", "cannot read images"),
    ({"model": "gpt-4o", "messages": USER}, 404, "model", ""
                       "Available models: chat, embed, oss-high, plain"),
    ({"model": "chat", "messages": ["hi"]}, 400, "messages[0]", "must be an object"),
    ({"model": "chat", "messages": [{"role": "user", "content": 7}]}, 400,
     "messages[0].content", "a string or a list of parts"),
    ({"model": "chat", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text", "must be a string"),
    ({"model": "chat", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 5}}]}]}, 400,
     "messages[0].content[0].image_url", "must be a string"),
    ({"model": "vision", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "http://[example.com/cat.png"}}]}]}, 400,
     "messages[0].content[1].image_url", "is not a valid URL"),
    ({"model": "chat", "messages": USER, "stop": ""}, 400, "stop", "non-empty string"),
    ({"model": "chat", "messages": USER, "stop": ["a", 1]}, 400, "stop", "non-empty string"),
    ({"model": "chat", "messages": USER, "stop": ["s"] * 17}, 400, "stop", "at most 16"),
    ({"model": "chat", "messages": USER, "logit_bias": {"5": 101}}, 400, "logit_bias",
     "between -100 and 100"),
    ({"model": "chat", "messages": USER, "logit_bias": {"5": True}}, 400, "logit_bias",
     "between -100 and 100"),
    ({"model": "chat", "messages": USER, "logprobs": True}, 400, "logprobs",
     "not supported"),
    ({"model": "chat", "messages": USER, "top_logprobs": 3}, 400, "top_logprobs",
     "not supported"),
    ({"model": "chat", "messages": USER, "stream": True,
      "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage",
     "must be a boolean"),
    ({"model": "chat", "messages": USER, "tool_choice": "always"}, 400, "tool_choice",
     "none, auto, required"),
    ({"model": "chat", "messages": USER, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}, 400, "tool_choice",
     "not in 'tools'"),
    ({"model": "chat", "messages": USER, "tool_choice": "required"}, 400, "tool_choice",
     "'tools' is empty"),
    ({"model": "chat", "messages": USER, "response_format": {"type": "yaml"}}, 400,
     "response_format", "text, json_object or json_schema"),
    ({"model": "chat", "messages": USER, "modalities": ["text", "audio"]}, 400,
     "modalities", "llmux chat answers in text only: 'modalities' may hold only \"text\"."),
    ({"model": "chat", "messages": USER, "modalities": "audio"}, 400, "modalities",
     "must be an array"),
    ({"model": "chat", "messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, 400,
     "audio", "llmux chat answers in text only, so 'audio'"),
])
def test_bad_chat_requests_get_a_clear_error(server: Server, body: Any, status: int,
                                             param: str | None, contains: str) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    assert_error(post(server, "/v1/chat/completions", **kwargs), status, contains=contains,
                 param=param)


def test_oversized_bodies_unknown_routes_and_wrong_methods(server: Server) -> None:
    big = {"model": "chat", "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_error(post(server, "/v1/chat/completions", json=big), 413, contains="limit")
    assert_error(post(server, "/v1/nothing", json={}), 404, contains="No route")
    response = httpx.get(f"{server.url}/v1/chat/completions",
                         headers={"Authorization": f"Bearer {FULL_KEY}"})
    assert_error(response, 405, contains="GET is not allowed")
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving


# -- the OpenAPI document ------------------------------------------------------------------


def test_openapi_describes_exactly_the_served_routes(server: Server) -> None:
    from falcon import inspect

    from llmux.auth import KeyStore
    from llmux.config import parse_config
    from llmux.http.app import create_falcon_app
    from llmux.runtime import Runtime

    document = httpx.get(f"{server.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    described = {(method.upper(), path) for path, item in document["paths"].items()
                 for method in item if method in ("get", "post", "put", "delete", "patch")}

    async def served_routes() -> set[tuple[str, str]]:
        app = create_falcon_app(Runtime(parse_config(json.loads(json.dumps(CONFIG)))),
                                KeyStore(None))
        # NOTE: HEAD goes unlisted, as GET implies it (RFC 9110); OpenAPI writes
        # {model_id:path} (a name may hold a slash) as {model_id}.
        return {(method.method, re.sub(r":\w+}", "}", route.path))
                for route in inspect.inspect_routes(app)
                for method in route.methods
                if not method.internal and method.method != "HEAD"}

    assert anyio.run(served_routes) == described


# -- speech recognition ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_transcription_of_each_accepted_format_with_the_sdk(client: openai.OpenAI,
                                                            fmt: str) -> None:
    reply = client.audio.transcriptions.create(
        model="whisper", file=(f"tone.{fmt}", upload(fmt, 1.5)), response_format="verbose_json")
    assert reply.text == "hello from the fake recogniser"
    # the fake recogniser reports the duration of the samples the server decoded
    assert reply.duration == pytest.approx(1.5, abs=0.1)


def test_a_streamed_transcription_comes_as_openai_s_events(client: openai.OpenAI,
                                                          server: Server) -> None:
    """The SDK's stream=True reads SSE events; a JSON body gave it none, silently."""
    events = list(client.audio.transcriptions.create(
        model="whisper", file=("a.wav", upload("wav")), stream=True))
    assert [(e.type, getattr(e, "delta", None) or getattr(e, "text", None))
            for e in events] == [("transcript.text.delta", "hello from the fake recogniser"),
                                 ("transcript.text.done", "hello from the fake recogniser")]
    assert_error(post(server, "/v1/audio/transcriptions", files={"file": ("a.wav",
                                                                         upload("wav"))},
                      data={"model": "whisper", "stream": "true", "response_format": "srt"}),
                 400, param="response_format")


def test_open_webui_style_upload_is_detected_from_the_bytes(server: Server) -> None:
    files = {"file": ("8a4f2c1e-uuid.bin", upload("webm", 1.0), "application/octet-stream")}
    response = post(server, "/v1/audio/transcriptions", data={"model": "whisper",
                                                             "language": "en"}, files=files)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"text": "hello from the fake recogniser"}


def test_an_upload_s_media_type_is_read_in_any_case(server: Server) -> None:
    request = httpx.Request("POST", f"{server.url}/v1/audio/transcriptions",
                            headers={"Authorization": f"Bearer {FULL_KEY}"},
                            files={"file": ("a.wav", upload("wav"))}, data={"model": "whisper"})
    kind = request.headers["Content-Type"]
    request.headers["Content-Type"] = kind.replace("multipart/form-data", "Multipart/Form-Data")
    with httpx.Client(timeout=30) as client:
        response = client.send(request)
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "hello from the fake recogniser"}


def test_the_json_variant_of_transcriptions(server: Server) -> None:
    data = base64.b64encode(upload("wav", 1.0)).decode()
    response = post(server, "/v1/audio/transcriptions", json={
        "model": "whisper", "input_audio": {"data": data, "format": "wav"}})
    assert response.json() == {"text": "hello from the fake recogniser"}


@pytest.mark.parametrize(("fmt", "content_type", "expected"), [
    ("text", "text/plain", "hello from the fake recogniser\n"),
    ("srt", "text/plain", "1\n00:00:00,000 --> 00:00:01,000\nhello from the fake recogniser\n"),
    ("vtt", "text/vtt",
     "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nhello from the fake recogniser\n"),
])
def test_transcription_response_formats(server: Server, fmt: str, content_type: str,
                                        expected: str) -> None:
    files = {"file": ("a.wav", upload("wav", 1.0))}
    response = post(server, "/v1/audio/transcriptions", files=files,
                    data={"model": "whisper", "response_format": fmt})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert response.text == expected


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK deprecates translations
def test_translation_where_the_model_can_translate(client: openai.OpenAI,
                                                  server: Server) -> None:
    reply = client.audio.translations.create(model="whisper", file=("a.mp3", upload("mp3")))
    assert reply.text == "hello from the fake recogniser"
    files = {"file": ("a.mp3", upload("mp3"))}
    assert_error(post(server, "/v1/audio/translations", files=files,
                      data={"model": "whisper-en"}), 400, contains="cannot translate")


@pytest.mark.parametrize(("sent", "code"), [("en", "en"), ("EN", "en"), ("en-US", "en"),
                                            ("pt_BR", "pt"), (" de ", "de")])
def test_a_language_as_clients_send_it_is_its_code(sent: str, code: str) -> None:
    from llmux.http.transcriptions import language_code

    assert language_code(sent) == code


def test_bad_uploads_get_clear_errors(server: Server) -> None:
    def transcribe(data: bytes, **fields: str) -> httpx.Response:
        return post(server, "/v1/audio/transcriptions", files={"file": ("x.wav", data)},
                    data={"model": "whisper", **fields})

    assert_error(transcribe(b"this is not audio at all"), 400, param="file",
                 contains="Send one of: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm.")
    assert_error(transcribe(upload("wav")[:40]), 400, param="file")
    assert_error(transcribe(b"\0" * 1_100_000), 413, contains="limit")
    assert_error(transcribe(upload("wav"), response_format="docx"), 400,
                 param="response_format")
    assert_error(transcribe(upload("wav"), temperature="warm"), 400, param="temperature")
    assert_error(transcribe(upload("wav"), language="e"), 400, param="language",
                 contains="ISO-639-1")
    assert_error(transcribe(upload("wav"), **{"timestamp_granularities[]": "line"}), 400,
                 param="timestamp_granularities[]", contains="word and segment")
    assert_error(post(server, "/v1/audio/transcriptions", data={"model": "whisper"},
                      files={"other": ("x", b"1")}), 400, contains="'file' is required")
    assert_error(post(server, "/v1/audio/transcriptions", content=b"raw",
                      headers={"Content-Type": "audio/wav"}), 415)
    assert_error(post(server, "/v1/audio/transcriptions", content=b"--x--",
                      headers={"Content-Type": "multipart/form-data"}), 400)
    assert_error(post(server, "/v1/audio/transcriptions", files={"file": ("a", b"1")},
                      data={"model": "tts"}), 400, contains="cannot recognise speech")


UPLOAD_LIMIT = 1_000_000  # CONFIG's max_upload_bytes


def test_an_upload_is_refused_at_the_first_byte_over_the_limit(server: Server) -> None:
    """The Content-Length is checked before reading; without one (or within the form's
    slack) the file part is counted as it arrives; the JSON variant after decoding."""
    def transcribe(data: bytes) -> httpx.Response:
        return post(server, "/v1/audio/transcriptions", files={"file": ("x.wav", data)},
                    data={"model": "whisper"})

    assert_error(transcribe(bytes(UPLOAD_LIMIT + 70_000)), 413,
                 contains="The upload has ")
    assert_error(transcribe(bytes(UPLOAD_LIMIT + 1)), 413,
                 contains=f"The uploaded file is over the limit of {UPLOAD_LIMIT} bytes")
    assert_error(transcribe(bytes(UPLOAD_LIMIT)), 400, param="file")  # in: not audio
    data = base64.b64encode(bytes(UPLOAD_LIMIT + 1)).decode()
    assert_error(post(server, "/v1/audio/transcriptions", json={
        "model": "whisper", "input_audio": {"data": data, "format": "wav"}}), 413,
        contains=f"The audio is over the limit of {UPLOAD_LIMIT} bytes")


def test_the_json_variant_takes_base64_of_an_upload_near_the_limit(server: Server) -> None:
    audio = upload("wav", 5.0)  # 960 kB: 1.28 MB as base64
    assert len(audio) < UPLOAD_LIMIT < len(base64.b64encode(audio))
    response = post(server, "/v1/audio/transcriptions", json={
        "model": "whisper", "input_audio": {"data": base64.b64encode(audio).decode()}})
    assert response.status_code == 200, response.text


def test_transcription_fields_at_their_bounds(server: Server) -> None:
    def transcribe(**fields: str) -> httpx.Response:
        return post(server, "/v1/audio/transcriptions", files={"file": ("a.wav",
                                                                        upload("wav", 1.0))},
                    data={"model": "whisper", **fields})

    assert transcribe(temperature="1", language="yue-HK").status_code == 200
    assert_error(transcribe(temperature="1.01"), 400, param="temperature")
    assert_error(transcribe(language="abcdefghi"), 400, param="language")


def test_verbose_json_has_words_only_when_asked_and_its_language_by_name(
    server: Server,
) -> None:
    def verbose(path: str, model: str, **fields: str) -> dict[str, Any]:
        response = post(server, path, files={"file": ("a.wav", upload("wav", 1.0))},
                        data={"model": model, "response_format": "verbose_json", **fields})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    plain = verbose("/v1/audio/transcriptions", "whisper-en", language="de")
    assert (plain["language"], "words" in plain) == ("german", False)
    worded = verbose("/v1/audio/transcriptions", "whisper-en",
                     **{"timestamp_granularities[]": "word"})
    assert worded["words"] == []  # the fake recogniser times no words
    # a translation is to English: a language sent with it is not passed on
    assert verbose("/v1/audio/translations", "whisper", language="de")["language"] == "english"


# -- speech ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(SPEECH_FORMATS))
def test_speech_in_each_format_streams_and_decodes_back(client: openai.OpenAI,
                                                        fmt: str) -> None:
    words = "one two three four five six seven eight nine ten"  # 0.05 s of tone per word
    with client.audio.speech.with_streaming_response.create(
            model="tts", voice="alloy", input=words, response_format=fmt) as response:
        assert response.headers["content-type"] == SPEECH_FORMATS[fmt]
        audio = b"".join(response.iter_bytes())
    if fmt == "pcm":
        assert len(audio) == pytest.approx(24000 * 2 * 0.5, rel=0.05)
    else:
        assert duration_s(decode_to_pcm(audio)) == pytest.approx(0.5, abs=0.15)


def test_speech_audio_arrives_while_it_is_still_being_made(server: Server) -> None:
    body = {"model": "slow-tts", "input": "word " * 30, "response_format": "wav"}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {FULL_KEY}"}) as response:
        chunks = response.iter_bytes()  # NOTE: a dropped iterator closes the connection
        first = next(chunks)
        assert first.startswith(b"RIFF")
        # 30 words at 10 per second: the worker is still speaking
        assert server.model("slow-voice")["in_flight"] == 1
        rest = b"".join(chunks)
    assert duration_s(decode_to_pcm(first + rest)) == pytest.approx(1.5, abs=0.1)


def test_speech_a_loaded_model_refuses_is_a_400_not_a_cut_stream(server: Server) -> None:
    assert post(server, "/v1/audio/speech", json={"model": "slow-tts", "input": "hi"}
                ).status_code == 200  # loaded: the worker refuses the next one at once
    response = post(server, "/v1/audio/speech", json={"model": "slow-tts",
                                                      "input": "word " * 101})
    assert_error(response, 400, contains="speaks at most 100 at once")


def test_speech_defaults_to_mp3_and_knows_its_voices(server: Server) -> None:
    response = post(server, "/v1/audio/speech", json={"model": "tts", "input": "hi there",
                                                      "voice": "joe"})
    assert response.headers["content-type"] == "audio/mpeg"
    assert duration_s(decode_to_pcm(response.content)) > 0.05
    assert post(server, "/v1/audio/speech", json={"model": "tts", "input": "hi",
                                                  "voice": {"id": "amy"}}).status_code == 200
    assert_error(post(server, "/v1/audio/speech", json={"model": "tts", "input": "hi",
                                                        "voice": "gandalf"}), 400,
                 contains="Voices: joe, amy", param="voice")
    assert_error(post(server, "/v1/audio/speech", json={"model": "tts", "input": " "}), 400,
                 param="input")
    assert_error(post(server, "/v1/audio/speech", json={"model": "tts", "input": "x" * 4097}),
                 400, param="input", contains="the limit is 4096")
    assert_error(post(server, "/v1/audio/speech", json={"model": "tts", "input": "hi",
                                                        "voice": 5}), 400, param="voice")
    assert_error(post(server, "/v1/audio/speech", json={"model": "tts", "input": "hi",
                                                        "stream_format": "sse"}), 400,
                 param="stream_format", contains="not server-sent events")
    assert_error(post(server, "/v1/audio/speech", json={"model": "tts", "input": "hi",
                                                        "speed": 9}), 400, param="speed")
    assert_error(post(server, "/v1/audio/speech", json={"model": "tts", "input": "hi",
                                                        "response_format": "ogg"}), 400,
                 param="response_format")
    assert_error(post(server, "/v1/audio/speech", json={"model": "chat", "input": "hi"}), 400,
                 contains="cannot speak")


def test_speech_speed_and_voice_names(server: Server) -> None:
    def speak(**body: Any) -> httpx.Response:
        return post(server, "/v1/audio/speech", json={"input": "one two three four",
                                                      "response_format": "pcm", **body})

    # the fake voice speaks 0.05 s per word at speed 1, and PCM is 24 kHz int16
    assert len(speak(model="tts").content) == pytest.approx(2 * 24000 * 0.2, rel=0.05)
    fast = speak(model="tts", speed=4.0)
    assert fast.status_code == 200
    assert len(fast.content) == pytest.approx(2 * 24000 * 0.05, rel=0.1)
    assert_error(speak(model="tts", speed=4.01), 400, param="speed")
    assert_error(speak(model="tts", speed=0.2), 400, param="speed")
    assert speak(model="tts", voice="Alloy").status_code == 200  # OpenAI's, in any case
    assert_error(speak(model="tts", voice={"id": "gandalf"}), 400, param="voice")
    assert speak(model="slow-tts", voice="gandalf").status_code == 200  # no voices: any
    assert post(server, "/v1/audio/speech", json={"model": "tts", "input": "x" * 4096,
                                                  "response_format": "pcm"}).status_code == 200


def test_voice_and_speech_model_lists_for_open_webui(server: Server) -> None:
    assert httpx.get(f"{server.url}/v1/audio/models").json() == {
        "models": [{"id": "tts"}, {"id": "slow-tts"}]}
    voices = httpx.get(f"{server.url}/v1/audio/voices", params={"model": "tts"}).json()
    assert voices == {"voices": [{"id": "joe", "name": "joe"}, {"id": "amy", "name": "amy"}]}
    assert_error(httpx.get(f"{server.url}/v1/audio/voices", params={"model": "chat"}), 400)


# -- every route through the async SDK -----------------------------------------------------


@pytest.mark.anyio
async def test_every_route_through_the_async_sdk(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=FULL_KEY,
                                  max_retries=0) as client:
        assert "chat" in [m.id async for m in client.models.list()]
        assert (await client.models.retrieve("embed")).id == "embed"
        text = await client.completions.create(model="chat", prompt="hey")
        assert text.choices[0].text == "echo: hey"
        stream = await client.completions.create(model="chat", prompt="hey", stream=True)
        assert "".join([c.choices[0].text async for c in stream]) == "echo: hey"
        vectors = await client.embeddings.create(model="embed", input=["a", "b"])
        assert [d.index for d in vectors.data] == [0, 1]
        heard = await client.audio.transcriptions.create(model="whisper",
                                                         file=("a.ogg", upload("ogg")))
        assert heard.text == "hello from the fake recogniser"
        speech = await client.audio.speech.create(model="tts", input="one two", voice="echo",
                                                  response_format="flac")
        assert duration_s(decode_to_pcm(speech.content)) == pytest.approx(0.1, abs=0.05)


# -- random bodies -------------------------------------------------------------------------

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "messages", "input", "voice", "stream", "stream_options", "max_tokens",
          "temperature", "top_p", "stop", "seed", "n", "tools", "tool_choice",
          "response_format", "encoding_format", "dimensions", "speed", "logit_bias"]
MODELS = st.sampled_from(["chat", "plain", "embed", "tts", "whisper", "nope"])
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
     "content": JSON_VALUES | st.text(max_size=30)}), max_size=3)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = draw(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES,
                                                max_size=6))
    if draw(st.booleans()):
        body["model"] = draw(MODELS)
    if draw(st.booleans()):
        body["messages"] = draw(MESSAGES)
    return body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings",
                                  "/v1/audio/speech"])
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies())
def test_random_bodies_get_an_answer_or_a_clear_4xx(server: Server, path: str,
                                                    body: dict[str, Any]) -> None:
    # json.dumps writes NaN and Infinity, which Python's parser (the server's) accepts
    response = post(server, path, content=json.dumps(body),
                    headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error(response, response.status_code)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith(("data: [DONE]", "}"))


def test_apply_template_shows_what_the_template_is_given(server: Server) -> None:
    reply = post(server, "/apply-template", json={
        "model": "oss-high", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    given = json.loads(reply.json()["prompt"])
    assert given["messages"][0] == {"role": "system", "content": "Reasoning: high\n\nBe brief."}
    assert given["reasoning_effort"] == "high"
    assert given["chat_template_kwargs"] == {"flavour": "oss"}


def test_a_requests_reasoning_effort_rewrites_the_prefix(server: Server) -> None:
    reply = post(server, "/apply-template", json={
        "model": "oss-high", "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "Hi"}]})
    given = json.loads(reply.json()["prompt"])
    assert given["messages"][0] == {"role": "system", "content": "Reasoning: low"}
    assert given["reasoning_effort"] == "low"


SDK_EFFORTS = typing.get_args(typing.get_args(openai.types.shared.ReasoningEffort)[0])


@pytest.mark.parametrize("effort", SDK_EFFORTS)
def test_every_reasoning_effort_of_the_sdk_is_accepted(client: openai.OpenAI,
                                                      effort: str) -> None:
    reply = client.chat.completions.create(model="plain", messages=USER,
                                           reasoning_effort=effort)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "plain answer"


@pytest.mark.parametrize(("requested", "effort", "thinking"), [
    (None, None, None), ("minimal", "minimal", None), ("low", "low", None),
    ("medium", "medium", None), ("high", "high", None), ("xhigh", "high", None),
    ("max", "high", None), ("none", "low", False)])
def test_a_template_gets_an_effort_it_knows(requested: str | None, effort: str | None,
                                            thinking: bool | None) -> None:
    assert template_effort(requested) == (effort, thinking)


@pytest.mark.parametrize(("enable_thinking", "client_kwargs", "thinking"), [
    (None, None, False), (True, None, False), (True, {"enable_thinking": True}, True)])
def test_reasoning_effort_none_turns_thinking_off_unless_the_client_says(
        enable_thinking: bool | None, client_kwargs: dict[str, Any] | None,
        thinking: bool) -> None:
    virtual = VirtualModel(name="m", physical="m", enable_thinking=enable_thinking,
                           system_prompt_prefix="Reasoning: high")
    payload = apply_virtual(virtual, [{"role": "user", "content": "Hi"}],
                            {"reasoning_effort": "none"}, client_kwargs)
    assert payload["chat_template_kwargs"] == {"enable_thinking": thinking}
    assert payload["reasoning_effort"] == "low"
    assert payload["messages"][0] == {"role": "system", "content": "Reasoning: low"}


@pytest.mark.parametrize(("requested", "line", "kwargs"), [
    ("xhigh", "high", {"flavour": "oss"}), ("max", "high", {"flavour": "oss"}),
    ("none", "low", {"flavour": "oss", "enable_thinking": False})])
def test_the_template_is_given_the_effort_it_knows(server: Server, requested: str,
                                                   line: str, kwargs: dict[str, Any]) -> None:
    reply = post(server, "/apply-template", json={
        "model": "oss-high", "reasoning_effort": requested,
        "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    given = json.loads(reply.json()["prompt"])
    assert given["messages"][0] == {"role": "system", "content": f"Reasoning: {line}"}
    assert given["reasoning_effort"] == line
    assert given["chat_template_kwargs"] == kwargs


def test_apply_template_needs_a_key_and_a_chat_model(server: Server) -> None:
    body = {"model": "oss-high", "messages": [{"role": "user", "content": "Hi"}]}
    assert_error(post(server, "/apply-template", key=None, json=body), 401)
    assert_error(post(server, "/apply-template", json=body | {"model": "embed"}), 400,
                 param="model")
