"""Reasoning and tool-call parsers on outputs of each model family: split at every
possible chunk boundary, they give what they give on the whole text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmux.chat.harmony import MAX_HEADER, HarmonyParser
from llmux.chat.output import output_formats, output_parser, parsed
from llmux.chat.parsing import OutputParser
from llmux.chat.stops import StopText
from llmux.chat.tagged import TaggedParser, json_answer, open_thought_closed

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


# -- edges of the tag formats ------------------------------------------------------------


def test_without_think_parsing_a_prompt_that_opens_a_think_block_changes_nothing() -> None:
    parser = TaggedParser(think=False, tools=True, prompt="<|im_start|>assistant\n<think>\n")
    assert collect(parser, ["<think>Hi</think>"])["text"] == "<think>Hi</think>"


@pytest.mark.parametrize("prompt", ["<think>\n", "<think>\n\n</think>\n\n"])
def test_whitespace_after_a_think_tag_the_prompt_ends_with_is_dropped(prompt: str) -> None:
    result = collect(TaggedParser(think=True, tools=False, prompt=prompt), ["\n\nHi"])
    assert result["reasoning" if prompt == "<think>\n" else "text"] == "Hi"


def test_whitespace_between_words_survives_any_chunking() -> None:
    text = "<think>a \n\n b</think>c \n\n d"
    expected = {"reasoning": "a \n\n b", "text": "c \n\n d", "calls": [], "called": False}
    assert collect(TaggedParser(think=True, tools=False), list(text)) == expected


def test_whitespace_at_the_end_of_the_output_is_kept() -> None:
    assert collect(TaggedParser(think=True, tools=False), ["Hi \n"])["text"] == "Hi \n"


@pytest.mark.parametrize(("text", "kind"), [
    ("<think>still goi</thi", "reasoning"), ("The answer is <thi", "text")])
def test_what_looked_like_the_start_of_a_tag_at_the_end_is_kept(text: str, kind: str) -> None:
    result = collect(TaggedParser(think=True, tools=True), list(text))
    assert result[kind] == text.removeprefix("<think>")


def test_a_tool_call_cut_short_still_counts_as_called() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"x": 1, "y": 2'
    result = collect(TaggedParser(think=False, tools=True, new_id=_ids()), [text])
    assert result["calls"] == [{"id": "call_0", "name": "f", "arguments": '{"x": 1, "y": 2'}]
    assert result["called"]


def test_a_broken_tool_call_cut_short_is_kept_as_written() -> None:
    result = collect(TaggedParser(think=False, tools=True), ["<tool_call>not json"])
    assert result == {"reasoning": "", "text": "<tool_call>not json", "calls": [],
                      "called": False}


def test_a_json_object_without_a_name_is_not_a_tool_call() -> None:
    text = '<tool_call>{"arguments": {"x": 1}}</tool_call>'
    result = collect(TaggedParser(think=False, tools=True), [text])
    assert result["text"] == text and not result["called"]


@pytest.mark.parametrize(("call", "arguments"), [
    ('{"name": "f", "arguments": {"x": 1} }', '{"x": 1}'),
    ('{"name": "f", "parameters": {"x": 1}}', '{"x": 1}'),
    ('{"arguments": {"city": "Zürich"}, "name": "f"}', '{"city": "Zürich"}'),
    # quoted arguments whose closing quote the model forgot: the outer brace is not theirs
    ('{"name": "f", "arguments": "{\\"q\\": 1}}', '"{\\"q\\": 1}'),
])
def test_tool_call_arguments_are_exactly_the_arguments(call: str, arguments: str) -> None:
    text = f"<tool_call>\n{call}\n</tool_call>"
    for pieces in ([text], list(text)):
        result = collect(TaggedParser(think=False, tools=True, new_id=_ids()), pieces)
        assert result["calls"] == [{"id": "call_0", "name": "f", "arguments": arguments}]


def test_open_thought_closed_closes_only_a_think_block_the_prompt_leaves_open() -> None:
    assert open_thought_closed("<|im_start|>assistant\n<think>\n") == (
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert open_thought_closed("<|im_start|>assistant\n") == "<|im_start|>assistant\n"


@pytest.mark.parametrize(("response_format", "expected"), [
    ({"type": "json_object"}, True), ({"type": "json_schema", "json_schema": {}}, True),
    ({"type": "text"}, False), (None, False)])
def test_json_answer_is_a_json_response_format(response_format: Any, expected: bool) -> None:
    assert json_answer({"response_format": response_format}) is expected


# -- edges of harmony ----------------------------------------------------------------------


def test_a_short_harmony_reply_without_a_header_is_plain_text() -> None:
    assert collect(HarmonyParser(tools=False), ["Hello."])["text"] == "Hello."


def test_a_harmony_body_cut_short_at_a_partial_tag_keeps_it() -> None:
    text = "<|channel|>final<|message|>Hi <|"
    assert collect(HarmonyParser(tools=False), list(text))["text"] == "Hi <|"


def test_a_harmony_header_of_the_longest_length_still_opens_a_message() -> None:
    header = "<|channel|>final".ljust(MAX_HEADER)
    result = collect(HarmonyParser(tools=False), [f"{header}<|message|>Hi"])
    assert result["text"] == "Hi"


@pytest.mark.parametrize("chunks", [
    ["x" * (MAX_HEADER + 1) + "<|message|>Hi"],
    ["y" * (MAX_HEADER - 6), "x" * 10 + "<|start|>assistant"],
    ["x" * (MAX_HEADER + 1), "<|message|>Hi"],
])
def test_text_that_becomes_too_long_for_a_header_comes_out_once(chunks: list[str]) -> None:
    """Once no header can come, the parser gives up on harmony: everything is answer
    text, each character once, the tag that follows included."""
    assert collect(HarmonyParser(tools=False), chunks)["text"] == "".join(chunks)


def test_after_a_message_a_long_header_does_not_make_the_rest_plain_text() -> None:
    text = ("<|channel|>analysis<|message|>Hm.<|end|>" + "x" * (MAX_HEADER + 1) +
            "<|start|>assistant<|channel|>final<|message|>Hi")
    result = collect(HarmonyParser(tools=False), [text])
    assert (result["reasoning"], result["text"]) == ("Hm.", "Hi")


def test_harmony_commentary_without_a_recipient_is_answer_text() -> None:
    text = ("<|channel|>commentary<|message|>Let me look.<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>Hm.<|end|>")
    result = collect(HarmonyParser(tools=True), [text])
    assert (result["reasoning"], result["text"]) == ("Hm.", "Let me look.")


def test_a_harmony_message_to_another_recipient_than_functions_is_no_tool_call() -> None:
    text = '<|channel|>analysis to=browser.search<|message|>{"q": "x"}<|call|>'
    result = collect(HarmonyParser(tools=True), [text])
    assert result["calls"] == [] and not result["called"]
    assert result["reasoning"] == '{"q": "x"}'


def test_harmony_calls_are_numbered_and_the_answer_after_them_is_text() -> None:
    text = ('<|channel|>commentary to=functions.f<|message|>{"a": 1}<|call|>'
            '<|start|>assistant<|channel|>commentary to=functions.g<|message|>{}<|call|>'
            "<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    for pieces in ([text], list(text)):
        result = collect(HarmonyParser(tools=True, new_id=_ids()), pieces)
        assert result["calls"] == [{"id": "call_0", "name": "f", "arguments": '{"a": 1}'},
                                   {"id": "call_1", "name": "g", "arguments": "{}"}]
        assert result["text"] == "Done."


# -- stop strings --------------------------------------------------------------------------


@given(text=st.text("ab\n", max_size=12), stop=st.text("ab", min_size=1, max_size=3),
       empty=st.booleans(), cuts=st.lists(st.integers(min_value=0), max_size=8))
@example(text="xaab", stop="aab", empty=False, cuts=[3])  # hold back "aa", not just "a"
def test_stop_text_cuts_at_the_stop_string_whatever_the_chunking(
        text: str, stop: str, empty: bool, cuts: list[int]) -> None:
    """An empty stop string (the client's ``""``) stops nothing."""
    cut = StopText(["", stop] if empty else [stop])
    out = "".join(cut.feed(piece) for piece in split(text, cuts)) + cut.flush()
    at = text.find(stop)
    assert (out, cut.hit) == ((text[:at], True) if at >= 0 else (text, False))


@given(text=st.text("ab", max_size=10),
       stops=st.lists(st.text("ab", min_size=1, max_size=3), min_size=1, max_size=3),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
@example(text="aba", stops=["b", "aba"], cuts=[])  # "b" is met first, though "aba" starts first
def test_stop_text_cuts_several_stop_strings_as_a_character_stream_would(
        text: str, stops: list[str], cuts: list[int]) -> None:
    """Whatever the chunking, the text comes out cut where feeding it one character at a
    time (what a generator does, token by token) cuts it."""
    one_by_one = StopText(stops)
    expected = "".join(one_by_one.feed(c) for c in text) + one_by_one.flush()
    cut = StopText(stops)
    out = "".join(cut.feed(piece) for piece in split(text, cuts)) + cut.flush()
    assert (out, cut.hit) == (expected, one_by_one.hit)


def test_stop_text_cuts_at_the_first_of_several_stop_strings() -> None:
    cut = StopText(["</s>", "\n\n"])
    assert (cut.feed("Hi.\n\nMore.</s>"), cut.hit) == ("Hi.", True)


# -- choosing and applying a parser --------------------------------------------------------


def test_a_reply_cut_short_in_a_tool_call_still_finishes_with_length() -> None:
    def raw() -> Any:
        yield {"text": '<tool_call>{"name": "f", "arguments": {"x"'}
        return {"finish_reason": "length"}

    stream = parsed(raw(), output_parser(("think", "hermes"), "", {"tools": [{}]}))
    while True:
        try:
            next(stream)
        except StopIteration as end:
            assert end.value == {"finish_reason": "length"}
            break


@pytest.mark.parametrize("formats", [("harmony", "harmony"), ("none", "harmony")])
def test_harmony_parses_no_calls_when_no_tools_were_offered(formats: tuple[str, str]) -> None:
    result = collect(output_parser(formats, "", {}), [HARMONY_TOOLS])
    assert result["calls"] == [] and '"Tokyo"' in result["reasoning"]
