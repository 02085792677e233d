"""Typed llmux configuration: YAML in, frozen attrs classes out, every problem at once.

A bad config must stop start-up with *all* its problems listed by path, so the operator
fixes the file in one go. One cattrs converter (:func:`make_converter`) structures each
section with strict scalar hooks (plain cattrs would call ``int("9")`` and
``bool("no")``) and refuses unknown keys; :func:`problems` adds the cross-field checks.
Config says ``"9GB"``; code says int bytes.
"""

import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import IO, Annotated, Any, Final, TypeVar, get_origin

import attrs
import cattrs
import yaml
from cattrs.cols import list_structure_factory
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn, make_mapping_structure_fn

from llmux.backends.options import option_problems
from llmux.config_report import format_bytes
from llmux.spelling import did_you_mean

# The model types, each with its words for messages.
_TYPE_WORDS: Final = {
    "llm": "a chat model (llm)", "vlm": "a vision chat model (vlm)", "ocr": "an OCR model",
    "asr": "a speech recognition model (asr)", "tts": "a speech model (tts)",
    "embedding": "an embedding model", "forecast": "a forecasting model",
}
MODEL_TYPES: Final = tuple(_TYPE_WORDS)
BACKENDS: Final = (
    "fake",
    "llama_cpp",
    "llama_server",
    "transformers",
    "faster_whisper",
    "piper",
    "chatterbox",
    "rapidocr",
)
CONCURRENT_BACKENDS: Final = frozenset({"fake", "llama_server"})
"""Backends whose class says ``concurrent``: only they take ``max_concurrency`` > 1 (a
test keeps this in step with the backends, which the server process never imports)."""
CAPABILITIES: Final = ("vision", "tools", "reasoning", "translate")

# Markers for int fields written as sizes in YAML ("9GB"); "auto" is also allowed for CAPACITY.
Size = Annotated[int, "size"]
Capacity = Annotated[int | None, "capacity"]

_DEVICE_ID = re.compile(r"cpu|cuda:(0|[1-9][0-9]*)")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\sA-Z/?#]+")  # as a browser sends it
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-z]*)", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1} | {
    f"{prefix}{binary}b": (1024 if binary else 1000) ** power
    for power, prefix in enumerate("kmgt", start=1)
    for binary in ("", "i")
}


def a_model_of_type(model_type: str) -> str:
    """The type in words, with its article, for messages: "an embedding model"."""
    return _TYPE_WORDS.get(model_type, f"a model of type {model_type}")


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds every reason as ``path: message``."""

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        lines = "".join(f"\n  {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where} ({count}):{lines}")


def parse_size(value: object) -> int:
    """Bytes from ``"9GB"``, ``"512MiB"``, ``"1.5 GiB"`` or an int, as config files write them.

    KB/MB/GB/TB are decimal, KiB/MiB/GiB/TiB binary, any case; a bare number is bytes.
    Fractions round to whole bytes.

    Raises:
        ValueError: ``'<value>' is not a size`` for bools, negatives, NaN, unknown units.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        number, unit = match.groups()
        factor = _UNITS.get(unit.lower())
        if factor is not None:
            return int((Decimal(number) * factor).to_integral_value(ROUND_HALF_EVEN))
    raise ValueError(f"{value!r} is not a size")


@attrs.frozen(kw_only=True)
class Device:
    """A memory budget the arbiter places models on: ``cpu`` or ``cuda:N``."""

    id: str
    capacity: Capacity = None  # None = "auto": measured at run time
    safety_margin: Size = 0

    def usable(self) -> int | None:
        """Bytes models may use, or None while the capacity is measured at run time."""
        return None if self.capacity is None else self.capacity - self.safety_margin


def _default_priority_classes() -> dict[str, int]:
    return {"asr": 30, "tts": 20, "embedding": 15, "forecast": 15, "ocr": 15, "vlm": 10,
            "llm": 10}


