"""Model paths (llmux/backends/paths.py): a filesystem path (``~`` is the home folder)
or ``pkg:<package>/<path inside it>``; whatever is missing is named in a
FileNotFoundError, which the worker reports as the model's load failure."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import llmux.backends
from llmux.backends.paths import resolve_model_path

BACKENDS = Path(llmux.backends.__file__).parent


def test_a_path_in_the_home_folder_is_expanded(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_path("~/m.gguf") == tmp_path / "m.gguf"


def test_a_path_inside_a_subpackage_is_in_its_folder() -> None:
    """``pkg:a.b/f`` is ``f`` in the folder of ``a``'s subpackage ``b``."""
    assert resolve_model_path("pkg:llmux.backends/paths.py") == BACKENDS / "paths.py"
    assert resolve_model_path("pkg:llmux/backends/paths.py") == BACKENDS / "paths.py"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "gone.gguf"
    with pytest.raises(FileNotFoundError, match=r"gone\.gguf: no such file or directory"):
        resolve_model_path(str(missing))
    with pytest.raises(FileNotFoundError, match=r"^pkg:llmux/gone\.gguf: no such file or "):
        resolve_model_path("pkg:llmux/gone.gguf")


@pytest.mark.parametrize("value", ["pkg:no_such_package_here/m.gguf", "pkg:/m.gguf",
                                   "pkg:.relative/m.gguf", "pkg:speclessmodule/m.gguf"])
def test_a_package_that_cannot_be_found_is_named(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not installed, no name, or a module that cannot be looked up (imported without
    a spec, so ``find_spec`` raises ValueError): each is a missing package."""
    monkeypatch.setitem(sys.modules, "speclessmodule", types.ModuleType("speclessmodule"))
    with pytest.raises(FileNotFoundError, match=r"is not installed in the worker's "
                                                r"interpreter$"):
        resolve_model_path(value)
