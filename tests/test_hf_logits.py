"""The transformers chat backend's penalties and response_format (hf_logits), on tiny
randomly initialised Qwen3 models built here: one with a byte-level BPE tokenizer,
one with a SentencePiece one. Random weights write garbage: what the constraint makes of
it shows that it works."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema_rs
import llguidance
import openai
import pydantic
import pytest
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, WhisperTokenizerFast

from llmux.backends.base import InvalidInput
from llmux.backends.hf_logits import (
    JsonConstraint,
    Penalties,
    closed_schema,
    guidance_tokenizer,
    penalties,
    response_grammar,
)
from llmux.backends.paths import resolve_model_path
from llmux.backends.transformers_backend import TransformersBackend
from tests.conftest import Server, live_workers, wait_until
from tests.helpers import drain
from tests.test_backend_transformers import (
    BYTE_LEVEL,
    CHATML,
    HELLO,
    MINILM,
    TEMPLATE,
    WEATHER,
    WHISPER_TOKENIZER,
    loaded,
    sentencepiece_tokenizer,
)

SENTENCEPIECE = sentencepiece_tokenizer()
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["small", "large"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                 "maxItems": 3},
        "owner": {"type": "object", "required": ["age", "admin"], "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "admin": {"type": "boolean"}}},
    },
    "required": ["name", "size", "tags", "owner"],
}
"""Every string, number and array bounded: the answer must end within a few hundred
tokens, whatever the weights."""
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


@pytest.fixture(scope="module", autouse=True)
def _hub_offline(hub_offline: None) -> None:
    """Every test here runs with the hub offline (conftest.hub_offline)."""


def tiny_qwen3(path: Path, tokenizer: Any, eos: int, extra_logits: int = 0) -> Path:
    """A randomly initialised two-layer Qwen3 with ``tokenizer``, saved at ``path``; its
    logits outnumber the tokenizer's tokens by ``extra_logits``."""
    config = Qwen3Config(
        vocab_size=len(tokenizer) + extra_logits, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16,
        max_position_embeddings=4096, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def byte_level_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3-bytes"), BYTE_LEVEL,
                      BYTE_LEVEL.convert_tokens_to_ids("<|endoftext|>"))


@pytest.fixture(scope="module")
def byte_level(byte_level_path: Path) -> Iterator[TransformersBackend]:
    model = loaded("llm", str(byte_level_path), chat_template=TEMPLATE)
    yield model
    model.unload()


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    """MiniLM's tokenizer (WordPiece, which llguidance cannot read) and CHATML."""
    bert = AutoTokenizer.from_pretrained(resolve_model_path(MINILM), local_files_only=True)
    path = tiny_qwen3(tmp_path_factory.mktemp("qwen3-wordpiece"), bert, bert.sep_token_id)
    model = loaded("llm", str(path), chat_template=CHATML)
    yield model
    model.unload()


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    path = tiny_qwen3(tmp_path_factory.mktemp("qwen3-sentencepiece"), SENTENCEPIECE,
                      SENTENCEPIECE.eos_token_id)
    model = loaded("llm", str(path), chat_template=TEMPLATE)
    yield model
    model.unload()


def chat(model: TransformersBackend, **payload: Any) -> tuple[str, dict[str, Any]]:
    chunks, done = drain(model.infer("chat", {"messages": HELLO, **payload},
                                     threading.Event()))
    return "".join(c.get("text", "") for c in chunks), done


def answer_ids(model: TransformersBackend, monkeypatch: pytest.MonkeyPatch,
               **payload: Any) -> list[int]:
    """The token ids of the answer to ``payload``."""
    hf = model._loaded().model  # type: ignore[attr-defined]
    real, answers = hf.generate, []

    def generate(**kwargs: Any) -> Any:
        out = real(**kwargs)
        answers.append(out[0, kwargs["input_ids"].shape[1]:].tolist())
        return out

    with monkeypatch.context() as patch:
        patch.setattr(hf, "generate", generate)
        chat(model, **payload)
    return list(answers[0])


# -- presence and frequency penalties ---------------------------------------------------


