"""Concurrency: 64 streaming clients over 3 fake models with a memory budget for 2.

Each fake model streams at ``RATE`` tokens/s and serves ``max_concurrency`` (1) request
at a time, so the backend's own limit is 2 loaded models x 1 x ``RATE`` tokens/s: no
scheduler can deliver more while only 2 of the 3 fit. Client i asks model i mod 3, one
request after another, each a ``WORDS``-token reply. Tokens are counted as they arrive
during a ``MEASURE_S`` window that opens ``WARMUP_S`` after the start (the first two
loads are start-up, not steady state); the time the arbiter spends swapping the third
model in is part of what is measured.

Headline: measured tokens/s ÷ that limit (goal ≥ 0.9), with 0 errors: a non-200, an
error event, or a stream that ends without ``[DONE]``.

    .venv/bin/python bench/concurrency.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx
from common import Llmux, fake_model, record, serving, sweep

CLIENTS = 64
MODELS = ("m0", "m1", "m2")
FITS = 2  # models the budget holds at once
RATE = 100.0  # tokens/s of each fake model
WORDS = 40  # tokens per reply
MAX_CONCURRENCY = 1
WARMUP_S = 5.0
MEASURE_S = 30.0
# Estimates of 150 MB in a 300 MB budget: two fit, a third does not, also once the
# workers' footprints are measured (each holds 100 MB plus its interpreter, ~20 MB).
MODEL = fake_model(load_time_s=0.2, footprint="100MB", tokens_per_s=RATE,
                   reply="word " * WORDS)
MODEL.update(estimated_vram="150MB", max_concurrency=MAX_CONCURRENCY)
CONFIG = serving({name: dict(MODEL) for name in MODELS},
                 devices={"cpu": {"capacity": "300MB"}},
                 policy={"min_residency_s": 1, "max_queue_per_model": CLIENTS})


class Tally:
    def __init__(self, opens: float, closes: float) -> None:
        self.opens, self.closes = opens, closes
        self.tokens = 0
        self.replies = 0
        self.errors: list[str] = []

    def token(self) -> None:
        if self.opens <= time.perf_counter() < self.closes:
            self.tokens += 1


async def client(http: httpx.AsyncClient, model: str, tally: Tally) -> None:
    body = {"model": model, "stream": True,
            "messages": [{"role": "user", "content": "count"}]}
    while time.perf_counter() < tally.closes:
        done = False
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    tally.errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        tally.errors.append(str(event["error"])[:200])
                    elif any((c.get("delta") or {}).get("content")
                             for c in event.get("choices") or ()):
                        tally.token()  # the fake backend: one delta per token
        except httpx.HTTPError as exc:
            tally.errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if done:
            tally.replies += 1
        else:
            tally.errors.append("a stream ended without [DONE]")


async def run(url: str) -> Tally:
    started = time.perf_counter()
    tally = Tally(started + WARMUP_S, started + WARMUP_S + MEASURE_S)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        tasks = [asyncio.create_task(client(http, MODELS[i % len(MODELS)], tally))
                 for i in range(CLIENTS)]
        await asyncio.sleep(tally.closes - time.perf_counter())
        # The window is closed: the replies still streaming no longer count.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def main() -> int:
    loads: dict[str, Any] = {}
    try:
        with Llmux(CONFIG) as server:
            tally = asyncio.run(run(server.url))
            loads = {m["id"]: m["load_count"] for m in server.state()["models"]}
    finally:
        sweep()
    limit = FITS * MAX_CONCURRENCY * RATE
    rate = tally.tokens / MEASURE_S
    errors = len(tally.errors)
    first = f", first: {tally.errors[0]}" if errors else ""
    record(f"concurrency: {rate / limit:.2f} ({rate:.1f} tok/s vs limit {limit:.0f} = "
           f"{FITS} of {len(MODELS)} fake models x {MAX_CONCURRENCY} x {RATE:.0f} tok/s; "
           f"{CLIENTS} streaming clients, {tally.replies} replies, {errors} errors{first}; "
           f"loads {sum(loads.values())} over {MEASURE_S + WARMUP_S:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
