"""Backend registry: names to ``module:Class`` strings, imported lazily.

Only the worker process calls ``load_backend_class``: importing a backend module
pulls in its runtime (torch, llama.cpp, ...), which the server must never load.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from llmux.backends.base import Backend

__all__ = ["BACKEND_MODULES", "backend_module", "load_backend_class"]

BACKEND_MODULES: Final[Mapping[str, str]] = {
    "chatterbox": "llmux.backends.chatterbox:ChatterboxBackend",
    "fake": "llmux.backends.fake:FakeBackend",
    "faster_whisper": "llmux.backends.faster_whisper:FasterWhisperBackend",
    "llama_cpp": "llmux.backends.llama_cpp:LlamaCppBackend",
    "llama_server": "llmux.backends.llama_server:LlamaServerBackend",
    "piper": "llmux.backends.piper:PiperBackend",
    "rapidocr": "llmux.backends.rapidocr:RapidOcrBackend",
    "transformers": "llmux.backends.transformers_backend:TransformersBackend",
}


def backend_module(name: str) -> str:
    """The module of the backend registered as ``name`` (what a warm spare imports).

    Raises:
        KeyError: ``name`` is not registered.
    """
    return BACKEND_MODULES[name].partition(":")[0]


def load_backend_class(name: str) -> type[Backend]:
    """Import and return the backend class registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered.
        TypeError: the registered object is not a ``Backend`` subclass.
        ImportError: the runtime is not installed in this interpreter.
    """
    from llmux.backends.base import Backend

    try:
        target = BACKEND_MODULES[name]
    except KeyError:
        known = ", ".join(sorted(BACKEND_MODULES))
        raise ValueError(f"unknown backend {name!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a Backend subclass")
    return cls