def test_penalties_lower_a_token_by_its_count_and_presence_in_the_answer() -> None:
    prompt, answer = [5, 5], [3, 3, 7]
    penalties = Penalties(len(prompt), presence=0.5, frequency=0.25)
    scores = penalties(torch.tensor([prompt + answer]), torch.zeros(1, 10))
    expected = torch.zeros(1, 10)
    expected[0, 3] = -(0.25 * 2 + 0.5)
    expected[0, 7] = -(0.25 * 1 + 0.5)
    assert torch.equal(scores, expected)  # the prompt's 5 is not counted


@pytest.mark.parametrize("key", ["frequency_penalty", "presence_penalty"])
def test_a_large_penalty_stops_the_answer_repeating_tokens(
        byte_level: TransformersBackend, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    payload = {"max_tokens": 40, "temperature": 0}
    plain = answer_ids(byte_level, monkeypatch, **payload)
    penalised = answer_ids(byte_level, monkeypatch, **payload, **{key: 2.0})
    assert len(set(plain)) < len(plain) == 40  # greedy on random weights repeats itself
    assert len(set(penalised)) == len(penalised) == 40


def test_zero_penalties_leave_the_answer_as_it_was(byte_level: TransformersBackend) -> None:
    payload = {"max_tokens": 20, "temperature": 0}
    zero = {"presence_penalty": 0, "frequency_penalty": 0.0}
    assert chat(byte_level, **payload, **zero) == chat(byte_level, **payload)


def test_a_penalty_that_is_not_a_number_is_invalid_input(
        byte_level: TransformersBackend) -> None:
    with pytest.raises(InvalidInput, match="frequency_penalty must be a number, got 'lots'"):
        chat(byte_level, frequency_penalty="lots")


# -- response_format: the grammar and its matcher ---------------------------------------


@functools.cache
def byte_level_guidance() -> llguidance.LLTokenizer:
    return guidance_tokenizer(BYTE_LEVEL, len(BYTE_LEVEL), [BYTE_LEVEL.eos_token_id])


def matcher(grammar: str | None, text: str) -> llguidance.LLMatcher:
    """A matcher of ``grammar`` over the byte-level tokenizer, fed ``text``."""
    assert grammar is not None
    found = llguidance.LLMatcher(byte_level_guidance(), grammar, log_level=0)
    found.consume_tokens(BYTE_LEVEL(text, add_special_tokens=False)["input_ids"])
    return found


def test_an_object_schema_without_additional_properties_allows_no_others() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    closed = response_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    assert not matcher(closed, '{"a": 1}').is_error()
    assert matcher(closed, '{"a": 1, "b": 2}').is_error()
    opened = response_grammar({"type": "json_schema", "json_schema": {
        "schema": {**schema, "additionalProperties": True}, "strict": False}})
    assert matcher(opened, '{"a": 1, "b": 2}').is_accepting()


def test_whitespace_between_tokens_is_bounded_as_in_llama_cpp() -> None:
    grammar = response_grammar({"type": "json_object"})
    assert matcher(grammar, '{\n\n    "a": 1,\n    "b": [1, 2]\n}').is_accepting()
    assert matcher(grammar, '{\n' + ' ' * 20 + '"a": 1}').is_accepting()
    assert matcher(grammar, '{\n' + ' ' * 21 + '"a": 1}').is_error()
    assert matcher(grammar, '{"a":' + '\n' * 3 + '1}').is_error()


def test_closing_reaches_nested_object_schemas_but_not_all_of() -> None:
    inner = {"type": "object", "properties": {"b": {"type": "string"}}}
    part = {"properties": {"c": {"type": "string"}}}
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": inner}},
              "$defs": {"d": inner}, "allOf": [part]}
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["allOf"] == [part]
    assert "additionalProperties" not in inner  # the request's own schema is untouched


