"""Every backend's options: their names and the values each takes.

The config loader lists every unknown or bad option with the config's other problems
(:func:`option_problems`), so a typo stops start-up instead of a model's load, and a
worker checks its model's options again before it builds the backend
(:func:`check_options`), so the backends themselves trust what they read.
The fake backend's options are a test's script and are not checked.

NOTE: nothing here imports a runtime (torch, llama.cpp, onnxruntime...): the server
checks the config, and it never loads a model runtime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeGuard

from llmux.chat.output import REASONING_FORMATS, TOOL_FORMATS
from llmux.spelling import closest

__all__ = ["DTYPES", "KV_CACHE_TYPES", "PASSED_THROUGH", "POOLING", "check_options",
           "option_problems"]

Where = tuple[str | int, ...]
"""A problem's place under ``options``: ``("temperature", 1)``."""
Problems = Iterator[tuple[Where, str]]

PASSED_THROUGH: Final = (
    "condition_on_previous_text",
    "compression_ratio_threshold",
    "log_prob_threshold",
    "no_speech_threshold",
    "hallucination_silence_threshold",
)
"""Options that reach ``WhisperModel.transcribe()`` as written; an absent one keeps
faster-whisper's default. (``temperature`` does too, unless the request sends its own.)"""


def _shown(value: object) -> str:
    """A value as YAML would spell it, as the config's other messages show values."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str | bool) or value is None:
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _is_number(value: object) -> TypeGuard[float]:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and not math.isnan(value))


def _boolean(value: object) -> Problems:
    if not isinstance(value, bool):
        yield (), f"expected a boolean, got {_shown(value)}"


def _string(value: object) -> Problems:
    if not isinstance(value, str):
        yield (), f"expected a string, got {_shown(value)}"


def _integer(minimum: int) -> Callable[[object], Problems]:
    def check(value: object) -> Problems:
        if isinstance(value, bool) or not isinstance(value, int):
            yield (), f"expected an integer, got {_shown(value)}"
        elif value < minimum:
            yield (), f"must be at least {minimum}" if minimum else "must not be negative"

    return check


def _threshold(holds: Callable[[float], bool], rule: str) -> Callable[[object], Problems]:
    """A number that ``holds``, or null: faster-whisper then skips that check."""

    def check(value: object) -> Problems:
        if value is None:
            return
        if not _is_number(value):
            yield (), f"expected a number or null, got {_shown(value)}"
        elif not holds(value):
            yield (), rule

    return check


def _temperature(value: object) -> Problems:
    """A temperature, or the ladder of them tried in turn."""
    if not isinstance(value, list):
        yield from _one_temperature(value, "expected a number or a list of numbers")
        return
    if not value:
        yield (), "expected a number or a list of numbers, got an empty list"
    for index, item in enumerate(value):
        yield from (((index, *where), message)
                    for where, message in _one_temperature(item, "expected a number"))


def _one_temperature(value: object, expected: str) -> Problems:
    if not _is_number(value):
        yield (), f"{expected}, got {_shown(value)}"
    elif value < 0:
        yield (), "must not be negative"


def _choice(*choices: str, fold: bool = False) -> Callable[[object], Problems]:
    """One of ``choices`` (in any case, if ``fold``)."""

    def check(value: object) -> Problems:
        if not (isinstance(value, str) and (value.lower() if fold else value) in choices):
            yield (), f"expected one of {', '.join(choices)}, got {_shown(value)}"

    return check


def _number(holds: Callable[[float], bool], rule: str) -> Callable[[object], Problems]:
    """A number that ``holds``."""

    def check(value: object) -> Problems:
        if not _is_number(value):
            yield (), f"expected a number, got {_shown(value)}"
        elif not holds(value):
            yield (), rule

    return check


def _or_null(check: Callable[[object], Problems]) -> Callable[[object], Problems]:
    """``check``, or null: the backend's default."""

    def either(value: object) -> Problems:
        if value is not None:
            yield from check(value)

    return either


def _auto_boolean(value: object) -> Problems:
    if not (value is None or value == "auto" or isinstance(value, bool)):
        yield (), f'expected true, false or "auto", got {_shown(value)}'


def _strings(value: object) -> Problems:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        yield (), f"expected a list of strings, got {_shown(value)}"


