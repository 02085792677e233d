"""API keys: who may call llmux, and which models each caller may use.

The keys file (``server.api_keys_file``) lists named keys. Only their SHA-256 digests are
kept in memory, and out of every ``repr``, so a key cannot leak through a log line or an
error message. :class:`KeyStore` checks ``Authorization: Bearer <key>`` against every digest
in constant time and picks up edits to the file without a restart, keeping the last good
keys when an edit breaks the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final, Protocol

import attrs
import yaml

from llmux.config import ConfigError, load_yaml, yaml_problem
from llmux.errors import Unauthorized

__all__ = ["RELOAD_INTERVAL_S", "ApiKey", "KeyStore", "load_keys", "parse_keys"]

log = logging.getLogger(__name__)

RELOAD_INTERVAL_S: Final = 1.0  # how often a request may make the store stat its file

_DIGEST_PREFIX: Final = "sha256:"
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")
_PLAIN_KEY: Final = re.compile(r"[\x21-\x7e]+")  # what survives an HTTP header unchanged
_FIELDS: Final = ("name", "key", "models", "admin")

_MISSING_HEADER: Final = "Send your API key as 'Authorization: Bearer <key>'."
_WRONG_SCHEME: Final = (
    "The Authorization header must use the Bearer scheme: 'Authorization: Bearer <key>'."
)
_NO_KEY: Final = "The Authorization header has no key after 'Bearer'."
_SPACES: Final = "The Authorization header must be 'Bearer <key>', with no spaces in the key."
_INVALID_KEY: Final = "The API key is not valid."

_Signature = tuple[int, int, int]  # (mtime_ns, size, inode) of the keys file


def _digest(key: str) -> bytes:
    # NOTE: surrogatepass, so a str decoded with surrogateescape hashes instead of raising.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _is_digest(_: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if not (isinstance(value, bytes) and len(value) == 32):
        raise ValueError(f"{attribute.name} must be a 32-byte SHA-256 digest")


@attrs.frozen(kw_only=True)
class ApiKey:
    """A named caller: the models it may use and whether it may use ``/admin``.

    Holds the SHA-256 of the key, never the key, and leaves it out of ``repr``.
    """

    name: str
    digest: bytes = attrs.field(repr=False, validator=_is_digest)
    models: tuple[str, ...] = ("*",)
    admin: bool = False

    @classmethod
    def from_key(
        cls, name: str, key: str, *, models: Iterable[str] = ("*",), admin: bool = False
    ) -> ApiKey:
        """An entry for a plain key, hashed here (the key itself is not kept)."""
        return cls(name=name, digest=_digest(key), models=tuple(models), admin=admin)

    def allows(self, model: str) -> bool:
        """Whether this key may use ``model``: ``"*"`` allows all, otherwise exact names.

        NOTE: ``admin`` does not widen the list; an admin key that should reach every
        model says ``"*"`` (the default when ``models`` is left out).
        """
        return "*" in self.models or model in self.models


# --- parsing -----------------------------------------------------------------------------


_KINDS: Final = (
    (bool, "a boolean"),  # before int: a bool is an int
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (Mapping, "a mapping"),
    (list, "a list"),
)


def _kind(value: object) -> str:
    """What a value is, without its content: used wherever it might be a secret."""
    if value is None:
        return "null"
    return next((kind for t, kind in _KINDS if isinstance(value, t)), f"a {type(value).__name__}")


def _show(value: object) -> str:
    """A value that is never secret (a name, a model), as YAML would spell it."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int | float):
        return repr(value)
    return _kind(value)


class _Report(Protocol):
    """Records a problem with one field of an entry (``sub`` continues the path)."""

    def __call__(self, field: object, message: str, sub: str = "") -> None: ...


def _name(raw: Mapping[object, object], report: _Report) -> str | None:
    name = raw.get("name")
    if "name" not in raw:
        report("name", "required")
    elif not isinstance(name, str):
        report("name", f"expected a string, got {_show(name)}")
    elif not name.strip():
        report("name", "must not be empty")
    else:
        return name
    return None


