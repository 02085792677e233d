"""Legacy function calling (``functions``, ``function_call``, ``role: "function"``)
through the openai SDK and httpx against a live server with fake backends: served by
the tools path, answered the legacy way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from llmux.chat import functions
from tests.conftest import Server, fake_config, fake_model, sdk_client, serving

LOOKUP = {"name": "lookup", "description": "look a thing up",
          "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}
CLOCK = {"name": "clock", "description": "the time now",
         "parameters": {"type": "object", "properties": {}}}
QUESTION = [{"role": "user", "content": "find llamas"}]
URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = fake_config(caller=fake_model(tool_calls=True) | {"capabilities": ["tools"]},
                         plain=fake_model(reply="plain answer"))
    config["devices"] = {"cpu": {"capacity": "2GB"}}
    with serving(config, tmp_path_factory.mktemp("legacy-functions")) as server:
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with sdk_client(server) as c:
        yield c


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON objects of an SSE reply, in order, without ``[DONE]``."""
    assert response.status_code == 200, response.text
    datas = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


# -- replies -------------------------------------------------------------------------------


@pytest.mark.parametrize("function_call", ["auto", {"name": "lookup"}, openai.NOT_GIVEN],
                         ids=["auto", "named", "unset"])
def test_a_function_call_is_the_message_s_function_call(client: openai.OpenAI,
                                                        function_call: Any) -> None:
    reply = client.chat.completions.create(model="caller", messages=QUESTION,
                                           functions=[LOOKUP], function_call=function_call)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call is not None
    assert choice.message.function_call.name == "lookup"
    assert json.loads(choice.message.function_call.arguments) == {"text": "find llamas"}
    assert (choice.message.tool_calls, choice.message.content) == (None, None)


