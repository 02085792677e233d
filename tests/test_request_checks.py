"""The request checks of the OpenAI routes as pure functions, at their bounds: what a
client may send is accepted as sent, and each mistake is a 400 naming its field. The
live-server tests (test_api.py) show the shape of the reply; these pin the edges."""

from __future__ import annotations

import base64
import io
from typing import Any

import falcon
import falcon.asgi
import falcon.testing
import pytest

from llmux import errors
from llmux.config import PhysicalModel, Server, VirtualModel
from llmux.errors import BadRequest
from llmux.http import chat, embeddings, json_shape, params
from llmux.http.body import field, integer_in, number_in, read_json, refuse_encoded, string_list
from llmux.http.errors import install

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]


def refused(check: Any, body: dict[str, Any]) -> BadRequest:
    """The BadRequest ``check(body)`` raises."""
    with pytest.raises(BadRequest) as caught:
        check(body)
    return caught.value


# -- sampling parameters -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "low", "high"), [
    ("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
    ("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
    ("repetition_penalty", 0.01, 10.0)])
def test_a_number_is_taken_at_its_bounds_and_refused_just_past_them(
        name: str, low: float, high: float) -> None:
    assert params.sampling({name: low}) == {name: low}
    assert params.sampling({name: high}) == {name: high}
    for outside in (low - 0.001, high + 0.001):
        error = refused(params.sampling, {name: outside})
        assert (error.status, error.param) == (400, name)
        assert "must be between" in error.message


@pytest.mark.parametrize(("name", "low", "high"), [
    ("top_k", 0, 2**31 - 1), ("seed", -(2**63), 2**64 - 1), ("max_tokens", 1, 2**31 - 1),
    ("max_completion_tokens", 1, 2**31 - 1)])
def test_an_integer_is_taken_at_its_bounds_and_refused_just_past_them(
        name: str, low: int, high: int) -> None:
    key = "max_tokens" if name.startswith("max_") else name
    assert params.sampling({name: low}) == {key: low}
    assert params.sampling({name: high}) == {key: high}
    for outside in (low - 1, high + 1):
        assert refused(params.sampling, {name: outside}).param == name


def test_zero_is_a_value_the_client_set_not_an_unset_one() -> None:
    # temperature 0 is greedy decoding: it must not fall back to the model's default
    assert params.sampling({"temperature": 0, "top_k": 0, "seed": 0, "top_p": 0}) == {
        "temperature": 0.0, "top_k": 0, "seed": 0, "top_p": 0.0}
    assert params.sampling({}) == {}


def test_an_integer_is_a_number_and_stays_one() -> None:
    sampled = params.sampling({"temperature": 1, "top_p": 1})
    assert sampled == {"temperature": 1.0, "top_p": 1.0}
    assert all(type(v) is float for v in sampled.values())


@pytest.mark.parametrize("name", ["temperature", "top_p", "max_tokens", "seed", "top_k"])
@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_number(name: str, value: bool) -> None:
    error = refused(params.sampling, {name: value})
    assert error.param == name and "must be" in error.message


def test_max_completion_tokens_wins_over_the_deprecated_max_tokens() -> None:
    assert params.max_tokens({"max_completion_tokens": 7}) == 7
    assert params.max_tokens({"max_tokens": 9}) == 9
    assert params.max_tokens({"max_completion_tokens": 7, "max_tokens": 9}) == 7
    assert params.max_tokens({"max_completion_tokens": None, "max_tokens": 9}) == 9


def test_stop_is_a_string_or_up_to_16_strings_and_reaches_the_backend() -> None:
    assert params.sampling({"stop": "\n"}) == {"stop": ["\n"]}
    assert params.sampling({"stop": ["s"] * params.MAX_STOP}) == {"stop": ["s"] * 16}
    assert refused(params.sampling, {"stop": ["s"] * 17}).param == "stop"
    assert refused(params.sampling, {"stop": ["a", ""]}).param == "stop"
    assert refused(params.sampling, {"stop": {"a": 1}}).param == "stop"