def _string_or_mapping(value: object) -> Problems:
    if not isinstance(value, str | Mapping):
        yield (), f"expected a string or a mapping, got {_shown(value)}"


Checks = Mapping[str, Callable[[object], Problems]]

KV_CACHE_TYPES: Final = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0",
                         "q5_1")
"""llama.cpp's KV cache types, by the names both GGUF backends take (any case)."""
POOLING: Final = ("none", "mean", "cls", "last")
"""llama.cpp's pooling types for embeddings, by name."""
DTYPES: Final = ("auto", "float32", "bfloat16", "float16")
"""The weights' types the transformers backend loads into, by name."""
_POSITIVE_INTEGER: Final = _integer(1)
_SOME_INTEGER: Final = _or_null(_POSITIVE_INTEGER)
_FRACTION: Final = _number(lambda x: 0 <= x <= 1, "must be from 0 to 1")
_POSITIVE: Final = _number(lambda x: x > 0, "must be positive")

_FORMATS: Final[Checks] = {
    "chat_template": _string,
    "reasoning_format": _choice(*REASONING_FORMATS),
    "tool_format": _choice(*TOOL_FORMATS),
}
_LLAMA_CPP: Final[Checks] = {
    **_FORMATS,
    "n_ctx": _or_null(_integer(16)),
    "n_gpu_layers": _or_null(_integer(-1)),
    "n_batch": _SOME_INTEGER,
    "n_threads": _SOME_INTEGER,
    "flash_attn": _auto_boolean,
    "type_k": _or_null(_choice(*KV_CACHE_TYPES, fold=True)),
    "type_v": _or_null(_choice(*KV_CACHE_TYPES, fold=True)),
    "embedding": _boolean,
    "pooling": _or_null(_choice(*POOLING)),
    "verbose": _boolean,
    "mmproj": _string,
}
_LLAMA_SERVER: Final[Checks] = {**_LLAMA_CPP, "binary": _string, "extra_args": _strings}
_FASTER_WHISPER: Final[Checks] = {
    "compute_type": _string,
    "cpu_threads": _integer(0),
    "beam_size": _integer(1),
    "vad_filter": _boolean,
    "condition_on_previous_text": _boolean,
    "temperature": _temperature,
    "compression_ratio_threshold": _threshold(lambda x: x > 0, "must be positive"),
    "log_prob_threshold": _threshold(
        lambda x: x <= 0, "must not be positive: an average log probability is at most 0"),
    "no_speech_threshold": _threshold(
        lambda x: 0 <= x <= 1, "must be from 0 to 1: it bounds a probability"),
    "hallucination_silence_threshold": _threshold(lambda x: x > 0,
                                                  "must be positive (seconds)"),
}
_PIPER: Final[Checks] = {
    "cpu_threads": _integer(0),
    "length_scale": _or_null(_POSITIVE),
    "noise_scale": _or_null(_POSITIVE),
    "noise_w_scale": _or_null(_POSITIVE),
}
_CHATTERBOX: Final[Checks] = {
    "variant": _choice("default", "multilingual", "turbo"),
    "language": _string,
    "exaggeration": _number(lambda x: x >= 0, "must not be negative"),
    "cfg_weight": _number(lambda x: x >= 0, "must not be negative"),
    "temperature": _POSITIVE,
}
_SIDE: Final = _integer(32)
_RAPIDOCR: Final[Checks] = {
    "text_score": _FRACTION,
    "box_thresh": _FRACTION,
    "unclip_ratio": _POSITIVE,
    "use_cls": _boolean,
    "use_angle_cls": _boolean,
    "intra_op_num_threads": _integer(0),
    "inter_op_num_threads": _integer(0),
    "max_side_len": _SIDE,
    "det_limit_side_len": _SIDE,
    **{key: _string for key in ("det_model_path", "cls_model_path", "rec_model_path",
                                 "rec_keys_path")},
}
_TRANSFORMERS: Final[Checks] = {
    "dtype": _choice(*DTYPES),
    "device_map": _string_or_mapping,
    "trust_remote_code": _boolean,
    "attn_implementation": _or_null(_string),
    "gguf": _boolean,
    "gguf_file": _string,
}
_TRANSFORMERS_LLM: Final[Checks] = {
    **_TRANSFORMERS, **_FORMATS, "context_length": _SOME_INTEGER,
    "max_new_tokens": _SOME_INTEGER,
}
TABLES: Final[Mapping[tuple[str, str | None], Checks]] = {
    ("llama_cpp", None): _LLAMA_CPP,
    ("llama_server", None): _LLAMA_SERVER,
    ("faster_whisper", None): _FASTER_WHISPER,
    ("piper", None): _PIPER,
    ("chatterbox", None): _CHATTERBOX,
    ("rapidocr", None): _RAPIDOCR,
    ("transformers", "llm"): _TRANSFORMERS_LLM,
    ("transformers", "vlm"): {**_TRANSFORMERS_LLM, "min_pixels": _POSITIVE_INTEGER,
                              "max_pixels": _POSITIVE_INTEGER},
    ("transformers", "asr"): {**_TRANSFORMERS, "language": _or_null(_string),
                              "max_new_tokens": _SOME_INTEGER},
    ("transformers", "embedding"): {**_TRANSFORMERS, "max_length": _SOME_INTEGER,
                                    "batch_size": _POSITIVE_INTEGER},
    ("transformers", "forecast"): {**_TRANSFORMERS, "batch_size": _POSITIVE_INTEGER,
                                   "truncate": _boolean, "fix_quantile_crossing": _boolean},
}
"""(backend, model type or None for every type) -> each option's check. A backend or
type missing here (the fake backend) takes any option."""
_UNQUANTISED: Final = ("f32", "f16", "bf16")