def test_closing_reaches_the_alternatives_and_the_tuple_items() -> None:
    """Each ``anyOf``/``oneOf`` alternative and each ``prefixItems`` member is closed;
    a schema without ``properties``, or that says ``additionalProperties``, is kept."""
    inner = {"type": "object", "properties": {"b": {"type": "string"}}}
    closed = closed_schema({"anyOf": [inner, {"type": "null"}], "oneOf": [inner],
                            "prefixItems": [inner],
                            "patternProperties": {"^x": inner}})
    assert closed["anyOf"] == [{**inner, "additionalProperties": False}, {"type": "null"}]
    assert closed["oneOf"][0]["additionalProperties"] is False
    assert closed["prefixItems"][0]["additionalProperties"] is False
    assert closed["patternProperties"]["^x"]["additionalProperties"] is False
    assert "additionalProperties" not in closed  # no properties of its own
    kept = {**inner, "additionalProperties": {"type": "integer"}}
    assert closed_schema(kept) == kept


def test_a_penalty_must_be_a_number_not_a_boolean() -> None:
    """A boolean is not a penalty (Python would count True as 1); null is none."""
    for key in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(InvalidInput, match=rf"^{key} must be a number, got True$"):
            penalties({key: True}, 0)
    assert penalties({"presence_penalty": None, "frequency_penalty": 0}, 3) == []
    (only,) = penalties({"frequency_penalty": 1}, 3)
    assert (only.prompt_length, only.presence, only.frequency) == (3, 0.0, 1.0)


def test_text_and_absent_formats_have_no_grammar() -> None:
    assert response_grammar(None) is None
    assert response_grammar({"type": "text"}) is None


def allowed_ids(constraint: JsonConstraint, text: str) -> set[int]:
    """The tokens ``constraint`` allows after the answer ``text``."""
    ids = BYTE_LEVEL(text, add_special_tokens=False)["input_ids"]
    scores = constraint(torch.tensor([ids]), torch.zeros(1, len(BYTE_LEVEL)))
    return {int(i) for i in torch.nonzero(scores[0] == 0).flatten()}


def test_end_of_text_is_forbidden_until_the_json_is_whole_and_then_the_only_token() -> None:
    eos = BYTE_LEVEL.eos_token_id
    grammar = response_grammar({"type": "json_object"})
    assert grammar is not None
    constraint = JsonConstraint.start(byte_level_guidance(), grammar, prompt_length=0)
    assert eos not in allowed_ids(constraint, "")
    assert eos not in allowed_ids(constraint, '{"a": 1')
    assert allowed_ids(constraint, '{"a": 1}') == {eos}


def test_logits_beyond_the_tokenizers_tokens_are_never_allowed() -> None:
    """A model with more logits than tokens (vocabularies padded for speed): the extra
    ids, past the mask's last 32-bit word too, become -inf, as does every other token
    the grammar does not allow."""
    grammar = response_grammar({"type": "json_object"})
    assert grammar is not None
    constraint = JsonConstraint.start(byte_level_guidance(), grammar, prompt_length=0)
    width = len(BYTE_LEVEL) + 100
    scores = constraint(torch.tensor([[]], dtype=torch.long), torch.zeros(1, width))
    assert scores.shape == (1, width)
    assert torch.isinf(scores[0, len(BYTE_LEVEL):]).all()
    allowed = {int(i) for i in torch.nonzero(scores[0] == 0).flatten()}
    assert allowed and max(allowed) < len(BYTE_LEVEL)


def test_a_schema_that_cannot_be_followed_is_invalid_input(
        byte_level: TransformersBackend) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    with pytest.raises(InvalidInput, match=r"response_format's JSON schema cannot be "
                                           r"followed: .*/\$defs/missing") as refused:
        chat(byte_level, response_format={"type": "json_schema",
                                          "json_schema": {"name": "x", "schema": schema}})
    assert refused.value.param == "response_format"
    with pytest.raises(InvalidInput, match=r"response_format\.json_schema\.schema must be "
                                           r"a JSON schema object"):
        chat(byte_level, response_format={"type": "json_schema",
                                          "json_schema": {"schema": [1]}})


