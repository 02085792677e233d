"""Workers SIGKILLed at random points under concurrent load across three models on a
budget for two: while loading, idle, mid-stream and while being evicted.

Every client gets its whole reply or a clear error (a 429/503 with ``Retry-After``, or
a started stream cut by one OpenAI-shaped error event), none waits past its deadline,
and once the dust settles the ledger is exactly the loaded models' footprints and the
live worker processes are exactly theirs.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from typing import Any

import anyio
import httpx
import psutil
import pytest

from tests.conftest import Server
from tests.faults.support import (
    Outcome,
    admin_state,
    check_ledger_and_processes,
    stream_chat,
    three_models,
)

pytestmark = pytest.mark.anyio

CLIENTS = 18
DEADLINE_S = 30.0  # the server's request deadline
CLIENT_DEADLINE_S = DEADLINE_S + 15  # no client may wait longer than this, whatever happens
PHASES = ("loading", "idle", "mid-stream", "draining", "unloading")
PHASE_WAIT_S = 20.0  # how long the killer looks for a model in the phase it wants
ROUNDS = 2  # each phase is hit this many times, in a random order
HOLD_AFTER_S = 3.0  # after this long looking for an idle model, hold new requests
# The test's own bounds, shorter in all (with the server's start and the ledger check's
# 5 s wait for pipes: ~112 s) than pytest's (timeout = 120 in pyproject.toml), so that a
# hang fails here, saying where, and the server is stopped cleanly, instead of
# pytest-timeout interrupting the test wherever it is.
KILLS_S = 65.0  # the kills under load (~30 s on a quiet machine)
AFTER_S = 25.0  # each model serving again (a model killed often may be in its backoff)
SETTLE_S = 15.0  # the server settling, for the ledger check


def in_phase(model: dict[str, Any], phase: str) -> bool:
    match phase:
        case "loading":
            return bool(model["state"] == "loading")
        case "idle":
            return bool(model["state"] == "ready" and model["in_flight"] == 0)
        case "mid-stream":
            return bool(model["state"] == "busy")
        case _:  # being evicted: finishing its last request, or unloading
            return bool(model["state"] == phase)


async def kill_in_phase(client: httpx.AsyncClient, server: Server, phase: str,
                        rng: random.Random, gate: Gate) -> str | None:
    """SIGKILL one worker caught in ``phase``; the model it belonged to, or None if no
    model was seen in that phase in time. So that no phase depends on luck alone, the
    killer also asks a model to unload as an eviction would (a busy one to drain, an
    idle one to unload), and holds new requests back after a while when it looks for
    an idle model."""
    started = time.monotonic()
    deadline = started + PHASE_WAIT_S
    asked: set[str] = set()
    while time.monotonic() < deadline:
        state = await admin_state(client, server)
        models = state["models"]
        pids = worker_pids(server)
        caught = [m for m in models if in_phase(m, phase) and m["id"] in pids]
        if caught:
            victim = rng.choice(caught)
            await anyio.sleep(rng.uniform(0, 0.05))  # a random point within the phase
            try:
                os.kill(pids[victim["id"]], signal.SIGKILL)
            except ProcessLookupError:
                continue  # it left the phase (and its process) meanwhile: look again
            return str(victim["id"])
        if phase == "idle" and time.monotonic() - started > HOLD_AFTER_S:
            gate.hold()
        wanted = {"draining": "busy", "unloading": "ready"}.get(phase)
        nudge = [m for m in models if m["state"] == wanted and m["id"] not in asked]
        if nudge:
            asked.add(nudge[0]["id"])
            await client.post(f"{server.url}/admin/models/{nudge[0]['id']}/unload",
                              headers=server.admin_headers, timeout=10)
        await anyio.sleep(0.02)
    return None


def worker_pids(server: Server) -> dict[str, int]:
    """The live worker of each model, from the server's children: /admin/state shows
    no pid for a worker that is unloading."""
    pids = {}
    for child in psutil.Process(server.proc.pid).children():
        try:
            command = child.cmdline()
            exited = child.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:  # gone meanwhile (a worker that was just killed)
            continue
        if "llmux.worker" in command and not exited:
            pids[command[command.index("--model-id") + 1]] = child.pid
    return pids


class Gate:
    """Lets the clients send their next request, or holds them back for a moment."""

    def __init__(self) -> None:
        self._open = anyio.Event()
        self._open.set()

    def hold(self) -> None:
        if self._open.is_set():
            self._open = anyio.Event()

    def release(self) -> None:
        self._open.set()

    async def passed(self) -> None:
        await self._open.wait()


async def test_workers_killed_at_random_points_under_load_lose_no_client(
    start_server: Any,
) -> None:
    # LLMUX_KILL_SEED=<printed seed> replays a run's plan of kills.
    seed = int(os.environ.get("LLMUX_KILL_SEED") or random.randrange(1 << 30))
    # The killer's plan has its own generator, so that a printed seed replays it
    # whatever the clients draw meanwhile (their draws depend on timing).
    killer_rng = random.Random(seed)
    client_rng = random.Random(seed + 1)
    config = three_models(unload_time_s=0.4)
    config["policy"] = {"min_residency_s": 0.5, "request_deadline_s": DEADLINE_S,
                        "max_queue_per_model": 16}
    server: Server = start_server(config)
    outcomes: list[Outcome] = []
    killed: list[tuple[str, str]] = []
    missed: list[str] = []
    stop = anyio.Event()
    gate = Gate()

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not stop.is_set():
            await gate.passed()
            model = client_rng.choice("abc")
            words = client_rng.randrange(4, 60)  # up to ~0.6 s of streaming at 100 tokens/s
            outcome = await stream_chat(client, server.url, model, f"c{i}-r{n}-{model}",
                                        words=words, deadline_s=CLIENT_DEADLINE_S)
            outcomes.append(outcome)
            n += 1
            if not outcome.whole:
                await anyio.sleep(client_rng.uniform(0.1, 0.5))

    async def killer(client: httpx.AsyncClient) -> None:
        await anyio.sleep(1.0)
        for phase in killer_rng.sample(PHASES * ROUNDS, len(PHASES) * ROUNDS):
            model = await kill_in_phase(client, server, phase, killer_rng, gate)
            gate.release()
            if model is None:
                missed.append(phase)
            else:
                killed.append((phase, model))
            await anyio.sleep(killer_rng.uniform(0.3, 1.5))
        stop.set()

    limits = httpx.Limits(max_connections=CLIENTS + 8)
    with anyio.fail_after(KILLS_S):
        async with httpx.AsyncClient(limits=limits) as client, \
                anyio.create_task_group() as tg:
            for i in range(CLIENTS):
                tg.start_soon(client_loop, client, i)
            tg.start_soon(killer, client)

    kinds = Counter("whole" if o.whole else "refused" if o.refused else "cut" if o.cut
                    else "unclear" for o in outcomes)
    print(f"seed {seed}: killed {killed}, missed {missed}, outcomes {kinds}")
    unclear = [o.describe() for o in outcomes if not o.clear]
    assert not unclear, f"seed {seed}: {len(unclear)} unclear outcomes:\n" + "\n".join(
        unclear[:20])
    assert max(o.elapsed for o in outcomes) < CLIENT_DEADLINE_S
    assert {phase for phase, _ in killed} == set(PHASES), (seed, killed, missed)
    # So that refusals alone cannot pass. Not a half: a model killed while loading or
    # unloading backs off, and its clients, refused, retry within 0.5 s while a whole
    # reply takes up to 0.6 s, so refusals are over-counted (one run in ten had 35 %
    # whole, most have 63 to 81 %).
    assert kinds["whole"] >= len(outcomes) / 4, (seed, kinds)
    # Every kill here came from outside: none may be blamed on a worker ignoring unload.
    assert "ignored unload" not in server.logs()

    # Each model still serves, then the server settles with a true ledger, no orphan.
    with anyio.fail_after(AFTER_S):
        async with httpx.AsyncClient() as client:
            for model in "abc":
                for attempt in range(20):
                    outcome = await stream_chat(client, server.url, model, f"after-{attempt}",
                                                deadline_s=CLIENT_DEADLINE_S)
                    if outcome.whole:
                        break
                    assert outcome.clear, outcome.describe()
                    await anyio.sleep(min(float(outcome.retry_after or 1), 4.0))
                else:
                    raise AssertionError(f"{model} never served again after the kills")
    check_ledger_and_processes(server, timeout_s=SETTLE_S)