def test_logit_bias_takes_minus_100_to_100_and_reaches_the_backend() -> None:
    assert params.sampling({"logit_bias": {"5": -100, 6: 100, "7": 0.5}}) == {
        "logit_bias": {"5": -100.0, "6": 100.0, "7": 0.5}}
    for value in (-100.5, 100.5, "1", None):
        assert refused(params.sampling, {"logit_bias": {"5": value}}).param == "logit_bias"


def test_the_reasoning_effort_reaches_the_backend() -> None:
    assert params.sampling({"reasoning_effort": "low"}) == {"reasoning_effort": "low"}


@pytest.mark.parametrize("body", [{}, {"n": 1}, {"n": None}, {"logprobs": False},
                                  {"logprobs": None, "top_logprobs": 0}])
def test_one_choice_without_logprobs_is_served(body: dict[str, Any]) -> None:
    params.only_one_choice(body)


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"), ({"n": True}, "n"), ({"n": "1"}, "n"), ({"n": 1.0}, "n"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 1}, "top_logprobs")])
def test_more_choices_or_logprobs_are_refused(body: dict[str, Any], param: str) -> None:
    assert refused(params.only_one_choice, body).param == param


def test_include_usage_is_off_unless_asked_for() -> None:
    assert params.include_usage({}) is False
    assert params.include_usage({"stream_options": {}}) is False
    assert params.include_usage({"stream_options": {"include_usage": None}}) is False
    assert params.include_usage({"stream_options": {"include_usage": True}}) is True


@pytest.mark.parametrize(("options", "param"), [
    ("yes", "stream_options"), (["include_usage"], "stream_options"),
    ({"include_usage": 1}, "stream_options.include_usage")])
def test_stream_options_of_the_wrong_shape_are_refused(options: Any, param: str) -> None:
    assert refused(params.include_usage, {"stream_options": options}).param == param


# -- fields ----------------------------------------------------------------------------------


def test_a_required_field_names_itself_when_missing() -> None:
    error = refused(lambda b: field(b, "model", str, required=True), {"model": None})
    assert (error.param, error.message) == ("model", "'model' is required.")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_refused_as_not_a_number(value: float) -> None:
    error = refused(lambda b: field(b, "x", float), {"x": value})
    assert error.param == "x" and "must be a number" in error.message


def test_number_and_integer_ranges_are_inclusive() -> None:
    assert number_in({"x": 2}, "x", 0.0, 2.0) == 2.0
    assert integer_in({"x": 1}, "x", 1, 3) == 1
    assert integer_in({"x": 3}, "x", 1, 3) == 3


def test_a_string_list_holds_one_to_max_items_strings() -> None:
    assert string_list({"p": "a"}, "p", max_items=2) == ["a"]
    assert string_list({"p": ["a", "b"]}, "p", max_items=2) == ["a", "b"]
    for value in ([], ["a", "b", "c"], ["a", 1], 5):
        assert refused(lambda b: string_list(b, "p", max_items=2), {"p": value}).param == "p"


@pytest.mark.anyio
async def test_a_body_over_the_limit_is_413_even_without_a_content_length() -> None:
    raw = b'{"a": "' + b"x" * 13 + b'"}'  # 22 bytes
    exact = falcon.testing.create_asgi_req(method="POST", body=raw)
    assert exact.content_length is None  # read as a stream, as a chunked body is
    assert await read_json(exact, len(raw)) == {"a": "x" * 13}
    over = falcon.testing.create_asgi_req(method="POST", body=raw)
    with pytest.raises(errors.PayloadTooLarge):
        await read_json(over, len(raw) - 1)


@pytest.mark.parametrize("encoding", [None, "", "identity", " Identity "])
def test_a_body_sent_as_it_is_is_read(encoding: str | None) -> None:
    headers = {} if encoding is None else {"Content-Encoding": encoding}
    refuse_encoded(falcon.testing.create_asgi_req(method="POST", headers=headers))


def test_a_compressed_body_is_415() -> None:
    req = falcon.testing.create_asgi_req(method="POST", headers={"Content-Encoding": "br"})
    with pytest.raises(errors.UnsupportedMediaType):
        refuse_encoded(req)