def _key_digest(raw: Mapping[object, object], report: _Report) -> bytes | None:
    """The digest of the ``key`` field; problems describe the value but never quote it."""
    key = raw.get("key")
    if "key" not in raw:
        report("key", "required")
    elif not isinstance(key, str):
        report("key", f"expected a string, got {_kind(key)} (quote the key)")
    elif not key:
        report("key", "must not be empty")
    # NOTE: the prefix is matched in any case, so "SHA256:..." is not taken as a plain key.
    elif key[: len(_DIGEST_PREFIX)].lower() == _DIGEST_PREFIX:
        hexdigits = key[len(_DIGEST_PREFIX) :]
        if _HEX64.fullmatch(hexdigits):
            return bytes.fromhex(hexdigits)
        report("key", f'"{_DIGEST_PREFIX}" must be followed by 64 hex digits')
    elif not _PLAIN_KEY.fullmatch(key):
        message = "a plain key must be printable ASCII without spaces"
        report("key", f"{message} (clients send it in an HTTP header)")
    else:
        return _digest(key)
    return None


def _models(raw: Mapping[object, object], report: _Report) -> tuple[str, ...] | None:
    models = raw.get("models", ["*"])
    if not isinstance(models, list):
        report("models", f'expected a list of model names or ["*"], got {_show(models)}')
        return None
    good = True
    for i, model in enumerate(models):
        if not isinstance(model, str):
            report("models", f"expected a model name, got {_show(model)}", f"[{i}]")
        elif not model.strip():
            report("models", "must not be empty", f"[{i}]")
        good = good and isinstance(model, str) and bool(model.strip())
    return tuple(models) if good else None


def _entry(
    raw: Mapping[object, object], i: int, names: dict[str, int], digests: dict[bytes, int]
) -> tuple[ApiKey | None, list[str]]:
    """Entry ``keys[i]`` and its problems in document order; ``names`` and ``digests``
    remember which entry used each first, to name the original of a duplicate."""
    order = {field: n for n, field in enumerate(raw)}
    found: list[tuple[int, str]] = []

    def report(field: object, message: str, sub: str = "") -> None:
        # NOTE: a missing field sorts first, as config.py sorts a parent before its children.
        found.append((order.get(field, -1), f"keys[{i}].{field}{sub}: {message}"))

    for field in raw:
        if field not in _FIELDS:
            report(field, f"unknown field (expected {', '.join(_FIELDS)})")
    name = _name(raw, report)
    if name is not None and (first := names.setdefault(name, i)) != i:
        report("name", f"duplicate name {_show(name)} (first used by keys[{first}])")
    digest = _key_digest(raw, report)
    if digest is not None and (first := digests.setdefault(digest, i)) != i:
        report("key", f"the same key as keys[{first}]")
    models = _models(raw, report)
    admin = raw.get("admin", False)
    if not isinstance(admin, bool):
        report("admin", f"expected true or false, got {_show(admin)}")
    problems = [line for _, line in sorted(found, key=lambda problem: problem[0])]
    if problems or name is None or digest is None or models is None:
        return None, problems
    return ApiKey(name=name, digest=digest, models=models, admin=admin is True), []


def parse_keys(data: object, source: str) -> list[ApiKey]:
    """Validate a loaded keys document ``{"keys": [{name, key, models?, admin?}, ...]}``.

    ``keys: []`` is valid and means no key is accepted. ``source`` names the document in
    the error.

    Raises:
        ConfigError: every problem at once, by path (``keys[2].key: ...``), in document
            order; a problem with a key says what is wrong but never quotes the key.
    """
    if not isinstance(data, Mapping):
        got = "the file is empty" if data is None else f"got {_kind(data)}"
        problem = f'(top level): expected a mapping with a "keys" list, {got}'
        raise ConfigError([problem], source=source)
    fields = list(data)
    at = fields.index("keys") if "keys" in data else -1  # a missing section sorts first
    unknown = [
        (n, f"{k}: unknown field (expected keys)") for n, k in enumerate(fields) if k != "keys"
    ]
    found = [line for n, line in unknown if n < at]
    entries = data.get("keys")
    if "keys" not in data:
        found.append("keys: required")
    elif not isinstance(entries, list):
        found.append(f"keys: expected a list (keys: [] for none), got {_kind(entries)}")
    keys: list[ApiKey] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for i, raw in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(raw, Mapping):
            found.append(f"keys[{i}]: expected a mapping with name and key, got {_kind(raw)}")
            continue
        key, problems = _entry(raw, i, names, digests)
        found += problems
        keys += [key] if key is not None else []
    found += [line for n, line in unknown if n > at]
    if found:
        raise ConfigError(found, source=source)
    return keys


# --- loading -----------------------------------------------------------------------------


