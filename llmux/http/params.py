"""The generation parameters chat and text completions share, read and checked.

Each is checked where it is read, with its name as ``param``; the result holds only
what the client set, so a virtual model's defaults fill the rest.
"""

from __future__ import annotations

from typing import Any

from llmux.errors import BadRequest
from llmux.http.body import field, integer_in, number_in

MAX_STOP = 16
# The openai SDK's set (OpenAI's, and its ``max``); llmux.chat.virtual.template_effort
# says what each becomes for a chat template.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def max_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (newer SDKs) or ``max_tokens``."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = integer_in(body, name, 1, 2**31 - 1)
        if value is not None:
            return value
    return None


def stop_sequences(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        return None
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("'stop' must be a non-empty string or a list of them.", param="stop")
    if len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' holds at most {MAX_STOP} sequences.", param="stop")
    return stop


def logit_bias(body: dict[str, Any]) -> dict[str, float] | None:
    bias = field(body, "logit_bias", dict)
    if bias is None:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and -100 <= v <= 100
               for v in bias.values()):
        raise BadRequest("'logit_bias' maps token ids to numbers between -100 and 100.",
                         param="logit_bias")
    return {str(k): float(v) for k, v in bias.items()}


def only_one_choice(body: dict[str, Any]) -> None:
    n = field(body, "n", int)
    if n not in (None, 1):
        raise BadRequest("Only n=1 is supported: send one request per choice.", param="n")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise BadRequest(f"'{name}' is not supported by llmux.", param=name)


def include_usage(body: dict[str, Any]) -> bool:
    options = field(body, "stream_options", dict) or {}
    value = options.get("include_usage", False)
    if not isinstance(value, bool) and value is not None:
        raise BadRequest("'stream_options.include_usage' must be a boolean.",
                         param="stream_options.include_usage")
    return bool(value)


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters the client set, checked; unset ones are left out."""
    effort = field(body, "reasoning_effort", str)
    if effort is not None and effort not in REASONING_EFFORTS:
        raise BadRequest(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}.",
                         param="reasoning_effort")
    params = {
        "max_tokens": max_tokens(body),
        "temperature": number_in(body, "temperature", 0.0, 2.0),
        "top_p": number_in(body, "top_p", 0.0, 1.0),
        "min_p": number_in(body, "min_p", 0.0, 1.0),
        "top_k": integer_in(body, "top_k", 0, 2**31 - 1),
        "presence_penalty": number_in(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": number_in(body, "frequency_penalty", -2.0, 2.0),
        "repetition_penalty": number_in(body, "repetition_penalty", 0.01, 10.0),
        "seed": integer_in(body, "seed", -(2**63), 2**64 - 1),
        "stop": stop_sequences(body),
        "logit_bias": logit_bias(body),
        "reasoning_effort": effort,
    }
    return {k: v for k, v in params.items() if v is not None}
