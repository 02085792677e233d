"""What a client's JSON may hold before anything acts on it: pure checks, no I/O.

Python's parser takes things the rest of llmux cannot carry: strings with unpaired
surrogates (``"\\ud800"`` is valid JSON but not encodable as UTF-8), integers of any
size, and nesting as deep as its recursion limit (beyond which it raises
``RecursionError``). Each would fail later, far from the request (the msgpack frame to
the worker refuses all three), so they are refused here as a 400 that names the place.

PERF: a body may be megabytes of numbers (a forecast batch); the checks look at every
container but loop over scalars only in C (``map``, ``min``), and :func:`parse` only
looks at strings when the text could hold a surrogate.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, TypeAlias

MAX_DEPTH: Final = 64  # containers inside containers; tool schemas nest ~10, msgpack 511
MIN_INT: Final = -(2**63)  # what a msgpack frame carries: int64 ...
MAX_INT: Final = 2**64 - 1  # ... up to uint64
MAX_PARAM_CHARS: Final = 200  # a path in an error names the place, not the whole key

_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# In JSON text an unpaired surrogate can only be a \u escape (the text itself is UTF-8);
# this also matches an escaped backslash before "ud800", which only costs the full check.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_SCALARS: Final = frozenset({int, float, bool, type(None)})
_TEXT_SCALARS: Final = _SCALARS | {str}
_NUMBERS: Final = frozenset({int, float, bool})
Path: TypeAlias = "tuple[Path, str | int] | None"  # (parent, key or index), built lazily


class Unrepresentable(ValueError):
    """A JSON value llmux cannot carry; the message says what and ``param`` where."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def parse(raw: bytes) -> Any:
    """The JSON document in ``raw`` (UTF-8, as RFC 8259 requires; a BOM is skipped).

    Raises:
        Unrepresentable: an integer beyond 64 bits, nesting deeper than ``MAX_DEPTH``,
            or an unpaired surrogate.
        ValueError: not UTF-8 (``UnicodeDecodeError``) or not JSON.
    """
    text = raw.decode("utf-8-sig")
    try:
        data = json.loads(text)
    except RecursionError as exc:  # the parser's own limit, far beyond MAX_DEPTH
        raise Unrepresentable(f"The request body nests deeper than {MAX_DEPTH} "
                              "levels.") from exc
    except ValueError:
        # NOTE: an integer past Python's 4300-digit conversion limit is a ValueError
        # too; parsing again with the hook (only on this error path) names it.
        json.loads(text, parse_int=bounded_int)
        raise
    check(data, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return data


def bounded_int(literal: str) -> int:
    """A ``parse_int`` hook: an integer that fits a 64-bit frame.

    Raises:
        Unrepresentable: the literal is out of range (checked on its length first,
            so a 100,000-digit number costs nothing).
    """
    value = int(literal) if len(literal) <= len(str(MIN_INT)) else None
    if value is None or not MIN_INT <= value <= MAX_INT:
        raise _too_big(len(literal), None)
    return value


def check(data: object, *, strings: bool = True) -> None:
    """Refuse ``data`` (parsed JSON, or form fields) if it nests deeper than ``MAX_DEPTH``,
    holds an integer beyond 64 bits or, with ``strings``, a string (value or key) with an
    unpaired surrogate.

    Raises:
        Unrepresentable: the first problem found, with its path as ``param``.
    """
    scalars = _SCALARS if strings else _TEXT_SCALARS  # what needs no closer look
    stack: list[tuple[Path, int, object]] = [(None, 0, data)]
    while stack:
        path, depth, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _surrogate(path)
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            if not MIN_INT <= value <= MAX_INT:
                raise _too_big(len(str(value)), path)
            continue
        if depth >= MAX_DEPTH:  # NOTE: only containers and strings are pushed this deep
            raise Unrepresentable(f"The request body nests deeper than {MAX_DEPTH} levels.",
                                  param=_param(path))
        if isinstance(value, dict):
            if strings:
                stack.extend(((path, key), depth + 1, key) for key in value)
            kinds = set(map(type, value.values()))
            if not kinds <= scalars:
                stack.extend(((path, key), depth + 1, item) for key, item in value.items()
                             if type(item) not in scalars)
        elif isinstance(value, list):
            kinds = set(map(type, value))
            if not kinds <= scalars:
                stack.extend(((path, i), depth + 1, item) for i, item in enumerate(value)
                             if type(item) not in scalars)
        else:
            continue
        if int in kinds:
            _check_ints(value, kinds, path)


def _check_ints(container: dict[Any, Any] | list[Any], kinds: set[type], path: Path
                ) -> None:
    """The integers directly in ``container`` (whose value types are ``kinds``) are in
    range: ``min``/``max`` run in C; only an offender is looked for in Python."""
    values = container.values() if isinstance(container, dict) else container
    ints = values if kinds <= {int, bool} else [v for v in values if type(v) is int]
    if min(ints) >= MIN_INT and max(ints) <= MAX_INT:
        return
    keyed = container.items() if isinstance(container, dict) else enumerate(container)
    key, value = next((k, v) for k, v in keyed
                      if type(v) is int and not MIN_INT <= v <= MAX_INT)
    raise _too_big(len(str(value)), (path, key))


def _too_big(digits: int, path: Path) -> Unrepresentable:
    return Unrepresentable(f"The request body holds an integer of {digits} characters; "
                           "integers must fit in 64 bits.", param=_param(path))


def _surrogate(path: Path) -> Unrepresentable:
    return Unrepresentable("A string holds an unpaired UTF-16 surrogate (such as \\ud800); "
                           "text must be valid Unicode.", param=_param(path))


def _param(path: Path) -> str | None:
    """``messages[0].content``, at most ``MAX_PARAM_CHARS`` long and encodable.

    NOTE: a key may hold the very surrogate refused here; the reply must not.
    """
    parts: list[str] = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    text = "".join(reversed(parts)).lstrip(".")[:MAX_PARAM_CHARS]
    return text.encode("utf-8", "backslashreplace").decode() or None