# -- JSON shape --------------------------------------------------------------------------------


def test_the_64_bit_bounds_are_integers_a_frame_carries() -> None:
    assert json_shape.bounded_int(str(2**64 - 1)) == 2**64 - 1
    assert json_shape.bounded_int(str(-(2**63))) == -(2**63)
    with pytest.raises(json_shape.Unrepresentable):
        json_shape.bounded_int(str(2**64))


def test_invalid_json_holding_the_largest_integers_is_invalid_json() -> None:
    with pytest.raises(ValueError) as caught:
        json_shape.parse(b'{"a": [%d, %d],}' % (2**64 - 1, -(2**63)))
    assert not isinstance(caught.value, json_shape.Unrepresentable)


def test_a_byte_order_mark_is_skipped() -> None:
    assert json_shape.parse(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"a": "\\udc00"}', "a"),  # a lone low surrogate as well as a high one
    (b'{"a": {"\\ud800": 1}}', "a.\\ud800"),  # in a key: the param itself stays encodable
])
def test_unpaired_surrogates_are_refused_wherever_they_are(raw: bytes, param: str) -> None:
    with pytest.raises(json_shape.Unrepresentable) as caught:
        json_shape.parse(raw)
    assert caught.value.param == param
    assert caught.value.param.encode("utf-8")


@pytest.mark.parametrize(("data", "param"), [
    ({"a": [1, -(2**63) - 1]}, "a[1]"), ({"a": [2**64, 3]}, "a[0]"),
    ({"a": [1.5, 2**64]}, "a[1]"), ({"a": [1e300, -(2**64)]}, "a[1]")])
def test_integers_beyond_64_bits_are_found_among_other_numbers(data: Any, param: str) -> None:
    with pytest.raises(json_shape.Unrepresentable) as caught:
        json_shape.check(data)
    assert caught.value.param == param


def test_big_floats_beside_integers_are_not_integers() -> None:
    json_shape.check({"a": [1, 1e300, -1e300, 2**64 - 1]})


def test_the_param_of_a_deep_or_long_place_is_cut_short() -> None:
    key = "k" * 500
    with pytest.raises(json_shape.Unrepresentable) as caught:
        json_shape.check({key: "\ud800"})
    assert caught.value.param == "k" * json_shape.MAX_PARAM_CHARS


# -- chat messages and tools --------------------------------------------------------------------


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_every_openai_role_is_accepted(role: str) -> None:
    assert chat.parse_messages({"messages": [{"role": role, "content": "x"}]})[0]["role"] \
        == role


@pytest.mark.parametrize(("message", "param"), [
    ({"role": ["user"], "content": "x"}, "messages[0].role"),
    ({"role": {"a": 1}, "content": "x"}, "messages[0].role"),
    ({"role": "user", "content": [{"type": ["text"], "text": "x"}]}, "messages[0].content[0]"),
    ({"role": "user", "content": [{"type": {}, "text": "x"}]}, "messages[0].content[0]"),
])
def test_a_role_or_part_type_that_is_a_list_or_object_is_a_400(message: dict[str, Any],
                                                                param: str) -> None:
    """Not a 500: such a value cannot even be looked up among the names."""
    with pytest.raises(BadRequest) as caught:
        chat.parse_messages({"messages": [message]})
    assert caught.value.param == param


@pytest.mark.parametrize("image", ["data:image/png;base64,AA==",
                                   {"url": "data:image/png;base64,AA=="}])
def test_an_image_url_may_be_a_string_or_an_object(image: Any) -> None:
    part = {"type": "image_url", "image_url": image}
    chat.parse_messages({"messages": [{"role": "user", "content": [part]}]})


@pytest.mark.parametrize("image", [None, 5, {"detail": "low"}, ["x"]])
def test_an_image_url_without_a_url_is_a_400(image: Any) -> None:
    part = {"type": "image_url", "image_url": image}
    body = {"messages": [{"role": "user", "content": [part]}]}
    assert refused(chat.parse_messages, body).param == "messages[0].content[0].image_url"


