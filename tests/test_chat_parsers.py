"""Reasoning and tool-call parsers on outputs of each model family: split at every
possible chunk boundary, they give what they give on the whole text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.chat.harmony import HarmonyParser
from llmux.chat.output import output_formats, output_parser, parsed
from llmux.chat.parsing import OutputParser
from llmux.chat.tagged import TaggedParser

# Outputs in the shapes these families write (Qwen3 / Qwen3.5 and gpt-oss chat turns).
QWEN_THINKING = (
    "<think>\nThe user asks for the capital of France. That is Paris.\n</think>\n\n"
    "The capital of France is **Paris**.")
# A template that opens the think block in the prompt: only the closing tag comes.
QWEN_OPENED = "Okay, 2 + 2 is 4.\nCheck: yes.\n</think>\n\n2 + 2 = 4."
QWEN_INSTRUCT_TOOLS = (
    "I'll check both cities.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Lyon \\"centre\\"", "nested": {"a": [1, 2]}}}\n'
    "</tool_call>")
QWEN_THINKING_TOOL = (
    "<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>')
HARMONY = (
    "<|channel|>analysis<|message|>User wants a joke. Keep it short.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Why did the GPU cross the road? "
    "To get to the other batch.<|return|>")
HARMONY_TOOLS = (
    "<|channel|>analysis<|message|>Need to call get_weather for Tokyo.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather "
    '<|constrain|>json<|message|>{"location": "Tokyo", "unit": "c"}<|call|>')
HARMONY_ROLE_RECIPIENT = (
    "<|channel|>analysis<|message|>Look it up.<|end|>"
    "<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>"
    '{"q": "llmux"}<|call|>')

Factory = Callable[[], OutputParser]


def _ids() -> Callable[[], str]:
    counter = iter(range(1000))
    return lambda: f"call_{next(counter)}"


CASES: dict[str, tuple[str, Factory]] = {
    "qwen-thinking": (QWEN_THINKING, lambda: TaggedParser(think=True, tools=False)),
    "qwen-opened": (QWEN_OPENED, lambda: TaggedParser(
        think=True, tools=False, prompt="<|im_start|>assistant\n<think>\n")),
    "qwen-instruct-tools": (QWEN_INSTRUCT_TOOLS, lambda: TaggedParser(
        think=True, tools=True, prompt="<think>\n\n</think>\n\n", new_id=_ids())),
    "qwen-thinking-tool": (QWEN_THINKING_TOOL, lambda: TaggedParser(
        think=True, tools=True, new_id=_ids())),
    "harmony": (HARMONY, lambda: HarmonyParser(tools=False)),
    "harmony-tools": (HARMONY_TOOLS, lambda: HarmonyParser(tools=True, new_id=_ids())),
    "harmony-role-recipient": (HARMONY_ROLE_RECIPIENT,
                               lambda: HarmonyParser(tools=True, new_id=_ids())),
}


def collect(parser: OutputParser, pieces: list[str]) -> dict[str, Any]:
    """Reasoning, text and whole tool calls, as a client would assemble them."""
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        assert len(delta) == 1
        for call in delta.get("tool_calls", ()):
            whole = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            whole["id"] += call.get("id", "")
            whole["name"] += call.get("function", {}).get("name", "")
            whole["arguments"] += call.get("function", {}).get("arguments", "")
    return {"reasoning": "".join(d.get("reasoning", "") for d in deltas),
            "text": "".join(d.get("text", "") for d in deltas),
            "calls": [calls[i] for i in sorted(calls)], "called": parser.called}


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


EXPECTED: dict[str, dict[str, Any]] = {
    "qwen-thinking": {"reasoning": "The user asks for the capital of France. That is Paris.",
                      "text": "The capital of France is **Paris**.", "calls": [],
                      "called": False},
    "qwen-opened": {"reasoning": "Okay, 2 + 2 is 4.\nCheck: yes.", "text": "2 + 2 = 4.",
                    "calls": [], "called": False},
    "qwen-instruct-tools": {
        "reasoning": "", "text": "I'll check both cities.", "called": True,
        "calls": [{"id": "call_0", "name": "get_weather",
                   "arguments": '{"city": "Paris", "unit": "celsius"}'},
                  {"id": "call_1", "name": "get_weather",
                   "arguments": '{"city": "Lyon \\"centre\\"", "nested": {"a": [1, 2]}}'}]},
    "qwen-thinking-tool": {
        "reasoning": "I need the weather tool.", "text": "", "called": True,
        "calls": [{"id": "call_0", "name": "get_weather", "arguments": '{"city": "Berlin"}'}]},
    "harmony": {"reasoning": "User wants a joke. Keep it short.",
                "text": "Why did the GPU cross the road? To get to the other batch.",
                "calls": [], "called": False},
    "harmony-tools": {
        "reasoning": "Need to call get_weather for Tokyo.", "text": "", "called": True,
        "calls": [{"id": "call_0", "name": "get_weather",
                   "arguments": '{"location": "Tokyo", "unit": "c"}'}]},
    "harmony-role-recipient": {
        "reasoning": "Look it up.", "text": "", "called": True,
        "calls": [{"id": "call_0", "name": "lookup", "arguments": '{"q": "llmux"}'}]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_whole_output_parses_as_the_family_means_it(case: str) -> None:
    text, factory = CASES[case]
    assert collect(factory(), [text]) == EXPECTED[case]


@pytest.mark.parametrize("case", sorted(CASES))
@given(cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_any_chunking_gives_the_same_result(case: str, cuts: list[int]) -> None:
    text, factory = CASES[case]
    assert collect(factory(), split(text, cuts)) == EXPECTED[case]


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_character_at_a_time_gives_the_same_result(case: str) -> None:
    text, factory = CASES[case]
    assert collect(factory(), list(text)) == EXPECTED[case]


@given(text=st.lists(st.sampled_from(
    ["a", " ", "\n", "<", ">", "/", "think", "tool_call", "{", "}", '"name": "f", ',
     '"arguments": ', "<|channel|>", "<|message|>", "<|end|>", "final", "analysis"]),
    max_size=40).map("".join),
    cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_text_never_depends_on_chunking(text: str, cuts: list[int]) -> None:
    for factory in (lambda: TaggedParser(think=True, tools=True, new_id=_ids()),
                    lambda: HarmonyParser(tools=True, new_id=_ids())):
        assert collect(factory(), split(text, cuts)) == collect(factory(), [text])


def test_a_tool_call_in_another_key_order_is_still_a_call() -> None:
    text = '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'
    result = collect(TaggedParser(think=False, tools=True, new_id=_ids()), [text])
    assert result["calls"] == [{"id": "call_0", "name": "f", "arguments": '{"x": 1}'}]


@pytest.mark.parametrize("call", [
    '{"name": "f", "arguments": "{\\"city\\": \\"Paris\\"}"}',
    '{"arguments": "{\\"city\\": \\"Paris\\"}", "name": "f"}',
])
@given(cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_arguments_written_as_a_json_string_come_out_as_their_json(call: str,
                                                                   cuts: list[int]) -> None:
    """Some models quote the arguments; in either key order and any chunking, the
    client's json.loads(arguments) gets the object, not a string."""
    text = f"<tool_call>\n{call}\n</tool_call>"
    result = collect(TaggedParser(think=False, tools=True, new_id=_ids()), split(text, cuts))
    assert result["calls"] == [{"id": "call_0", "name": "f", "arguments": '{"city": "Paris"}'}]