def _table(backend: str, model_type: str) -> Checks | None:
    return TABLES.get((backend, None), TABLES.get((backend, model_type)))


def _llama_rules(backend: str, options: Mapping[str, Any], device: str | None) -> Problems:
    """What the GGUF backends' options say together and with the device, if known
    (values of the wrong kind are left to their own checks)."""
    on_cpu = None if device is None else not device.startswith("cuda")
    layers = options.get("n_gpu_layers")
    if on_cpu and isinstance(layers, int) and not isinstance(layers, bool) and layers != 0:
        yield ("n_gpu_layers",), (f"{layers} layers on the GPU, but this model is placed "
                                  f"on {device}: only 0 is possible there")
    type_v = options.get("type_v")
    flash = options.get("flash_attn", "auto")
    if flash in (None, "auto"):
        # llama_cpp's own "auto" is on for the CPU only (llama_cpp.py; None: the device is
        # unknown); llama-server's may turn out off anywhere, and it then refuses
        flash = on_cpu if backend == "llama_cpp" else False
    if (isinstance(type_v, str) and type_v.lower() in KV_CACHE_TYPES
            and type_v.lower() not in _UNQUANTISED and flash is False):
        yield ("type_v",), f"a quantised V cache ({type_v}) needs flash_attn: true"


def option_problems(backend: str, model_type: str, options: Mapping[str, Any],
                    device: str | None = "cpu") -> list[tuple[Where, str]]:
    """Every unknown or bad option of a ``backend`` model of ``model_type`` placed on
    ``device`` (None: an unknown device, whose rules are left out), as (where under
    ``options``, message)."""
    table = _table(backend, model_type)
    if table is None:
        return []
    found: list[tuple[Where, str]] = []
    for key, value in options.items():
        check = table.get(key)
        if check is None:
            close = closest(key, table)
            hint = f", did you mean {close}?" if close else ""
            found.append(((key,), f"unknown option{hint} ({backend} takes "
                                  f"{', '.join(sorted(table))})"))
        else:
            found += [((key, *where), message) for where, message in check(value)]
    if backend in ("llama_cpp", "llama_server"):
        found += _llama_rules(backend, options, device)
    return found


def check_options(spec: Mapping[str, Any]) -> None:
    """A worker's check of its model's options before the backend is built.

    Raises:
        ValueError: every problem :func:`option_problems` finds, each named.
    """
    found = option_problems(str(spec.get("backend")), str(spec.get("type")),
                            spec.get("options") or {}, str(spec.get("device") or "cpu"))
    if found:
        raise ValueError("; ".join(
            f"option {'.'.join(map(str, where))}: {message}" for where, message in found))
