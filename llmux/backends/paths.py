"""Model paths in the config: a filesystem path, or ``pkg:<package>/<path inside it>``
for models that ship inside an installed Python package (the embedded default's).

Resolved in the worker, which may import the package; the server never does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PREFIX = "pkg:"


def resolve_model_path(value: str) -> Path:
    """The filesystem path of ``value``; it must exist.

    Raises:
        FileNotFoundError: the path (or the package) does not exist, with a message
            that names what is missing.
        OSError: the path cannot be looked at (too long a name, no permission, a
            network filesystem gone stale).
    """
    if not value.startswith(PREFIX):
        path = Path(value).expanduser()
    else:
        package, _, inside = value[len(PREFIX):].partition("/")
        # NOTE: the top-level package only: finding ``a.b`` imports ``a`` (in the
        # server, that could be torch); its subpackages are its folders.
        top, *subpackages = package.split(".")
        try:
            spec = importlib.util.find_spec(top) if top else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{value}: the Python package {package!r} is not "
                                    "installed in the worker's interpreter")
        path = Path(next(iter(spec.submodule_search_locations))).joinpath(*subpackages,
                                                                           inside)
    if not path.exists():
        raise FileNotFoundError(f"{value}: no such file or directory ({path})")
    return path


__all__ = ["PREFIX", "resolve_model_path"]
