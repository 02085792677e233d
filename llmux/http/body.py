"""Reading and checking JSON bodies: size-limited, any content type, a clear 400.

Fields are checked where they are read, with the field's name as ``param``, so a
client learns exactly which field to fix. Unknown fields are tolerated (SDKs send
extras).
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

import falcon.asgi

from llmux.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from llmux.http import json_shape

T = TypeVar("T")

_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
               list: "an array", dict: "an object"}


def media_type(req: falcon.asgi.Request) -> str:
    """The body's media type without parameters, in lower case: media types are
    case-insensitive (RFC 9110 8.3.1), so ``Multipart/Form-Data`` is a form too."""
    return (req.content_type or "").partition(";")[0].strip().lower()


def refuse_encoded(req: falcon.asgi.Request) -> None:
    """Refuse a compressed body: llmux reads bodies as sent, and a gzipped one would be
    reported as invalid JSON or a broken form.

    Raises:
        UnsupportedMediaType: the body has a ``Content-Encoding`` other than identity.
    """
    encoding = req.get_header("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaType(f"The request body has Content-Encoding {encoding!r}; "
                                   "send it uncompressed.")


async def read_json(req: falcon.asgi.Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object.

    Raises:
        UnsupportedMediaType: the body is compressed.
        PayloadTooLarge: the body exceeds ``limit`` bytes.
        BadRequest: the body is not a JSON object, or holds what llmux cannot carry
            (see :mod:`llmux.http.json_shape`).
    """
    refuse_encoded(req)
    if req.content_length is not None and req.content_length > limit:
        raise PayloadTooLarge(f"The request body has {req.content_length} bytes; "
                              f"the limit is {limit}.")
    raw = await req.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        data = json_shape.parse(raw)
    except json_shape.Unrepresentable as exc:
        raise BadRequest(exc.message, param=exc.param) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def field(body: dict[str, Any], name: str, kind: type[T], *, required: bool = False,
          default: T | None = None) -> T | None:
    """``body[name]`` if it has the type ``kind``; None/default when absent or null.

    Raises:
        BadRequest: present with another type, or absent while required.
    """
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required.", param=name)
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise BadRequest(f"'{name}' must be {_TYPE_NAMES.get(kind, kind.__name__)}, "
                         f"got {json.dumps(value)[:80]}.", param=name)
    return value  # type: ignore[return-value]


def number_in(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    """An optional number within ``[low, high]``."""
    value = field(body, name, float)
    if value is not None and not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low:g} and {high:g}, got {value:g}.",
                         param=name)
    return value


def integer_in(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """An optional integer within ``[low, high]``."""
    value = field(body, name, int)
    if value is not None and not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}.",
                         param=name)
    return value


def string_list(body: dict[str, Any], name: str, *, required: bool = False,
                max_items: int | None = None) -> list[str] | None:
    """A string or a non-empty list of strings, as a list."""
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, str):
        return [value]
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise BadRequest(f"'{name}' must be a string or a non-empty list of strings.",
                         param=name)
    if max_items is not None and len(value) > max_items:
        raise BadRequest(f"'{name}' holds at most {max_items} items, got {len(value)}.",
                         param=name)
    return value