def test_quoted_arguments_cut_short_come_out_as_written() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"city'
    result = collect(TaggedParser(think=False, tools=True, new_id=_ids()), [text])
    assert result["calls"] == [{"id": "call_0", "name": "f", "arguments": '"{\\"city'}]


def test_a_broken_tool_call_is_kept_as_text() -> None:
    text = "<tool_call>not json</tool_call> done"
    result = collect(TaggedParser(think=False, tools=True), [text])
    assert result == {"reasoning": "", "text": "<tool_call>not json</tool_call>done",
                      "calls": [], "called": False}


def test_without_tools_a_tool_call_tag_is_text() -> None:
    result = collect(TaggedParser(think=True, tools=False), ['<tool_call>{"name": "f"}'])
    assert result["text"] == '<tool_call>{"name": "f"}'


def test_unclosed_think_is_all_reasoning() -> None:
    result = collect(TaggedParser(think=True, tools=False), ["<think>still going"])
    assert result["reasoning"] == "still going" and result["text"] == ""


def test_harmony_without_a_header_is_plain_text() -> None:
    text = "Just an answer. " * 30
    assert collect(HarmonyParser(tools=False), list(text))["text"] == text


def test_harmony_function_messages_are_reasoning_when_no_tools_were_offered() -> None:
    result = collect(HarmonyParser(tools=False), [HARMONY_TOOLS])
    assert result["calls"] == [] and '"Tokyo"' in result["reasoning"]


QWEN_TEMPLATE = "{{ '<think>' }}{% if tools %}<tool_call>{% endif %}"
HARMONY_TEMPLATE = "<|start|>assistant<|channel|>final<|message|>"


@pytest.mark.parametrize(("template", "options", "expected"), [
    (QWEN_TEMPLATE, {}, ("think", "hermes")),
    (HARMONY_TEMPLATE, {}, ("harmony", "harmony")),
    ("{{ messages }}", {}, ("none", "none")),
    (QWEN_TEMPLATE, {"reasoning_format": "none", "tool_format": "none"}, ("none", "none")),
    ("{{ messages }}", {"reasoning_format": "think"}, ("think", "none")),
])
def test_formats_come_from_the_template_unless_configured(
        template: str, options: dict[str, str], expected: tuple[str, str]) -> None:
    assert output_formats(template, options) == expected


def test_an_unknown_format_option_is_refused() -> None:
    with pytest.raises(ValueError, match="reasoning_format"):
        output_formats("", {"reasoning_format": "qwen"})


def test_a_stream_that_called_a_tool_finishes_with_tool_calls() -> None:
    def raw() -> Any:
        yield {"text": '<tool_call>{"name": "f", "arguments": {}}'}
        yield {"text": "</tool_call>"}
        return {"finish_reason": "stop", "usage": {"completion_tokens": 9}}

    parser = output_parser(("think", "hermes"), "", {"tools": [{"type": "function"}]})
    stream = parsed(raw(), parser)
    chunks = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as end:
            done = end.value
            break
    assert [c["tool_calls"][0]["index"] for c in chunks] == [0, 0]
    assert done == {"finish_reason": "tool_calls", "usage": {"completion_tokens": 9}}


def test_tool_choice_none_parses_no_calls() -> None:
    parser = output_parser(("think", "hermes"), "", {"tools": [{}], "tool_choice": "none"})
    assert collect(parser, ['<tool_call>{"name": "f", "arguments": {}}</tool_call>'])[
        "calls"] == []
