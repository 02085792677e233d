"""What ``llmux check-config FILE`` prints: the configuration as an operator reads it.

Plain text tables (devices, physical models, virtual models) so a config can be
reviewed in a terminal or pasted into an issue. Imports the config classes only for
type checking: ``llmux.config`` itself uses :func:`format_bytes` in its messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmux.config import Config

__all__ = ["format_bytes", "render_summary"]

_UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
_PREFIX_WIDTH = 40
_PHYSICAL_HEADERS = (
    "ID",
    "TYPE",
    "BACKEND",
    "DEVICE",
    "EST. MEMORY",
    "PRIORITY",
    "EXCLUSIVE",
    "FLAGS",
    "IDLE TIMEOUT",
)


def format_bytes(n: int) -> str:
    """Decimal units with one decimal, as config files write them: ``"9.0 GB"``, ``"512 B"``."""
    if abs(n) < 1000:
        return f"{n} B"
    for unit, size in _UNITS:
        # NOTE: compare the rounded value, so 999_960_000 reads "1.0 GB", not "1000.0 MB".
        if round(abs(n) / size, 1) >= 1:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, under an underlined title."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [title, "=" * len(title)]
    for cells in (headers, *rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    if not rows:
        lines.append("(none)")
    return lines


def _truncate(text: str | None, width: int = _PREFIX_WIDTH) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _flags(**flags: bool) -> str:
    return ",".join(name for name, on in flags.items() if on) or "-"


def render_summary(config: Config) -> str:
    """A summary table of a validated config: devices, physical models, virtual models."""
    server = config.server
    head = [
        f"llmux configuration{f' from {config.source}' if config.source else ''}",
        f"server: {server.host}:{server.port}, api keys: {server.api_keys_file or 'none (open)'}",
        "",
    ]
    devices = _table(
        "Devices",
        ("ID", "CAPACITY", "SAFETY MARGIN", "MODELS"),
        [
            (
                device.id,
                "auto" if device.capacity is None else format_bytes(device.capacity),
                format_bytes(device.safety_margin),
                str(sum(config.device_of(m) == device.id for m in config.physical_models.values())),
            )
            for device in config.devices.values()
        ],
    )
    physical = _table(
        "Physical models",
        _PHYSICAL_HEADERS,
        [
            (
                model.id,
                model.type,
                model.backend,
                config.device_of(model),
                format_bytes(model.estimated_vram),
                f"{model.priority_class or model.type} ({model.priority(config.policy)})",
                model.exclusive_group or "-",
                _flags(pinned=model.pinned, preload=model.preload),
                "never" if model.idle_timeout_s is None else f"{model.idle_timeout_s:g} s",
            )
            for model in config.physical_models.values()
        ],
    )
    virtual = _table(
        "Virtual models",
        ("NAME", "PHYSICAL MODEL", "THINKING", "SYSTEM PROMPT PREFIX"),
        [
            (
                vm.name,
                vm.physical,
                {None: "-", True: "on", False: "off"}[vm.enable_thinking],
                _truncate(vm.system_prompt_prefix),
            )
            for vm in config.virtual_models.values()
        ],
    )
    return "\n".join([*head, *devices, "", *physical, "", *virtual]) + "\n"