def test_an_assistant_tool_call_may_have_no_content() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    chat.parse_messages({"messages": [*USER, {"role": "assistant", "content": None,
                                              "tool_calls": [call]}]})


@pytest.mark.parametrize("tool", [{"type": "retrieval", "function": {"name": "f"}},
                                  {"function": {"name": 3}}, "lookup"])
def test_a_tool_that_is_not_a_function_is_a_400(tool: Any) -> None:
    assert refused(chat.parse_tools, {"tools": [tool]}).param == "tools[0]"


def test_a_tool_without_a_type_is_a_function() -> None:
    tools = [{"function": {"name": "lookup"}}]
    assert chat.parse_tools({"tools": tools}) == (tools, None)


@pytest.mark.parametrize(("call", "param"), [
    ({"name": "lookup", "arguments": {"text": "x"}}, "messages[1].function_call"),
    ({"name": "lookup"}, "messages[1].function_call"), ("lookup", "messages[1].function_call")])
def test_a_legacy_function_call_must_be_whole(call: Any, param: str) -> None:
    body = {"messages": [*USER, {"role": "assistant", "content": None,
                                 "function_call": call}]}
    assert refused(chat.parse_messages, body).param == param


def model(*capabilities: str) -> PhysicalModel:
    return PhysicalModel(id="m", type="llm", backend="fake", estimated_vram=1,
                         capabilities=list(capabilities))


def test_tool_choice_none_sends_no_tools() -> None:
    assert chat.tool_params(model("tools"), {"tools": TOOLS, "tool_choice": "none"}) == {}
    assert chat.tool_params(model("tools"), {"functions": [TOOLS[0]["function"]],
                                             "function_call": "none"}) == {}


def test_tools_reach_a_model_that_can_call_them_with_what_the_client_set() -> None:
    body = {"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}
    assert chat.tool_params(model("tools"), body) == {
        "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}
    body["parallel_tool_calls"] = "no"
    assert refused(lambda b: chat.tool_params(model("tools"), b), body).param \
        == "parallel_tool_calls"


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
     "tool_choice"),
    ({"functions": [TOOLS[0]["function"]], "function_call": {"name": "lookup"}},
     "function_call")])
def test_a_demanded_call_is_refused_by_a_model_without_tools(body: dict[str, Any],
                                                             param: str) -> None:
    body["model"] = "plain"
    error = refused(lambda b: chat.tool_params(model(), b), body)
    assert error.param == param and "cannot call tools" in error.message


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


async def payload(physical: PhysicalModel, **extra: Any) -> dict[str, Any]:
    body = {"model": "m", "messages": USER, **extra}
    return await chat.chat_payload(VirtualModel(name="m", physical="m"), physical, body,
                                   Server())


@pytest.mark.anyio
@pytest.mark.parametrize("physical", [model("vision"), PhysicalModel(
    id="m", type="vlm", backend="fake", estimated_vram=1)], ids=["llm-with-vision", "vlm"])
async def test_a_model_that_can_see_gets_the_image_bytes(physical: PhysicalModel) -> None:
    image = png()
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    parts = [{"type": "text", "text": "what is this"},
             {"type": "image_url", "image_url": {"url": url}}]
    sent = await payload(physical, messages=[{"role": "user", "content": parts}])
    assert sent["messages"][0]["content"][1] == {"type": "image", "image": image}
    with pytest.raises(BadRequest) as caught:
        await payload(model("tools"), messages=[{"role": "user", "content": parts}])
    assert caught.value.param == "messages" and "cannot read images" in caught.value.message


@pytest.mark.anyio
@pytest.mark.parametrize("response_format", [
    {"type": "text"}, {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}])
async def test_every_openai_response_format_reaches_the_backend(
        response_format: dict[str, Any]) -> None:
    sent = await payload(model(), response_format=response_format)
    assert sent["response_format"] == response_format


# -- embeddings ----------------------------------------------------------------------------------


