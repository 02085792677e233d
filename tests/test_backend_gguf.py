"""The op dispatch the two GGUF backends share (llmux/backends/gguf.py), without a model:
a backend whose generation and embedding hooks are scripted, behind the real dispatch,
prompt rendering, reply parsing and embedding normalisation."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from llmux.backends import load_backend_class
from llmux.backends.base import InvalidInput, Stream
from llmux.backends.gguf import (
    GgufBackend,
    max_tokens,
    mean_vector,
    stop_strings,
    token_bias,
)
from tests.helpers import drain

HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object",
                                      "properties": {"city": {"type": "string"}}}}}


class Scripted(GgufBackend):
    """A loaded GGUF backend whose every generation replies ``reply``, recording what
    it was asked to complete."""

    backend_name = "scripted"

    def __init__(self, reply: str = "Hi!", **options: Any) -> None:
        super().__init__({"model_id": "scripted", "options": options})
        self.reply = reply
        self.loaded = True
        self.completions: list[dict[str, Any]] = []
        self.embedded: list[list[str]] = []

    def load(self, progress: Any) -> dict[str, Any]:
        return {}

    def _loaded(self) -> bool:
        return self.loaded

    def _prompt_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    def _complete(self, prompt: str, images: Sequence[bytes], payload: Mapping[str, Any],
                  cancelled: threading.Event, *, tool_grammar: str | None = None,
                  harmony: bool = False) -> Stream:
        self.completions.append({"prompt": prompt, "images": list(images),
                                 "tool_grammar": tool_grammar, "harmony": harmony})
        yield {"text": self.reply}
        return {"finish_reason": "stop"}

    def _embed(self, texts: list[str]) -> tuple[Sequence[Sequence[float]], int]:
        self.embedded.append(texts)
        return [[3.0, 4.0 * len(text)] for text in texts], 7


def infer(backend: GgufBackend, op: str, **payload: Any
          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return drain(backend.infer(op, payload, threading.Event()))


@pytest.mark.parametrize("name", ["llama_cpp", "llama_server"])
def test_each_gguf_backend_names_itself_as_it_is_registered(name: str) -> None:
    cls = load_backend_class(name)
    assert issubclass(cls, GgufBackend) and cls.backend_name == name


def test_a_model_that_is_not_loaded_serves_nothing() -> None:
    backend = Scripted()
    backend.loaded = False
    with pytest.raises(RuntimeError, match=r"^the model is not loaded$"):
        backend.infer("chat", {"messages": HELLO}, threading.Event())


@pytest.mark.parametrize("op", ["chat", "complete"])
def test_a_model_loaded_for_embeddings_cannot_generate(op: str) -> None:
    backend = Scripted(embedding=True)
    with pytest.raises(InvalidInput,
                       match=rf"^This model is loaded for embeddings; it cannot {op}\.$"):
        backend.infer(op, {"messages": HELLO, "prompt": "Once"}, threading.Event())
    assert backend.completions == []


def test_embed_needs_a_model_loaded_for_embeddings() -> None:
    with pytest.raises(InvalidInput, match=r"^This model is not loaded for embeddings \(the "
                                           r"scripted option embedding: true does that\)\.$"):
        Scripted().infer("embed", {"input": ["x"]}, threading.Event())


def test_an_op_no_gguf_backend_serves_is_refused_by_the_backends_name() -> None:
    with pytest.raises(InvalidInput,
                       match=r"^The scripted backend does not support 'speech'\.$"):
        Scripted().infer("speech", {"text": "x"}, threading.Event())


def test_template_answers_the_rendered_prompt_and_its_token_count() -> None:
    chunks, done = infer(Scripted(), "template", messages=HELLO)
    assert chunks == []
    assert done == {"prompt": "user: Hello there\nassistant: ", "prompt_tokens": 4}


def test_complete_generates_after_the_prompt_as_it_is() -> None:
    backend = Scripted()
    chunks, done = infer(backend, "complete", prompt="Once upon")
    assert (chunks, done) == ([{"text": "Hi!"}], {"finish_reason": "stop"})
    assert backend.completions == [{"prompt": "Once upon", "images": [],
                                    "tool_grammar": None, "harmony": False}]


def test_chat_generates_after_the_rendered_prompt_with_its_images_in_place() -> None:
    backend = Scripted()
    backend._marker = "<image>"
    picture = {"type": "image", "image": b"png bytes"}
    infer(backend, "chat", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, picture]}])
    assert backend.completions == [{"prompt": "user: What is it?\n<image>\nassistant: ",
                                    "images": [b"png bytes"], "tool_grammar": None,
                                    "harmony": False}]


def test_a_text_only_model_refuses_images() -> None:
    with pytest.raises(InvalidInput):
        Scripted().infer("chat", {"messages": [{"role": "user", "content": [
            {"type": "image", "image": b"png bytes"}]}]}, threading.Event())


def test_a_chat_reply_is_parsed_by_the_models_format() -> None:
    backend = Scripted("<think>Greet back.</think>Hello!", reasoning_format="think")
    backend._formats = ("think", "none")
    chunks, done = infer(backend, "chat", messages=HELLO)
    assert "".join(c.get("reasoning", "") for c in chunks) == "Greet back."
    assert "".join(c.get("text", "") for c in chunks) == "Hello!"
    assert done["finish_reason"] == "stop"


def test_a_harmony_model_generates_its_control_tokens_as_text() -> None:
    backend = Scripted("<|channel|>final<|message|>Hello!")
    backend._formats = ("harmony", "harmony")
    infer(backend, "chat", messages=HELLO)
    assert backend.completions[0]["harmony"] is True


@pytest.mark.parametrize(("tool_choice", "formats", "held"), [
    ("required", ("none", "hermes"), True),
    ({"type": "function", "function": {"name": "weather"}}, ("none", "hermes"), True),
    ("auto", ("none", "hermes"), False),
    ("required", ("harmony", "harmony"), False),
])
def test_a_demanded_tool_call_of_a_hermes_model_is_held_by_a_grammar(
        tool_choice: Any, formats: tuple[str, str], held: bool) -> None:
    backend = Scripted("<tool_call>\n{}\n</tool_call>")
    backend._formats = formats
    infer(backend, "chat", messages=HELLO, tools=[WEATHER], tool_choice=tool_choice)
    grammar = backend.completions[0]["tool_grammar"]
    assert (grammar is not None) == held
    if held:
        assert '"<tool_call>\\n" call "\\n</tool_call>"' in grammar


CLOCK = {"type": "function", "function": {"name": "clock"}}


@pytest.mark.parametrize(("tool_choice", "parallel", "names"), [
    ("required", None, ["weather", "clock"]),
    ({"type": "function", "function": {"name": "clock"}}, None, ["clock"]),
    ("required", True, ["weather", "clock"]),
    ("required", False, ["weather", "clock"]),
])
def test_the_grammar_holds_the_demanded_tools_and_repeats_only_when_asked(
        tool_choice: Any, parallel: bool | None, names: list[str]) -> None:
    """"required" allows any of the tools, a named function that one only; several calls
    only with ``parallel_tool_calls: true``; the arguments follow the name in each call."""
    backend = Scripted("<tool_call>\n{}\n</tool_call>")
    backend._formats = ("none", "hermes")
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    infer(backend, "chat", messages=HELLO, tools=[WEATHER, CLOCK], tool_choice=tool_choice,
          **extra)
    grammar = backend.completions[0]["tool_grammar"]
    held = sorted(line.split("::=")[1].strip() for line in grammar.splitlines()
                  if line.startswith("call-") and line.split("::=")[0].strip()
                  .endswith("-name"))
    assert held == sorted(f'"\\"{name}\\""' for name in names)
    calls = [line for line in grammar.splitlines() if line.startswith("call-")
             and line.split("::=")[0].strip().count("-") == 1]
    assert calls == [f'call-{n} ::= "{{" space call-{n}-name-kv "," space '
                     f'call-{n}-arguments-kv "}}" space' for n in range(len(names))]
    # clock declares no parameters: its arguments are an object, not any JSON value
    assert re.search(r"^call-\d-arguments ::= object$", grammar, re.MULTILINE)
    assert grammar.rstrip().endswith(")*") == (parallel is True)


def test_a_named_function_that_is_not_offered_holds_nothing() -> None:
    backend = Scripted()
    backend._formats = ("none", "hermes")
    infer(backend, "chat", messages=HELLO, tools=[WEATHER],
          tool_choice={"type": "function", "function": {"name": "clock"}})
    assert backend.completions[0]["tool_grammar"] is None


def test_a_demanded_call_after_a_think_the_template_opened_is_a_call() -> None:
    """The template opens ``<think>`` in the prompt and the grammar makes the call come
    first: the thought is closed in the prompt, so the call is not taken for reasoning."""
    backend = Scripted('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}'
                       "\n</tool_call>")
    backend._formats = ("think", "hermes")
    backend._template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                         "<|im_start|>assistant\n<think>\n")
    chunks, done = infer(backend, "chat", messages=HELLO, tools=[WEATHER],
                         tool_choice="required")
    assert backend.completions[0]["prompt"].endswith("<think>\n\n</think>\n\n")
    assert not [c for c in chunks if "reasoning" in c]
    assert [c["tool_calls"][0]["function"]["name"] for c in chunks
            if c.get("tool_calls") and "name" in c["tool_calls"][0]["function"]] == ["weather"]
    assert done["finish_reason"] == "tool_calls"


def test_a_json_answer_after_a_think_the_template_opened_is_the_answer() -> None:
    """A response_format grammar makes the JSON come first: the thought the template
    opened is closed in the prompt, so the JSON is the content, not reasoning."""
    backend = Scripted('{"city": "Paris"}')
    backend._formats = ("think", "hermes")
    backend._template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                         "<|im_start|>assistant\n<think>\n")
    chunks, _ = infer(backend, "chat", messages=HELLO,
                      response_format={"type": "json_object"})
    assert backend.completions[0]["prompt"].endswith("<think>\n\n</think>\n\n")
    assert "".join(c.get("text", "") for c in chunks) == '{"city": "Paris"}'
    assert not [c for c in chunks if "reasoning" in c]


def test_embeddings_come_back_normalised_in_order() -> None:
    backend = Scripted(embedding=True)
    chunks, done = infer(backend, "embed", input=["a", "bb"])
    assert chunks == []
    assert done == {"embeddings": [[0.6, 0.8], [3 / 73 ** 0.5, 8 / 73 ** 0.5]],
                    "usage": {"prompt_tokens": 7, "total_tokens": 7}}


def test_one_text_to_embed_is_a_list_of_one() -> None:
    backend = Scripted(embedding=True)
    infer(backend, "embed", input="a")
    assert backend.embedded == [["a"]]


def test_nothing_to_embed_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"^There is nothing to embed: the input is empty\.$"):
        infer(Scripted(embedding=True), "embed", input=[])


def test_warmup_generates_one_token_or_embeds_once() -> None:
    generator, embedder = Scripted(), Scripted(embedding=True)
    generator.warmup()
    embedder.warmup()
    assert [c["prompt"] for c in generator.completions] == ["Hello"]
    assert embedder.embedded == [["warm up"]]


def test_request_limits_shared_by_both_gguf_backends() -> None:
    assert max_tokens({}) is None
    assert max_tokens({"max_tokens": 7}) == 7
    with pytest.raises(InvalidInput, match="max_tokens must be at least 1, got 0"):
        max_tokens({"max_tokens": 0})
    assert stop_strings({"stop": "\n"}) == ["\n"]
    assert stop_strings({"stop": ["a", "b"]}) == ["a", "b"]
    assert stop_strings({"stop": None}) == []


def test_logit_bias_is_checked_against_the_vocabulary_when_known() -> None:
    assert token_bias({"3": 5, "0": -100}, 10) == {3: 5.0, 0: -100.0}
    assert token_bias({"123456": 1}, None) == {123456: 1.0}
    with pytest.raises(InvalidInput, match="logit_bias token 10 is not in this model's "
                                          "vocabulary of 10 tokens"):
        token_bias({"10": 1}, 10)
    with pytest.raises(InvalidInput, match="logit_bias keys are token ids, got 'cat'"):
        token_bias({"cat": 1}, 10)
    with pytest.raises(InvalidInput, match="logit_bias token -1 is not in this model's "):
        token_bias({"-1": 1}, 10)  # Python would take it as the last token


def test_a_text_without_pooling_is_the_average_of_its_token_vectors() -> None:
    """The plain mean (the vectors are normalised later, so only a unit test sees a
    wrong scale)."""
    assert mean_vector([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]]) == [3.0, 3.0]
    assert mean_vector([[4.0, -2.0]]) == [4.0, -2.0]
    assert mean_vector([]) == []


def test_a_single_stop_string_is_one_stop_not_its_characters() -> None:
    assert stop_strings({"stop": "END"}) == ["END"]
    assert stop_strings({"stop": ["END", 7]}) == ["END", "7"]


@pytest.mark.parametrize("name", ["llama_cpp", "llama_server"])
def test_the_projector_is_the_models_file_else_the_option(name: str, tmp_path: Path) -> None:
    """The model's ``files: {mmproj: ...}`` wins over the ``mmproj`` option."""
    pulled, configured = tmp_path / "pulled.gguf", tmp_path / "configured.gguf"
    pulled.write_bytes(b"GGUF")
    configured.write_bytes(b"GGUF")
    cls = load_backend_class(name)
    assert issubclass(cls, GgufBackend)
    spec: dict[str, Any] = {"model_id": "m", "options": {"mmproj": str(configured)}}
    assert cls(spec)._mmproj_path() == configured
    assert cls({**spec, "files": {"mmproj": str(pulled)}})._mmproj_path() == pulled
    assert cls({"model_id": "m", "files": {"mmproj": str(pulled)}})._mmproj_path() == pulled
    assert cls({"model_id": "m"})._mmproj_path() is None
