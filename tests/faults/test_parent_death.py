"""The server SIGKILLed (no cleanup of its own runs): every worker, whatever it was
doing (idle, streaming, loading), exits on its own within a second (parent-death
signal, pipe EOF)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import psutil

from tests.conftest import Server, fake_config, fake_model, live_workers, wait_until

EXIT_WITHIN_S = 1.0


def test_every_worker_exits_within_a_second_of_the_server_being_sigkilled(
    start_server: Any,
) -> None:
    server: Server = start_server({
        "devices": {"cpu": {"capacity": "2GB"}},
        **fake_config(
            idle=fake_model(),
            streaming=fake_model(tokens_per_s=10, reply="word " * 300),
            loading=fake_model(load_time_s=60),
        ),
    })
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json={"model": "idle", **ask}, timeout=30).status_code == 200

    streamed = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream("POST", url, json={"model": "streaming", "stream": True, **ask},
                              timeout=30) as response:
                for line in response.iter_lines():
                    if '"content": "word ' in line:
                        streamed.set()
        except httpx.HTTPError:
            pass  # the server is gone: that is the test

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert streamed.wait(30), "the stream never started"
    httpx.post(f"{server.url}/admin/models/loading/load", timeout=10,
               headers=server.admin_headers)
    wait_until(lambda: server.model("loading")["pid"] is not None, 20, "the load to start")
    states = {m["id"]: m["state"] for m in server.state()["models"]}
    assert states == {"idle": "ready", "streaming": "busy", "loading": "loading"}
    workers = live_workers()
    assert len(workers) == 3

    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    killed_at = time.monotonic()
    while (alive := [p for p in workers if running(p)]) and \
            time.monotonic() - killed_at < EXIT_WITHIN_S:
        time.sleep(0.01)
    took = time.monotonic() - killed_at
    assert not alive, f"still running {took:.2f} s after the server died: {alive}"
    client.join(10)


def running(proc: psutil.Process) -> bool:
    """Not exited. An exited worker whose parent died stays a zombie until the
    process that inherits it reaps it, which is not the worker's doing."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