def test_up_to_2048_texts_are_embedded_in_one_request() -> None:
    assert len(embeddings.parse_input({"input": ["x"] * embeddings.MAX_INPUTS})) == 2048
    error = refused(embeddings.parse_input, {"input": ["x"] * 2049})
    assert error.param == "input" and "at most 2048" in error.message


@pytest.mark.parametrize(("value", "contains"), [
    ([], "non-empty list of strings"), ([[1, 2]], "token ids"), (None, "a string"),
    (["a", 1], "non-empty list of strings")])
def test_embedding_input_mistakes_say_what_to_send(value: Any, contains: str) -> None:
    error = refused(embeddings.parse_input, {"input": value})
    assert error.param == "input" and contains in error.message


# -- error bodies ------------------------------------------------------------------------------


class Raises:
    """A resource whose GET raises what the test names."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        raise self.error


def answer(error: Exception) -> falcon.testing.Result:
    """The reply of an app with llmux's error handlers to a GET that raises ``error``."""
    app = falcon.asgi.App()
    install(app)
    app.add_route("/raise", Raises(error))
    return falcon.testing.TestClient(app).simulate_get("/raise")


@pytest.mark.parametrize(("error", "status", "kind", "code", "headers"), [
    (errors.QueueFull("busy", retry_after_s=0.2), 429, "rate_limit_error", "queue_full",
     {"retry-after": "1"}),
    (errors.ServiceUnavailable("later", retry_after_s=7.6), 503, "server_error",
     "unavailable", {"retry-after": "8"}),
    (errors.LoadRefused("too big"), 507, "server_error", "insufficient_memory",
     {"x-should-retry": "false"}),
    (errors.Unauthorized("who?"), 401, "authentication_error", "invalid_api_key",
     {"www-authenticate": "Bearer"}),
    (errors.UnsupportedMediaType("gzip"), 415, "invalid_request_error", None, {}),
    (BadRequest("no", param="temperature", code="bad_temperature"), 400,
     "invalid_request_error", "bad_temperature", {}),
])
def test_an_llmux_error_has_its_status_type_code_and_headers(
        error: errors.LlmuxError, status: int, kind: str, code: str | None,
        headers: dict[str, str]) -> None:
    result = answer(error)
    assert result.status_code == status
    assert result.json == {"error": {"message": error.message, "type": kind,
                                     "param": error.param, "code": code}}
    for name, value in headers.items():
        assert result.headers.get(name) == value
    for name in {"retry-after", "x-should-retry", "www-authenticate"} - set(headers):
        assert name not in result.headers


@pytest.mark.parametrize(("error", "status", "kind", "code"), [
    (falcon.HTTPTooManyRequests(), 429, "rate_limit_error", None),
    (falcon.HTTPForbidden(), 403, "permission_error", None),
    (falcon.HTTPBadRequest(code="bad"), 400, "invalid_request_error", "bad"),
    (falcon.HTTPServiceUnavailable(retry_after=5), 503, "server_error", None),
    (falcon.HTTPInternalServerError(code=7), 500, "server_error", None),
])
def test_a_falcon_error_is_shaped_as_openai_s(error: falcon.HTTPError, status: int,
                                              kind: str, code: str | None) -> None:
    result = answer(error)
    assert result.status_code == status
    body = result.json["error"]
    assert (body["type"], body["param"], body["code"]) == (kind, None, code)
    if status == 503:
        assert result.headers.get("retry-after") == "5"


def test_a_wrong_method_is_405_naming_the_allowed_ones() -> None:
    app = falcon.asgi.App()
    install(app)
    app.add_route("/raise", Raises(RuntimeError()))
    result = falcon.testing.TestClient(app).simulate_delete("/raise")
    assert result.status_code == 405
    assert result.json["error"]["message"] == "DELETE is not allowed on /raise."
    assert "GET" in result.headers["allow"]


def test_an_unexpected_exception_is_a_generic_500() -> None:
    result = answer(KeyError("secret detail"))
    assert result.status_code == 500
    assert result.json == {"error": {
        "message": "llmux hit an internal error; it is logged on the server",
        "type": "server_error", "param": None, "code": "internal_error"}}
