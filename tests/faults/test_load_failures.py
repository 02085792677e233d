"""A model that cannot load, hammered by its clients on a budget it shares with two
healthy models: its loads are retried with a growing backoff (not once per request),
every one of its clients gets a fast 503 that says why and when to retry, /health and
/admin/state report it, and the healthy models keep serving meanwhile."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import Server, fake_config, fake_model, wait_until
from tests.faults.support import Outcome, check_ledger_and_processes, stream_chat, three_models

pytestmark = pytest.mark.anyio

RUN_S = 12.0
REASON = "no such weights"


async def test_a_model_that_fails_to_load_backs_off_and_blocks_nobody(
    start_server: Any,
) -> None:
    config = three_models()
    config["physical_models"]["c"]["options"]["fail_on_load"] = REASON
    # No load-time floor on turns: c's retries follow its backoff, not a's and b's turns.
    config["policy"] = {"min_residency_s": 0.5, "request_deadline_s": 30,
                        "turn_load_multiple": 0}
    server: Server = start_server(config)
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient, model: str, i: int) -> None:
        n = 0
        with anyio.move_on_after(RUN_S):
            while True:
                outcomes.append(await stream_chat(client, server.url, model,
                                                  f"{model}{i}-{n}", deadline_s=40))
                n += 1
                await anyio.sleep(0.05)

    with anyio.fail_after(RUN_S + 45):
        async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
            for i, model in enumerate("aabbcc"):
                tg.start_soon(client_loop, client, model, i)

    healthy = [o for o in outcomes if o.model != "c"]
    broken = [o for o in outcomes if o.model == "c"]
    assert healthy and all(o.whole for o in healthy), [o.describe() for o in healthy
                                                       if not o.whole][:5]
    assert len(healthy) >= 20, len(healthy)  # they were served, not held behind c
    assert max(o.elapsed for o in healthy) < 10, max(o.elapsed for o in healthy)
    assert broken and all(o.clear and not o.whole for o in broken), [
        o.describe() for o in broken if not o.clear][:5]
    assert all(REASON in o.error["error"]["message"] for o in broken)  # type: ignore[index]
    assert all(o.status == 503 for o in broken if o.status != 200)

    # The log, not /admin/state: its recent events are soon full of a's and b's.
    attempts = re.findall(r"c transition loading -> failed: load failed: (.*); "
                          r"retry in (\d+) s", server.logs())
    backoffs = [int(seconds) for _, seconds in attempts]
    # ~12 s of requests with backoffs 1, 2, 4, 8 s: a handful of loads, not one per request
    assert 2 <= len(attempts) <= 6 < len(broken), (len(attempts), len(broken))
    assert backoffs == sorted(backoffs) and backoffs[-1] > backoffs[0], backoffs
    assert all(REASON in why for why, _ in attempts)
    # A retry a late request started may still be under way: it fails too.
    wait_until(lambda: server.model("c")["state"] == "failed", 20, "c to be reported failed")
    failed = server.model("c")
    assert REASON in failed["last_error"]
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"{server.url}/health", timeout=5)).json()
    assert health["failed"] == ["c"]
    check_ledger_and_processes(server)


def test_a_model_whose_file_is_missing_evicts_nobody_and_loads_once_it_is_there(
    start_server: Any, tmp_path: Any,
) -> None:
    """Its load would fail, so it fails before the arbiter frees memory for it: the
    loaded model keeps serving. Once the file is there, the next request loads it,
    without waiting out the backoff."""
    config = three_models()
    late = tmp_path / "late.gguf"
    config["physical_models"]["c"].update(model_path=str(late), estimated_vram="250MB")
    server: Server = start_server(config)
    url = f"{server.url}/v1/chat/completions"

    def chat(model: str) -> httpx.Response:
        return httpx.post(url, json={"model": model, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30)

    assert chat("a").status_code == 200
    for backoff in (1, 2, 4):  # a load attempt each, after the backoff before it
        refused = chat("c")
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == str(backoff)
        message = refused.json()["error"]["message"]
        assert message == (f"c cannot load: its model_path {late} is missing (no such file "
                           "or directory)"), message
        time.sleep(backoff + 0.2 if backoff < 4 else 0)
    during = chat("c")  # in the 4 s backoff: the reason again, and when to retry
    assert during.status_code == 503
    assert "next attempt in" in during.json()["error"]["message"]
    assert server.model("a")["state"] == "ready"
    assert server.model("a")["load_count"] == 1
    assert server.model("c")["state"] == "failed"
    assert str(late) in server.model("c")["last_error"]
    assert not [e for e in server.state()["events"] if e["kind"] == "evict"]
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'llmux_model_loads_total{model="c",result="failed"} 3.0' in metrics
    assert 'llmux_worker_crashes_total{model="c"}' not in metrics

    late.write_bytes(b"weights")  # pulled: the fake backend does not read it
    assert chat("c").status_code == 200  # at once, though the 4 s backoff is not over
    assert server.model("c")["state"] == "ready"
    check_ledger_and_processes(server)


async def test_a_hung_look_for_a_models_files_holds_up_only_that_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A network filesystem that hangs the look for one model's files (a stat that does
    not return) holds up that model's requests only: the look runs in a thread. On the
    event loop it would stop the whole server until the stat returned."""
    from llmux import runtime as runtime_module
    from llmux.actors.model_actor import State
    from llmux.config import PhysicalModel, parse_config

    released = threading.Event()

    def look(model: PhysicalModel, config: Any) -> str | None:
        if model.id == "hung":
            released.wait(10)
        return None

    monkeypatch.setattr(runtime_module, "cannot_load", look)
    runtime = runtime_module.Runtime(parse_config(fake_config(hung=fake_model(),
                                                              ok=fake_model())))
    payload = {"messages": [{"role": "user", "content": "hi"}]}
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            held = runtime.submit("hung", "chat", payload)
            _, served = await runtime.submit("ok", "chat", payload).collect()
            assert served["finish_reason"] == "stop"
            assert not released.is_set()
            assert runtime.actors["hung"].state is State.UNLOADED  # still looking
            released.set()
            _, answered = await held.collect()
            assert answered["finish_reason"] == "stop"
            tg.cancel_scope.cancel()