def test_a_streamed_function_call_comes_as_function_call_deltas(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="caller", messages=QUESTION,
                                                 functions=[LOOKUP], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    calls = [d.function_call for d in deltas if d.function_call is not None]
    assert calls[0].name == "lookup" and len(calls) == 2
    arguments = "".join(c.arguments or "" for c in calls)
    assert json.loads(arguments) == {"text": "find llamas"}
    assert all(d.tool_calls is None for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "function_call"


def test_a_named_function_call_opens_the_stream_with_null_content(server: Server) -> None:
    chunks = events(post(server, URL, {"model": "caller", "messages": QUESTION, "stream": True,
                                       "functions": [LOOKUP],
                                       "function_call": {"name": "lookup"}}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}


def test_function_call_none_answers_in_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="caller", messages=QUESTION,
                                           functions=[LOOKUP], function_call="none")
    choice = reply.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("echo: find llamas", "stop")
    assert choice.message.function_call is None


def test_functions_offered_to_a_model_without_tools_are_ignored_unless_demanded(
        server: Server, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="plain", messages=QUESTION,
                                           functions=[LOOKUP])
    assert reply.choices[0].message.content == "plain answer"
    response = post(server, URL, {"model": "plain", "messages": QUESTION,
                                  "functions": [LOOKUP], "function_call": {"name": "lookup"}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "function_call"
    assert error["message"] == ("The model 'plain' cannot call tools, and 'function_call' "
                                "demands a tool call.")


# -- history ---------------------------------------------------------------------------------

ROUND_TRIP: list[Any] = [
    *QUESTION,
    {"role": "assistant", "content": None,
     "function_call": {"name": "lookup", "arguments": '{"text": "find llamas"}'}},
    {"role": "function", "name": "lookup", "content": "llamas live in the Andes"},
]


def test_a_function_result_is_answered(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="caller", messages=ROUND_TRIP,
                                           functions=[LOOKUP, CLOCK])
    assert reply.choices[0].message.content == "tool said: llamas live in the Andes"
    assert reply.choices[0].finish_reason == "stop"


def test_the_template_gets_a_function_call_and_its_result_as_a_tool_call_and_result(
        server: Server) -> None:
    response = post(server, "/apply-template", {"model": "caller", "messages": ROUND_TRIP,
                                                "functions": [LOOKUP]})
    assert response.status_code == 200, response.text
    given = json.loads(response.json()["prompt"])
    assert given["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": '{"text": "find llamas"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "lookup",
         "content": "llamas live in the Andes"}]
    assert given["tools"] == [{"type": "function", "function": LOOKUP}]


def test_a_function_result_with_no_call_before_it_gets_an_id_of_its_own(
        server: Server) -> None:
    result = {"role": "function", "name": "lookup", "content": "llamas live in the Andes"}
    response = post(server, "/apply-template", {"model": "caller",
                                                "messages": [*QUESTION, result]})
    assert response.status_code == 200, response.text
    given = json.loads(response.json()["prompt"])
    assert given["messages"][1] == {"role": "tool", "tool_call_id": "call_1",
                                    "name": "lookup", "content": "llamas live in the Andes"}


# -- mistakes --------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": LOOKUP}]


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"functions": [LOOKUP], "tools": TOOLS}, "functions",
     "Send either 'tools' and 'tool_choice' or the deprecated 'functions' and "
     "'function_call', not both."),
    ({"function_call": "auto", "tool_choice": "auto"}, "function_call",
     "Send either 'tools' and 'tool_choice' or the deprecated 'functions' and "
     "'function_call', not both."),
    ({"functions": [{"description": "no name"}]}, "functions[0]",
     "'functions[0]' must be {\"name\": ..., \"parameters\": ...}."),
    ({"functions": LOOKUP}, "functions", "'functions' must be an array, got "),
    ({"functions": [LOOKUP], "function_call": "required"}, "function_call",
     "'function_call' must be none, auto or {\"name\": ...}."),
    ({"functions": [LOOKUP], "function_call": {"name": "clock"}}, "function_call",
     "'function_call' names a function that is not in 'functions'."),
    ({"function_call": {"name": "lookup"}}, "function_call",
     "'function_call' names a function that is not in 'functions'."),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].name",
     "'messages[0].name' must name the function whose result this is."),
    ({"messages": [*QUESTION, {"role": "assistant", "function_call": {
        "name": "lookup", "arguments": {"text": "x"}}}]}, "messages[1].function_call",
     "'messages[1].function_call' must be {\"name\": ..., \"arguments\": \"<JSON text>\"}."),
])
def test_legacy_mistakes_get_a_400_naming_the_field(server: Server, extra: dict[str, Any],
                                                    param: str, message: str) -> None:
    response = post(server, URL, {"model": "caller", "messages": QUESTION, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(message)


# -- the mapping itself (llmux.chat.functions, pure) -------------------------------------------


def test_only_the_first_tool_call_becomes_the_function_call() -> None:
    calls = [{"function": {"name": "lookup", "arguments": '{"text": "a"}'}},
             {"function": {"name": "clock", "arguments": "{}"}}]
    assert functions.function_call(calls) == {"name": "lookup", "arguments": '{"text": "a"}'}


def test_a_streamed_piece_keeps_the_first_call_s_deltas_only() -> None:
    piece = {"tool_calls": [
        {"index": 0, "id": "call_0", "type": "function",
         "function": {"name": "lookup", "arguments": ""}},
        {"index": 1, "id": "call_1", "type": "function",
         "function": {"name": "clock", "arguments": "{}"}}]}
    assert functions.function_call_piece(piece) == {
        "function_call": {"name": "lookup", "arguments": ""}}
    assert functions.function_call_piece(
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}) == {}


def test_a_function_call_joins_the_tool_calls_an_assistant_message_already_has() -> None:
    earlier = {"id": "call_x", "type": "function",
               "function": {"name": "clock", "arguments": "{}"}}
    message = {"role": "assistant", "tool_calls": [earlier],
               "function_call": {"name": "lookup", "arguments": "{}"}}
    assert functions.as_tool_messages([message])[0]["tool_calls"] == [earlier, {
        "id": "call_0", "type": "function",
        "function": {"name": "lookup", "arguments": "{}"}}]


@pytest.mark.parametrize(("function_call", "tool_choice"), [
    ({"name": "lookup"}, {"type": "function", "function": {"name": "lookup"}}),
    ("auto", "auto"), ("none", "none"), (None, None)])
def test_functions_and_function_call_become_tools_and_tool_choice(
        function_call: Any, tool_choice: Any) -> None:
    assert functions.as_tools([LOOKUP], function_call) == (
        [{"type": "function", "function": LOOKUP}], tool_choice)