def test_a_wordpiece_tokenizer_refuses_a_response_format(
        wordpiece: TransformersBackend) -> None:
    with pytest.raises(InvalidInput, match=r"This model's tokenizer cannot be held to a "
                                           r"response_format: .*WordPiece"):
        chat(wordpiece, response_format={"type": "json_object"})
    assert chat(wordpiece, max_tokens=2)[1]["finish_reason"] == "length"  # text still works


def test_a_demanded_tool_call_wins_over_the_response_format(
        wordpiece: TransformersBackend) -> None:
    """As in llama_cpp: the call's prefill shapes the answer, and no constraint is made
    (on this tokenizer, one would be refused)."""
    chunks, _ = drain(wordpiece.infer("chat", {
        "messages": HELLO, "max_tokens": 6, "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_object"},
        "chat_template_kwargs": {"enable_thinking": False}}, threading.Event()))
    calls = [d for c in chunks for d in c.get("tool_calls", ())]
    assert calls[0]["function"]["name"] == "get_weather"


# -- response_format: answers of the random models --------------------------------------


@pytest.mark.parametrize("model", ["byte_level", "sentencepiece"])
def test_a_json_schema_answer_validates_against_the_schema(
        model: str, request: pytest.FixtureRequest) -> None:
    llm: TransformersBackend = request.getfixturevalue(model)
    text, done = chat(llm, max_tokens=300, temperature=0, response_format=AS_SCHEMA)
    assert done["finish_reason"] == "stop", text
    jsonschema_rs.validate(closed_schema(SCHEMA), json.loads(text))


def test_the_answer_ends_where_the_json_does(byte_level: TransformersBackend) -> None:
    """A model that would end at once (logit_bias on end-of-text) writes the whole JSON
    first, then ends: end-of-text is forbidden until then, and the only token after."""
    eos = str(BYTE_LEVEL.eos_token_id)
    assert chat(byte_level, max_tokens=5, logit_bias={eos: 100})[0] == ""
    text, done = chat(byte_level, max_tokens=300, logit_bias={eos: 100},
                      response_format=AS_SCHEMA)
    jsonschema_rs.validate(closed_schema(SCHEMA), json.loads(text))
    tokens = len(BYTE_LEVEL(text, add_special_tokens=False)["input_ids"])
    assert done["finish_reason"] == "stop"
    assert tokens <= done["usage"]["completion_tokens"] - 1  # and end-of-text


def assert_schema_answer_then_unload(model: TransformersBackend) -> None:
    """``model`` (loaded for one test) answers AS_SCHEMA with JSON that follows the
    schema and ends there; then it is unloaded."""
    try:
        text, done = chat(model, max_tokens=300, temperature=0, response_format=AS_SCHEMA)
    finally:
        model.unload()
    jsonschema_rs.validate(closed_schema(SCHEMA), json.loads(text))
    assert done["finish_reason"] == "stop"


def test_a_json_answer_ends_with_the_models_end_token(byte_level_path: Path) -> None:
    """The generation config's end-of-generation token, not the tokenizer's."""
    model = loaded("llm", str(byte_level_path), chat_template=TEMPLATE)
    end = BYTE_LEVEL.convert_tokens_to_ids("<|notimestamps|>")
    assert end != BYTE_LEVEL.eos_token_id
    model._loaded().model.generation_config.eos_token_id = end  # type: ignore[attr-defined]
    assert_schema_answer_then_unload(model)


def byte_level_with_an_added_token() -> Any:
    """BYTE_LEVEL and one added special token, which the model need not know."""
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(resolve_model_path(WHISPER_TOKENIZER)))
    tokenizer.add_tokens(["<|unused|>"], special_tokens=True)
    return tokenizer


@pytest.mark.parametrize(("tokenizer", "extra_logits"),
                         [(BYTE_LEVEL, 64), (byte_level_with_an_added_token(), -1)],
                         ids=["padded", "short"])
def test_a_model_with_more_or_fewer_logits_than_tokens_writes_json(
        tmp_path: Path, tokenizer: Any, extra_logits: int) -> None:
    """Logits padded past the tokenizer's tokens, as Qwen's are; or short of its last
    added token."""
    path = tiny_qwen3(tmp_path, tokenizer, tokenizer.eos_token_id, extra_logits)
    assert_schema_answer_then_unload(loaded("llm", str(path), chat_template=TEMPLATE))


