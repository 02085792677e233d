"""Grammars that make a llama.cpp model call a tool when the request demands one
(``tool_choice`` "required" or a named function), in the Hermes ``<tool_call>`` format
the model's template taught it. The arguments follow the tool's JSON schema.

With ``tool_choice`` "auto" nothing is constrained: the model decides, and the output
parser finds the calls it makes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_cpp import llama_grammar  # type: ignore[import-untyped,unused-ignore]

from llmux.backends.base import InvalidInput

__all__ = ["demanded_tools", "tool_call_grammar"]


def demanded_tools(tools: Sequence[Mapping[str, Any]], choice: Any
                   ) -> list[Mapping[str, Any]] | None:
    """The tools one of which must be called, or None when no call is demanded."""
    if choice == "required":
        return list(tools)
    if isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name")
        return [t for t in tools if t["function"]["name"] == name]
    return None


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object"}
    return {"type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """GBNF for one ``<tool_call>`` (or several, if ``parallel``) of one of ``tools``,
    the name before the arguments so that streaming can announce the call early.

    Raises:
        InvalidInput: a tool's parameters are not a JSON schema the converter follows.
    """
    converter = llama_grammar.SchemaConverter(
        prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False,
        raw_pattern=False)
    schema = {"anyOf": [_call_schema(tool) for tool in tools]}
    try:
        converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "tools"),
                        "call")
    except Exception as exc:  # the converter raises bare Exceptions
        raise InvalidInput(f"The tools' parameters cannot be followed as a JSON schema: "
                           f"{exc}") from exc
    one = r'"<tool_call>\n" call "\n</tool_call>"'
    root = f"root ::= {one} (\"\\n\" {one})*" if parallel else f"root ::= {one}"
    return f"{converter.format_grammar()}\n{root}\n"
