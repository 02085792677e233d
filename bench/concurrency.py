"""Concurrency: 64 streaming clients over 3 fake models with a memory budget for 2.

Each fake model streams at ``RATE`` tokens/s and serves ``MAX_CONCURRENCY`` (1) request
at a time (its ``max_concurrency``), so no scheduler can deliver more than 2 loaded
models x 1 x ``RATE`` tokens/s while only 2 of the 3 fit. Client i asks model i mod 3,
one request after another, each a ``WORDS``-token reply. Tokens are counted as they
arrive during a ``MEASURE_S`` window that opens ``WARMUP_S`` after the start (the first
loads are start-up, not steady state); the time the arbiter spends swapping models is
part of what is measured.

The baseline, in the same run and on the same server: the same 64 clients over 2 of the
models only (both fit, nothing swaps). That is the backends' limit as this machine
delivers it with the clients' own cost (a fake model paces its tokens with sleeps, which
a loaded machine stretches), so the ratio is the share the swapping costs.

Headline: tokens/s with 3 models ÷ tokens/s with 2 (goal ≥ 0.9), with 0 errors: a
non-200, an error event, or a stream that ends without ``[DONE]``. The details also give
the 3-model figure against the nominal limit.

    .venv/bin/python bench/concurrency.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

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


async def run(url: str, models: tuple[str, ...]) -> Tally:
    started = time.perf_counter()
    tally = Tally(started + WARMUP_S, started + WARMUP_S + MEASURE_S)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        tasks = [asyncio.create_task(client(http, models[i % len(models)], tally))
                 for i in range(CLIENTS)]
        await asyncio.sleep(tally.closes - time.perf_counter())
        # The window is closed: the replies still streaming no longer count.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def loads(server: Llmux) -> int:
    return sum(m["load_count"] for m in server.state()["models"])


def main() -> int:
    try:
        with Llmux(CONFIG) as server:
            base = asyncio.run(run(server.url, MODELS[:FITS]))
            before = loads(server)
            tally = asyncio.run(run(server.url, MODELS))
            swaps = loads(server) - before
    finally:
        sweep()
    nominal = FITS * MAX_CONCURRENCY * RATE
    limit, rate = base.tokens / MEASURE_S, tally.tokens / MEASURE_S
    errors = base.errors + tally.errors
    first = f", first: {errors[0]}" if errors else ""
    record(f"concurrency: {rate / limit:.2f} ({rate:.1f} tok/s over {len(MODELS)} fake "
           f"models vs {limit:.1f} tok/s over {FITS} that fit (nominal {nominal:.0f} = "
           f"{FITS} x {MAX_CONCURRENCY} x {RATE:.0f} tok/s: {rate / nominal:.2f}); "
           f"{CLIENTS} streaming clients, {tally.replies} replies, {len(errors)} errors"
           f"{first}; {swaps} loads over {MEASURE_S + WARMUP_S:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