def test_a_json_object_answer_is_one_object(sentencepiece: TransformersBackend) -> None:
    """logit_bias on '"' makes the random model close each string at once (unbiased, it
    writes one for hundreds of tokens); the constraint makes the rest an object."""
    quote = str(SENTENCEPIECE.convert_tokens_to_ids('"'))
    payload = {"max_tokens": 120, "temperature": 0, "logit_bias": {quote: 3}}
    free, _ = chat(sentencepiece, **payload)
    text, done = chat(sentencepiece, **payload, response_format={"type": "json_object"})
    assert free.startswith('""')
    assert isinstance(json.loads(text), dict) and done["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def thinking(byte_level_path: Path) -> Iterator[TransformersBackend]:
    """The byte-level model under a template that opens ``<think>`` in the prompt."""
    model = loaded("llm", str(byte_level_path), chat_template=CHATML)
    yield model
    model.unload()


def test_a_json_answer_after_a_think_the_template_opened_is_the_content(
        thinking: TransformersBackend) -> None:
    """The constraint makes the JSON come first: the thought the template opened is
    closed in the prompt, so the JSON is the answer, not reasoning."""
    chunks, done = drain(thinking.infer("chat", {
        "messages": HELLO, "max_tokens": 300, "temperature": 0,
        "response_format": AS_SCHEMA}, threading.Event()))
    assert not [c for c in chunks if c.get("reasoning")]
    assert isinstance(json.loads("".join(c.get("text", "") for c in chunks)), dict)
    assert done["finish_reason"] == "stop"


def test_a_stop_string_still_ends_a_json_answer(byte_level: TransformersBackend) -> None:
    text, _ = chat(byte_level, max_tokens=300, temperature=0, response_format=AS_SCHEMA)
    cut, done = chat(byte_level, max_tokens=300, temperature=0, response_format=AS_SCHEMA,
                     stop=['"size"'])
    assert cut == text[:text.index('"size"')] and done["finish_reason"] == "stop"


def test_a_cancel_ends_a_json_answer(byte_level: TransformersBackend) -> None:
    cancelled = threading.Event()
    stream = byte_level.infer("chat", {"messages": HELLO, "max_tokens": 300,
                                       "response_format": AS_SCHEMA}, cancelled)
    next(stream)
    cancelled.set()
    rest, done = drain(stream)
    assert rest == [] and done["finish_reason"] == "cancelled"


# -- the openai SDK's parse() against a live server -------------------------------------


class Owner(pydantic.BaseModel):
    age: int = pydantic.Field(ge=0, le=150)
    admin: bool


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    size: Literal["small", "large"]
    tags: list[Annotated[int, pydantic.Field(ge=0, le=99)]] = pydantic.Field(max_length=3)
    owner: Owner


@pytest.fixture(scope="module")
def client(byte_level_path: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[openai.OpenAI]:
    config = {
        "physical_models": {"tiny": {
            "type": "llm", "backend": "transformers", "model_path": str(byte_level_path),
            "estimated_vram": "300MB", "preload": True,
            "options": {"chat_template": TEMPLATE}}},
        "virtual_models": {"tiny": {"physical": "tiny"}},
    }
    server = Server(config, tmp_path_factory.mktemp("json-server"))
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=120) as sdk:
            yield sdk
    finally:
        server.stop()
        wait_until(lambda: not live_workers(), 10, "workers to exit")


@pytest.mark.slow
def test_parse_with_a_pydantic_model_gets_one_whole_or_streamed(
        client: openai.OpenAI) -> None:
    request: Any = {"model": "tiny", "messages": HELLO, "response_format": Pet,
                    "temperature": 0, "max_tokens": 300}
    whole = client.chat.completions.parse(**request).choices[0]
    with client.chat.completions.stream(**request) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert isinstance(whole.message.parsed, Pet) and whole.finish_reason == "stop"
    assert streamed.message.content == whole.message.content
    assert streamed.message.parsed == whole.message.parsed