def _signature(stat: os.stat_result) -> _Signature:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _read(path: Path) -> tuple[_Signature, list[ApiKey]]:
    """The keys in ``path`` and the signature of the very file they were read from.

    NOTE: the signature is taken (fstat) before reading, so an edit made while reading
    changes the signature again and is picked up by the next check.
    """
    source = str(path)
    try:
        with open(path, "rb") as stream:
            signature = _signature(os.fstat(stream.fileno()))
            data = load_yaml(stream)
    except OSError as exc:
        raise ConfigError([f"{source}: {exc.strerror or exc}"], source=source) from exc
    except yaml.YAMLError as exc:
        raise yaml_problem(source, exc) from None
    return signature, parse_keys(data, source)


def load_keys(path: Path) -> list[ApiKey]:
    """Read and validate a keys file.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, or is invalid; the
            error names the file.
    """
    return _read(path)[1]


class KeyStore:
    """The API keys in force, and the check of a request's ``Authorization`` header.

    A store without a path is disabled: authentication is off. Edits to the file take
    effect at the first request at least ``RELOAD_INTERVAL_S`` after the last check (by
    ``clock``); an edit that breaks the file, or deleting it, is logged and the last good
    keys stay in force. Not thread-safe: it lives on the server's event loop.
    """

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Load the keys now, so that a bad file stops start-up.

        Raises:
            ConfigError: the file is missing, not YAML, or invalid (every problem listed).
        """
        self._path = path
        self._clock = clock
        self._keys: tuple[ApiKey, ...] = ()
        self._seen: _Signature | None = None  # None: the file was missing at the last check
        self._next_check = clock() + RELOAD_INTERVAL_S
        if path is not None:
            self._seen, keys = _read(path)
            self._install(keys, "loaded")

    @property
    def enabled(self) -> bool:
        """Whether requests must carry a key."""
        return self._path is not None

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """The keys in force, in file order (for names and counts; digests stay inside)."""
        return self._keys

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key a request's ``Authorization`` header carries; None when the store is off.

        Raises:
            Unauthorized: no header, not ``Bearer <key>``, or a key not in the file. The
                message never quotes what the client sent.
        """
        if self._path is None:
            return None
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + RELOAD_INTERVAL_S
            self.reload_if_changed()
        digest = _digest(_bearer_key(authorization))
        found: ApiKey | None = None
        # NOTE: compare with every key, no early exit: the time taken must not tell which
        # key (or which position) matched.
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise Unauthorized(_INVALID_KEY)
        return found

    def reload_if_changed(self) -> bool:
        """Re-read the file if its (mtime, size, inode) changed; True when new keys took effect.

        Not throttled (``authenticate`` throttles). A broken, unreadable or deleted file is
        logged as a warning once per change, and the keys in force stay.
        """
        if self._path is None:
            return False
        try:
            signature = _signature(os.stat(self._path))
        except OSError as exc:
            if self._seen is not None:
                what = "was deleted" if isinstance(exc, FileNotFoundError) else "cannot be read"
                log.warning(
                    "API keys file %s %s (%s); keeping the %d keys in force",
                    self._path,
                    what,
                    exc.strerror,
                    len(self._keys),
                )
            self._seen = None
            return False
        if signature == self._seen:
            return False
        try:
            self._seen, keys = _read(self._path)
        except ConfigError as exc:
            self._seen = signature
            log.warning(
                "API keys file %s changed but cannot be used; keeping the %d keys in force:%s",
                self._path,
                len(self._keys),
                "".join(f"\n  {p}" for p in exc.problems),
            )
            return False
        self._install(keys, "reloaded")
        return True

    def _install(self, keys: list[ApiKey], verb: str) -> None:
        self._keys = tuple(keys)
        if not keys:
            log.warning(
                "API keys %s from %s: none, every request will be refused", verb, self._path
            )
            return
        names = ", ".join(key.name for key in keys)
        log.info("API keys %s from %s: %d (%s)", verb, self._path, len(keys), names)


def _bearer_key(authorization: str | None) -> str:
    """The key in ``Bearer <key>`` (scheme in any case, whitespace around tolerated).

    Raises:
        Unauthorized: the header is missing, blank, or not ``Bearer <key>``.
    """
    parts = (authorization or "").split()
    if not parts:
        raise Unauthorized(_MISSING_HEADER)
    # NOTE: never echo parts[0]: a client that forgot the scheme sends its key there.
    if parts[0].lower() != "bearer":
        raise Unauthorized(_WRONG_SCHEME)
    if len(parts) == 1:
        raise Unauthorized(_NO_KEY)
    if len(parts) > 2:
        raise Unauthorized(_SPACES)
    return parts[1]
