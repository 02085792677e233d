"""Which model files a config names that are not on this machine (``llmux check-config``,
a warning each when ``llmux serve`` starts, and the model actor's check before it asks
for memory to load).

Looks at every physical model's ``model_path`` and ``files``; ``pkg:`` paths are found
with ``importlib.util.find_spec``, which locates a package without importing it, so
checking a config never loads torch. A missing file is reported, not an error: the
config itself may be fine, and ``llmux pull`` fetches what has a ``source``.
"""

from __future__ import annotations

import attrs

from llmux.backends.paths import PREFIX, resolve_model_path
from llmux.config import Config, PhysicalModel

__all__ = ["ModelFile", "cannot_load", "missing_files", "pull_command", "render_missing"]


@attrs.frozen
class ModelFile:
    """One path of one physical model that is not on disk, and why."""

    model: str
    role: str  # "model_path" or a key of `files` ("mmproj")
    value: str  # as the config writes it
    problem: str
    pullable: bool  # the model has a source: `llmux pull` can fetch it

    @property
    def what(self) -> str:
        return f"its {self.role} {self.value} is missing ({self.problem})"

    def warning(self, config: Config) -> str:
        """One line for the server's log at start: the model cannot load until then."""
        fix = f"; `{pull_command(config, self.model)}` fetches it" if self.pullable else ""
        return f"model {self.model}: {self.what}, so it cannot load{fix}"


def pull_command(config: Config, *models: str) -> str:
    """The ``llmux pull`` of ``models`` (of every model with a source, without any) from
    the file ``config`` came from, as an operator would type it."""
    source = f" --config {config.source}" if config.source else ""
    return f"llmux pull{''.join(f' {model}' for model in models)}{source}"


def missing_files(config: Config) -> list[ModelFile]:
    """Every configured model path that does not exist here, in config order."""
    return [file for model in config.physical_models.values()
            for file in missing_files_of(model)]


def missing_files_of(model: PhysicalModel) -> list[ModelFile]:
    """The paths of ``model`` that do not exist here, or cannot be looked at (a few
    ``stat`` calls)."""
    missing: list[ModelFile] = []
    for role, value in [("model_path", model.model_path), *model.files.items()]:
        if not value:
            continue
        if value.startswith(PREFIX) and model.python is not None:
            continue  # NOTE: the package lives in another interpreter's environment
        try:
            resolve_model_path(value)
            continue
        except FileNotFoundError as exc:
            why = str(exc).removeprefix(f"{value}: ").removesuffix(f" ({value})")
        except OSError as exc:  # too long a name, no permission, a stale network mount
            why = f"cannot be looked at: {exc.strerror or exc}"
        missing.append(ModelFile(model=model.id, role=role, value=value,
                                 problem=why, pullable=model.source is not None))
    return missing


def cannot_load(model: PhysicalModel, config: Config) -> str | None:
    """Why ``model`` cannot load now, for want of its files, or None: its load would
    fail, so no memory should be freed for it."""
    missing = missing_files_of(model)
    if not missing:
        return None
    fix = (f"; `{pull_command(config, model.id)}` fetches "
           f"{'it' if len(missing) == 1 else 'them'}") if model.source is not None else ""
    return f"{model.id} cannot load: {'; '.join(file.what for file in missing)}{fix}"


def render_missing(config: Config) -> str:
    """The report's last section: the missing files, or that none is missing."""
    missing = missing_files(config)
    title = "Model files on this machine"
    if not missing:
        return f"{title}\n{'=' * len(title)}\nnone missing\n"
    rows = [(m.model, m.role, m.value, "missing", m.problem) for m in missing]
    headers = ("MODEL", "FILE", "PATH", "STATUS", "WHY")
    widths = [max(len(c) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = [title, "=" * len(title)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in (headers, *rows)]
    count = f"{len(missing)} model file{'s' if len(missing) != 1 else ''} missing"
    if any(m.pullable for m in missing):
        count += f"; `{pull_command(config)}` downloads those whose model has a source"
    return "\n".join([*lines, count]) + "\n"
