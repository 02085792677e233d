"""Warm spare workers (llmux/spare.py) on a real server with fake-backend models: a
spare waits after start, a load takes it (same pid) and another spare follows, it is
counted on the cpu ledger and dropped before a model would be evicted for its room,
it is off unless configured, and it dies with the server."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import anyio
import httpx
import psutil
import pytest

from llmux.config import parse_config
from llmux.runtime import spare_imports
from llmux.spare import SparePool
from tests.conftest import Server, fake_config, fake_model, live_workers, wait_until

TIMEOUT_S = 60  # a loaded 2-core machine; the waits end as soon as the state is there


def spare_config(enabled: bool = True, imports: list[str] | None = None,
                 capacity: str = "2GB", **models: dict[str, Any]) -> dict[str, Any]:
    return {
        "policy": {"warm_spare": enabled, "warm_spare_imports": imports,
                   "min_residency_s": 0},
        "devices": {"cpu": {"capacity": capacity}},
        **fake_config(**(models or {"chat": fake_model()})),
    }


def spares(server: Server) -> dict[str, Any]:
    data: dict[str, Any] = server.state()["spares"]
    return data


def ready_pids(server: Server) -> list[int]:
    return [spare["pid"] for spare in spares(server)["ready"]]


def wait_for_spare(server: Server, other_than: int | None = None) -> int:
    wait_until(lambda: [p for p in ready_pids(server) if p != other_than], TIMEOUT_S,
               "a ready spare worker")
    return next(p for p in ready_pids(server) if p != other_than)


def test_a_spare_waits_after_the_server_starts(start_server: Any) -> None:
    server = start_server(spare_config())
    pid = wait_for_spare(server)
    worker = psutil.Process(pid)
    assert "spare" in worker.cmdline()
    # Without warm_spare_imports it imports its interpreter's models' backends.
    assert worker.cmdline()[-2:] == ["--preload", "llmux.backends.fake"]
    assert pid in [w.pid for w in live_workers()]
    assert server.model("chat")["state"] == "unloaded"


def test_a_load_takes_the_spare_and_a_new_spare_follows(start_server: Any) -> None:
    server = start_server(spare_config())
    spare = wait_for_spare(server)
    server.load("chat", TIMEOUT_S)
    assert server.model("chat")["pid"] == spare
    assert spares(server)["handed_out"] == 1
    assert wait_for_spare(server, other_than=spare) != spare
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S, json={
        "model": "chat", "messages": [{"role": "user", "content": "hello there"}]})
    assert reply.status_code == 200
    assert f"[worker chat {spare}]" in server.logs()  # the spare took the model's name


def test_the_spare_is_counted_on_the_cpu_ledger(start_server: Any) -> None:
    server = start_server(spare_config(imports=["tests.spare_ballast"]))
    wait_for_spare(server)
    held = spares(server)["held_bytes"]
    assert held > 200 * 2**20  # its measured RSS: the ballast and an interpreter
    cpu = server.state()["devices"][0]
    assert cpu["spare_bytes"] == held
    assert cpu["capacity_bytes"] == 2 * 10**9 - cpu["safety_margin_bytes"] - held


def test_a_spare_is_dropped_rather_than_a_model_evicted(start_server: Any) -> None:
    # One 200 MB model fits beside another and fits beside the spare, but not both
    # beside the spare: the spare goes, both models stay.
    models = {"a": fake_model(), "b": fake_model()}
    server = start_server(spare_config(imports=["tests.spare_ballast"], capacity="750MB",
                                       **models))
    wait_for_spare(server)
    server.load("a", TIMEOUT_S)
    wait_for_spare(server)
    server.load("b", TIMEOUT_S)
    assert server.model("a")["state"] == "ready"
    assert spares(server)["dropped"] >= 1
    assert not [e for e in server.state()["events"] if e.get("kind") == "evict"]


def test_a_spare_never_makes_a_model_too_big_for_its_device(start_server: Any) -> None:
    # Each estimate is the whole budget: with the spare's RSS counted, b would be refused
    # as too big instead of evicting a (its exclusive group's other member); the spare
    # goes instead, a is evicted, b loads.
    model = {**fake_model(), "estimated_vram": "500MB", "exclusive_group": "g"}
    server = start_server(spare_config(capacity="500MB", a=model, b=dict(model)))
    wait_for_spare(server)
    server.load("a", TIMEOUT_S)
    wait_for_spare(server)
    server.load("b", TIMEOUT_S)
    assert server.model("a")["state"] == "unloaded"
    assert spares(server)["dropped"] >= 2


def test_no_spare_unless_configured(start_server: Any) -> None:
    server = start_server(spare_config(enabled=False))
    server.load("chat", TIMEOUT_S)
    assert spares(server)["ready"] == []
    assert [w.pid for w in live_workers()] == [server.model("chat")["pid"]]


def test_the_spare_dies_with_the_server(start_server: Any) -> None:
    server = start_server(spare_config())
    spare = psutil.Process(wait_for_spare(server))
    server.stop(signal.SIGKILL)
    spare.wait(timeout=10)  # parent-death signal: no orphan even without a cleanup
    assert not spare.is_running() or spare.status() == psutil.STATUS_ZOMBIE


@pytest.mark.anyio
async def test_a_spare_is_stopped_when_the_pool_stops() -> None:
    """Not left to the parent-death signal: a runtime inside a longer-lived process
    would keep it, and its pid file, otherwise."""
    pool = SparePool(preload={sys.executable: []}, enabled=True)
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            while not pool.snapshot()["ready"]:  # noqa: ASYNC110 (a spare posts no event)
                await anyio.sleep(0.05)
            spare = psutil.Process(pool.snapshot()["ready"][0]["pid"])
            tg.cancel_scope.cancel()
    assert not spare.is_running()  # stopped and reaped before run() returned


def test_a_spare_imports_the_backends_of_its_interpreters_models_unless_told() -> None:
    def model(backend: str, python: str | None = None) -> dict[str, Any]:
        return {"type": "llm", "backend": backend, "estimated_vram": "1GB",
                **({"python": python} if python else {})}

    data: dict[str, Any] = {
        "physical_models": {"a": model("transformers"), "b": model("llama_server"),
                            "c": model("transformers"), "d": model("chatterbox", "/venv/py")},
        "virtual_models": {},
    }
    main = sys.executable
    assert spare_imports(parse_config(data)) == {
        main: ["llmux.backends.transformers_backend", "llmux.backends.llama_server"],
        "/venv/py": ["llmux.backends.chatterbox"],
    }
    data["policy"] = {"warm_spare_imports": ["numpy"]}
    assert spare_imports(parse_config(data)) == {main: ["numpy"], "/venv/py": ["numpy"]}
    data["policy"] = {"warm_spare_imports": []}  # a bare interpreter: imports nothing
    assert spare_imports(parse_config(data)) == {main: [], "/venv/py": []}


def test_a_spare_waits_while_a_model_loads_or_computes_on_the_cpu(start_server: Any) -> None:
    """The spare that follows a taken one starts only once no model is loading (b, 3 s)
    and none is busy on the cpu (a, streaming for about 8 s): its import would take a
    core from them. The server's log says in which order it happened."""
    server = start_server(spare_config(
        a=fake_model(tokens_per_s=20, reply="word " * 160), b=fake_model(load_time_s=3)))
    wait_for_spare(server)
    server.load("a", TIMEOUT_S)
    second = wait_for_spare(server)
    streamed: list[int] = []

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S,
                          json={"model": "a", "stream": True,
                                "messages": [{"role": "user", "content": "go"}]}) as reply:
            streamed.append(sum(1 for _ in reply.iter_lines()))

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    wait_until(lambda: server.model("a")["in_flight"] == 1, TIMEOUT_S, "a to stream")
    server.load("b", TIMEOUT_S)  # takes the second spare
    assert server.model("b")["pid"] == second
    client.join(TIMEOUT_S)
    assert streamed
    third = wait_for_spare(server, other_than=second)
    logs = server.logs()
    started = logs.index(f"spare worker ready (pid {third},")
    assert logs.index("b transition loading -> ready") < started, logs
    streamed_until = logs.index('"POST /v1/chat/completions" 200')  # logged at its end
    assert streamed_until < started, "the third spare started while a streamed"


def test_no_spare_starts_without_room_for_it_on_the_cpu_ledger(start_server: Any) -> None:
    """A model that needs the spare's room has it dropped; with the model in, the cpu
    ledger has less room than the spare's measured size (its ballast), so no spare
    starts again (the log says why) rather than overcommit the host."""
    server = start_server(spare_config(imports=["tests.spare_ballast"], capacity="400MB"))
    wait_for_spare(server)
    server.load("chat", TIMEOUT_S)
    wait_until(lambda: "no spare worker for" in server.logs(), TIMEOUT_S,
               "the next spare to be refused for lack of room")
    assert spares(server)["ready"] == [] and spares(server)["dropped"] == 1
    assert server.model("chat")["state"] == "ready"