@attrs.frozen(kw_only=True)
class Policy:
    """Scheduling knobs shared by every device; bigger priority = evicted later."""

    strict_priority: bool = False
    min_residency_s: float = 10.0
    max_queue_per_model: int = 64
    max_turn_requests: int = 8
    max_turn_wait_s: float = 30.0  # while others wait, a loaded model's turn lasts at most this
    # ... and at least this many times its own load time (within max_turn_wait_s), so a
    # swap costs at most ~1/(1 + this) of the device's time however short the requests.
    turn_load_multiple: float = 10.0
    request_deadline_s: float = 600.0
    priority_classes: dict[str, int] = attrs.field(factory=_default_priority_classes)
    # A warm spare worker per worker interpreter (llmux/spare.py): a process that has
    # imported its runtime and waits for a load, counted on the cpu ledger. Off by
    # default: it holds host RAM at all times (~50 MB, ~250 MB with torch); the GPU
    # configs turn it on. It imports warm_spare_imports if set, else the backend modules
    # of the models that run on its interpreter.
    warm_spare: bool = False
    warm_spare_imports: list[str] | None = None


@attrs.frozen(kw_only=True)
class Server:
    """HTTP listener and files; relative paths are resolved against the config's directory."""

    host: str = "127.0.0.1"
    port: int = 8081
    api_keys_file: str | None = None
    state_dir: str | None = None
    max_body_bytes: Size = 32 * 2**20
    max_upload_bytes: Size = 25 * 10**6
    open_audio_lists: bool = True  # GET /v1/audio/models|voices without a key (Open WebUI)
    # Chat image parts may be http(s) URLs the server fetches (size-capped by
    # max_body_bytes); off by default: a fetch on a client's behalf can reach internal hosts.
    allow_remote_images: bool = False
    # GET /metrics: "open" (no key) or "admin"; unset: open on a loopback bind, else admin.
    metrics: str | None = None
    # "text" (human-readable) or "json" (one object a line); `serve --log-format` wins.
    log_format: str = "text"
    # On SIGTERM: stop accepting, let in-flight requests finish for up to this many
    # seconds, then kill the workers.
    shutdown_grace_s: float = 30.0
    # A client sending a request body may go silent this long before the request is
    # refused and its connection closed (nginx's client_body_timeout).
    read_timeout_s: float = 60.0
    # An idle keep-alive connection is closed after this many seconds, and a request's
    # headers must be complete within it. Longer than the clients' and proxies' own idle
    # limits (httpx and the openai SDK 5 s, aiohttp 15 s, nginx upstreams 60 s), so the
    # client always drops an idle connection first: one that sends its next request as
    # the server closes gets a reset, not a reply (equal limits race).
    keep_alive_s: float = 75.0
    # Web pages (origins) whose scripts may call llmux from a browser (CORS), as Open
    # WebUI's direct connections do: "https://chat.example.com", or "*" for any. Empty:
    # browsers keep other pages' scripts from reading llmux's replies.
    cors_origins: list[str] = attrs.Factory(list)

    def metrics_access(self) -> str:
        """"open" or "admin", as configured or by the bind address."""
        if self.metrics is not None:
            return self.metrics
        return "open" if is_loopback(self.host) else "admin"

    def resolved_state_dir(self, environ: Mapping[str, str] | None = None) -> Path:
        """``state_dir``, else ``$XDG_STATE_HOME/llmux``, else ``~/.local/state/llmux``."""
        if self.state_dir is not None:
            return Path(self.state_dir)
        xdg = (os.environ if environ is None else environ).get("XDG_STATE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
        return base / "llmux"


@attrs.frozen(kw_only=True)
class SamplingDefaults:
    """Defaults a virtual model applies where the request leaves a parameter out."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def as_dict(self) -> dict[str, float | int]:
        """Only the parameters that are set, ready to merge under a request's own."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen(kw_only=True)
class VirtualModel:
    """A name clients see: a physical model plus behaviour (thinking, prefix, sampling)."""

    name: str
    physical: str
    enable_thinking: bool | None = None
    system_prompt_prefix: str | None = None
    chat_template_kwargs: dict[str, Any] = attrs.field(factory=dict)
    sampling: SamplingDefaults = attrs.field(factory=SamplingDefaults)


@attrs.frozen(kw_only=True)
class Source:
    """Where ``llmux pull`` fetches a physical model's files from: a Hugging Face model repo.

    ``files`` are repo paths or glob patterns (none: the whole repo), ``exclude`` drops
    matches. They land in ``local_dir``; unset, that is the directory ``model_path``
    names, or the folder holding it when ``model_path`` is one of the files.
    """

    repo: str
    revision: str = "main"
    files: list[str] = attrs.field(factory=list)
    exclude: list[str] = attrs.field(factory=list)
    local_dir: str | None = None


@attrs.frozen(kw_only=True)
class PhysicalModel:
    """Weights one worker process loads; the unit of placement and eviction."""

    id: str
    type: str
    backend: str
    model_path: str | None = None
    files: dict[str, str] = attrs.field(factory=dict)
    options: dict[str, Any] = attrs.field(factory=dict)
    estimated_vram: Size
    priority_class: str | None = None
    exclusive_group: str | None = None
    pinned: bool = False
    preload: bool = False
    idle_timeout_s: float | None = None
    load_timeout_s: float = 120.0
    device: str | None = None
    python: str | None = None
    capabilities: list[str] = attrs.field(factory=list)
    max_concurrency: int = 1
    # Speech models: the voice names clients use -> the backend's own voice (a reference
    # clip, a speaker); "" = the backend's default. The first one is the default voice.
    voices: dict[str, str] = attrs.field(factory=dict)
    source: Source | None = None  # where `llmux pull` downloads the files from

    def priority(self, policy: Policy) -> int:
        """Rank of this model's class (its type unless set); bigger is evicted later."""
        return policy.priority_classes[self.priority_class or self.type]


def _default_devices() -> dict[str, Device]:
    return {"cpu": Device(id="cpu")}


@attrs.frozen(kw_only=True)
class Config:
    """The whole validated configuration; built by :func:`parse_config`, never mutated."""

    server: Server = attrs.field(factory=Server)
    policy: Policy = attrs.field(factory=Policy)
    devices: dict[str, Device] = attrs.field(factory=_default_devices)
    physical_models: dict[str, PhysicalModel]
    virtual_models: dict[str, VirtualModel]
    source: str | None = None

    def device_of(self, model: PhysicalModel) -> str:
        """The model's device, or the first configured one when it names none."""
        if model.device is not None:
            return model.device
        for device_id in self.devices:
            return device_id
        raise ValueError("no devices configured")


# --- structuring -------------------------------------------------------------------------

_Seg = str | int
_Path = tuple[_Seg, ...]
_Found = list[tuple[_Path, str]]
_T = TypeVar("_T")


class _Invalid(ValueError):
    """A value of the wrong kind; the message is shown to the operator as-is."""


def _show(value: object) -> str:
    """A value as YAML would spell it, so the message points at what the operator wrote."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def _strict(kind: type[_T], what: str) -> Callable[[object, Any], _T]:
    """A hook that accepts only ``kind`` itself: no ``str("1")``, no ``bool("no")``."""

    def hook(value: object, _: Any) -> _T:
        if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
            return value
        raise _Invalid(f"expected {what}, got {_show(value)}")

    return hook


def _structure_float(value: object, _: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    raise _Invalid(f"expected a number, got {_show(value)}")


def _structure_size(value: object, _: Any) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise _Invalid(f"{_show(value)} is not a size") from None


def _structure_capacity(value: object, _: Any) -> int | None:
    if value is None or value == "auto":
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise _Invalid(f'{_show(value)} is not a size or "auto"') from None


def _checked(kind: type, what: str, hook: Callable[[Any, Any], _T]) -> Callable[[Any, Any], _T]:
    """Refuse the wrong container up front (cattrs would iterate a string into a list)."""

    def checked(value: Any, cl: Any) -> _T:
        if not isinstance(value, kind):
            raise _Invalid(f"expected {what}, got {_show(value)}")
        return hook(value, cl)

    return checked


def _origin(t: Any) -> Any:
    return get_origin(t)


def _marked(marker: str) -> Callable[[Any], bool]:
    return lambda t: marker in getattr(t, "__metadata__", ())


def make_converter() -> cattrs.Converter:
    """The one converter for config YAML: detailed errors, no extra keys, strict scalars."""
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook_func(_marked("size"), _structure_size)
    conv.register_structure_hook_func(_marked("capacity"), _structure_capacity)
    conv.register_structure_hook_factory(
        lambda t: _origin(t) is list,
        lambda t: _checked(list, "a list", list_structure_factory(t, conv)),
    )
    conv.register_structure_hook_factory(
        lambda t: _origin(t) is dict,
        lambda t: _checked(Mapping, "a mapping", make_mapping_structure_fn(t, conv)),
    )
    conv.register_structure_hook_factory(
        attrs.has, lambda t: _checked(Mapping, "a mapping", make_dict_structure_fn(t, conv))
    )
    return conv


def _flatten(exc: BaseException, path: _Path) -> Iterator[tuple[_Path, str]]:
    """Walk cattrs' exception groups down to ``(path, message)`` leaves."""
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _flatten(sub, (*path, note.name))
        for sub in without:
            yield from _flatten(sub, path)
    elif isinstance(exc, IterableValidationError):
        with_index, without = exc.group_exceptions()
        for sub, inote in with_index:
            # NOTE: mapping keys stay words even when YAML read them as numbers.
            yield from _flatten(sub, (*path, str(inote.index) if exc.cl is dict else inote.index))
        for sub in without:
            yield from _flatten(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        fields = [field.name for field in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields, key=str):
            yield (*path, str(key)), f"unknown key{did_you_mean(str(key), fields)}"
    elif isinstance(exc, KeyError):
        yield path, "required"
    elif isinstance(exc, _Invalid):
        yield path, str(exc)
    else:
        yield path, f"invalid value ({exc})"


# --- parsing -----------------------------------------------------------------------------

_CONVERTER: Final = make_converter()
_SECTIONS: Final = ("server", "policy", "devices", "physical_models", "virtual_models")


@attrs.define
class _Broken:
    """Names present in the YAML that failed to structure: references to them are not
    reported again as unknown, so one mistake yields one message."""

    devices: set[str] | None = attrs.Factory(set)  # None: the whole section is unusable
    physical: set[str] = attrs.Factory(set)
    policy: bool = False


def _structure(raw: object, cls: type[_T], path: _Path, found: _Found) -> _T | None:
    try:
        return _CONVERTER.structure(raw, cls)
    except Exception as exc:  # cattrs groups every failure of the piece in one exception
        found.extend(_flatten(exc, path))
        return None


def _keyed(
    raw: object, section: str, cls: type[_T], key_field: str, found: _Found
) -> tuple[dict[str, _T], set[str]]:
    """Structure a ``{name: {...}}`` section entry by entry; the key becomes ``key_field``."""
    good: dict[str, _T] = {}
    broken: set[str] = set()
    if not isinstance(raw, Mapping):
        found.append(((section,), f"expected a mapping, got {_show(raw)}"))
        return good, broken
    for key, value in raw.items():
        name = str(key)
        if not isinstance(key, str):
            found.append(((section, name), f"name must be a string, got {_show(key)}"))
        if isinstance(value, Mapping) and key_field in value:
            found.append(((section, name, key_field), "unknown key"))
            value = {k: v for k, v in value.items() if k != key_field}
        item = _structure(
            {**value, key_field: name} if isinstance(value, Mapping) else value,
            cls,
            (section, name),
            found,
        )
        if item is None or not isinstance(key, str):
            broken.add(name)
        else:
            good[name] = item
    return good, broken


def _position(data: object, path: _Path) -> tuple[int, ...]:
    """Where ``path`` (or its deepest existing parent) appears in the document."""
    out: list[int] = []
    for seg in path:
        if isinstance(data, Mapping):
            index = next((i for i, k in enumerate(data) if k == seg or str(k) == seg), None)
            if index is None:
                break
            out.append(index)
            data = list(data.values())[index]
        elif isinstance(data, list) and isinstance(seg, int) and 0 <= seg < len(data):
            out.append(seg)
            data = data[seg]
        else:
            break
    return tuple(out)


def _render(path: _Path) -> str:
    text = ""
    for seg in path:
        text += f"[{seg}]" if isinstance(seg, int) else f".{seg}" if text else seg
    return text or "(top level)"


def _resolve(value: str | None, base_dir: Path | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if base_dir is None or path.is_absolute() else base_dir / path)


def parse_config(data: object, *, base_dir: Path | None = None) -> Config:
    """Validate already-loaded YAML data; relative paths resolve against ``base_dir``.

    Raises:
        ConfigError: with every structural and cross-field problem, in document order.
    """
    if not isinstance(data, Mapping) or not data:
        got = "the configuration is empty" if data is None or data == {} else f"got {_show(data)}"
        raise ConfigError([f"(top level): expected a mapping of sections, {got}"])
    found: _Found = [((str(k),), f"unknown key{did_you_mean(str(k), _SECTIONS)}")
                     for k in data if k not in _SECTIONS]
    found += [((k,), "required") for k in _SECTIONS[3:] if k not in data]
    broken = _Broken()
    server = _structure(data.get("server", {}), Server, ("server",), found)
    policy = _structure(data.get("policy", {}), Policy, ("policy",), found)
    broken.policy = policy is None
    devices = _default_devices()
    if "devices" in data:
        devices, broken.devices = _keyed(data["devices"], "devices", Device, "id", found)
        broken.devices = broken.devices if isinstance(data["devices"], Mapping) else None
    physical, broken.physical = _keyed(
        data.get("physical_models", {}), "physical_models", PhysicalModel, "id", found
    )
    virtual, _ = _keyed(
        data.get("virtual_models", {}), "virtual_models", VirtualModel, "name", found
    )
    config = Config(
        server=server or Server(),
        policy=policy or Policy(),
        devices=devices,
        physical_models=physical,
        virtual_models=virtual,
    )
    found += _check(config, broken)
    if found:
        found.sort(key=lambda item: _position(data, item[0]))  # stable: ties keep their order
        lines = [f"{_render(path)}: {message}" for path, message in found]
        raise ConfigError(list(dict.fromkeys(lines)))
    return attrs.evolve(
        config,
        server=attrs.evolve(
            config.server,
            api_keys_file=_resolve(config.server.api_keys_file, base_dir),
            state_dir=_resolve(config.server.state_dir, base_dir),
        ),
    )


# --- cross-field checks ------------------------------------------------------------------


def problems(config: Config) -> list[str]:
    """Cross-field problems of a structurally valid config, as ``path: message`` (pure)."""
    return [f"{_render(path)}: {message}" for path, message in _check(config, _Broken())]


def _check(config: Config, broken: _Broken) -> _Found:
    """Cross-field rules; ``broken`` names what failed to structure, so it is not "unknown"."""
    found: _Found = []

    def need(holds: bool, path: _Path, message: str) -> None:
        if not holds:
            found.append((path, message))

    def one_of(path: _Path, kind: str, value: str, choices: tuple[str, ...]) -> None:
        expected = f"(expected one of {', '.join(choices)})"
        need(value in choices, path, f"unknown {kind} {_show(value)} {expected}")

    server, policy, devices = config.server, config.policy, config.devices
    need(1 <= server.port <= 65535, ("server", "port"), "must be between 1 and 65535")
    need(server.max_body_bytes > 0, ("server", "max_body_bytes"), "must be positive")
    need(server.max_upload_bytes > 0, ("server", "max_upload_bytes"), "must be positive")
    if server.metrics is not None:
        one_of(("server", "metrics"), "metrics access", server.metrics, ("open", "admin"))
    one_of(("server", "log_format"), "log format", server.log_format, ("text", "json"))
    need(server.shutdown_grace_s >= 0, ("server", "shutdown_grace_s"), "must not be negative")
    need(server.read_timeout_s > 0, ("server", "read_timeout_s"), "must be positive")
    need(server.keep_alive_s > 0, ("server", "keep_alive_s"), "must be positive")
    any_origin = server.cors_origins == ["*"]
    for i, origin in enumerate(server.cors_origins):
        need(any_origin or bool(_ORIGIN.fullmatch(origin)), ("server", "cors_origins", i),
             f'{_show(origin)} is not an origin like "https://chat.example.com" '
             '(lower case, no path, no trailing slash), or "*" alone')
    need(policy.min_residency_s >= 0, ("policy", "min_residency_s"), "must not be negative")
    need(policy.max_queue_per_model >= 1, ("policy", "max_queue_per_model"), "must be at least 1")
    need(policy.max_turn_requests >= 1, ("policy", "max_turn_requests"), "must be at least 1")
    need(policy.max_turn_wait_s > 0, ("policy", "max_turn_wait_s"), "must be positive")
    need(policy.turn_load_multiple >= 0, ("policy", "turn_load_multiple"),
         "must not be negative")
    need(policy.request_deadline_s > 0, ("policy", "request_deadline_s"), "must be positive")
    some_devices = bool(devices) or broken.devices is None or bool(broken.devices)
    need(some_devices, ("devices",), "at least one device is required")
    for device in devices.values():
        path: _Path = ("devices", device.id)
        need(bool(_DEVICE_ID.fullmatch(device.id)), path, 'a device id is "cpu" or "cuda:<N>"')
        if (usable := device.usable()) is None:
            continue
        need(usable > 0, (*path, "safety_margin"), "leaves nothing of the capacity")
        pinned = [m for m in config.physical_models.values() if m.pinned]
        total = sum(m.estimated_vram for m in pinned if _device_id(config, m) == device.id)
        need(
            usable <= 0 or total <= usable,
            path,
            f"pinned models need {format_bytes(total)} but only {format_bytes(usable)} is usable",
        )
    pinned_in: dict[str, str] = {}
    for model in config.physical_models.values():
        path = ("physical_models", model.id)
        need("/" not in model.id, path, "a physical model's name may not hold '/': the admin "
             "routes (/admin/models/NAME/load) take it as one path segment (a virtual "
             "model's name may hold one)")
        one_of((*path, "type"), "type", model.type, MODEL_TYPES)
        one_of((*path, "backend"), "backend", model.backend, BACKENDS)
        for i, capability in enumerate(model.capabilities):
            one_of((*path, "capabilities", i), "capability", capability, CAPABILITIES)
        need(model.load_timeout_s > 0, (*path, "load_timeout_s"), "must be positive")
        need((model.idle_timeout_s or 0) >= 0, (*path, "idle_timeout_s"), "must not be negative")
        need(not (model.pinned and model.idle_timeout_s is not None), (*path, "idle_timeout_s"),
             "a pinned model stays loaded, so it never idles out: leave one of the two out")
        need(model.max_concurrency >= 1, (*path, "max_concurrency"), "must be at least 1")
        need(model.max_concurrency <= 1 or model.backend in CONCURRENT_BACKENDS
             or model.backend not in BACKENDS, (*path, "max_concurrency"),
             f"the {model.backend} backend serves one request at a time; more than 1 needs "
             f"one of {', '.join(sorted(CONCURRENT_BACKENDS))}")
        need(not model.voices or model.type == "tts", (*path, "voices"),
             f"only speech (tts) models have voices, this is {a_model_of_type(model.type)}")
        if model.source is not None:
            found += _check_source(model, model.source, path)
        device_id = _device_id(config, model)
        placed_on = device_id if device_id in devices else None  # else: one problem, its device
        found += [((*path, "options", *where), message) for where, message in
                  option_problems(model.backend, model.type, model.options, placed_on)]
        klass = model.priority_class or model.type
        need(
            broken.policy
            or klass in policy.priority_classes
            or (model.priority_class is None and model.type not in MODEL_TYPES),
            (*path, "priority_class"),
            f"unknown priority class {_show(klass)} (not in policy.priority_classes)",
        )
        if model.pinned and model.exclusive_group is not None:
            first = pinned_in.setdefault(model.exclusive_group, model.id)
            message = f"{_show(first)} of the same exclusive group is pinned already"
            need(first == model.id, (*path, "pinned"), message)
        placed = devices.get(device_id) if device_id is not None else None
        if placed is None and model.device is not None and broken.devices is not None:
            known = model.device in broken.devices
            need(known, (*path, "device"), f"unknown device {_show(model.device)}")
        elif placed is not None and (usable := placed.usable()) is not None and usable > 0:
            need(
                model.estimated_vram <= usable,
                (*path, "estimated_vram"),
                f"{format_bytes(model.estimated_vram)} does not fit on {placed.id} "
                f"({format_bytes(usable)} usable: capacity minus safety margin)",
            )
    for virtual in config.virtual_models.values():
        known = virtual.physical in config.physical_models or virtual.physical in broken.physical
        path = ("virtual_models", virtual.name, "physical")
        need(known, path, f"unknown physical model {_show(virtual.physical)}")
    return found


def _check_source(model: PhysicalModel, source: Source, path: _Path) -> _Found:
    """A source must name a repo, paths inside it, and somewhere to download to."""
    path = (*path, "source")
    found: _Found = []
    if not _REPO_ID.fullmatch(source.repo):
        found.append(((*path, "repo"), f'{_show(source.repo)} is not a Hugging Face repo id '
                                       '(like "Qwen/Qwen3-8B-GGUF")'))
    if not source.revision:
        found.append(((*path, "revision"), "must not be empty"))
    for key, patterns in (("files", source.files), ("exclude", source.exclude)):
        for i, pattern in enumerate(patterns):
            if not pattern or pattern.startswith("/") or ".." in pattern.split("/"):
                found.append(((*path, key, i), f"{_show(pattern)} is not a path inside the repo"))
    pkg = [v for v in (model.model_path, source.local_dir) if v and v.startswith("pkg:")]
    if pkg:
        found.append((path, "a pkg: model ships in a Python package: there is nothing to "
                            "download"))
    elif model.model_path is None and source.local_dir is None:
        found.append((path, "needs model_path or source.local_dir: where to download to"))
    return found


def _device_id(config: Config, model: PhysicalModel) -> str | None:
    return model.device if model.device is not None else next(iter(config.devices), None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- loading -----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads only true/false as booleans.

    NOTE: YAML 1.1 reads ``yes``/``no``/``on``/``off`` as booleans and keeps the last of
    two equal keys; in a config both turn a typo into a silent setting.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if (key_node.tag, key_node.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A value whose explicit tag it does not fit (``!!int sk-...``) is a YAML error
        at its line, not the constructor's ValueError, whose message quotes the value
        (in a keys file, a secret)."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception:
            raise yaml.constructor.ConstructorError(
                None, None, f"the value is not a valid {node.tag.rsplit(':', 1)[-1]}",
                node.start_mark) from None


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), "tTfF")


def load_yaml(stream: IO[str] | IO[bytes]) -> Any:
    """Parse YAML strictly: duplicate keys are errors, only true/false are booleans."""
    return yaml.load(stream, Loader=_Loader)


def yaml_problem(source: str, exc: yaml.YAMLError) -> ConfigError:
    """A YAML syntax error as a ConfigError naming the file, line and column.

    NOTE: never ``str(exc)``: it quotes the offending line, which in a keys file may
    hold a secret.
    """
    if isinstance(exc, yaml.reader.ReaderError):  # bytes that are not UTF-8 (or UTF-16)
        return ConfigError([f"{source}: not UTF-8 text ({exc.reason} at byte "
                            f"{exc.position})"], source=source)
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    what = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "not valid YAML"
    return ConfigError([f"{where}: {what}"], source=source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; ``source`` records where it came from.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, or is invalid.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as stream:  # PyYAML reads the encoding, and refuses bad bytes
            data = load_yaml(stream)
    except OSError as exc:
        raise ConfigError([f"{source}: {exc.strerror or exc}"], source=source) from exc
    except yaml.YAMLError as exc:
        raise yaml_problem(source, exc) from exc
    try:
        config = parse_config(data, base_dir=Path(source).absolute().parent)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=source) from None
    return attrs.evolve(config, source=source)
