"""The server SIGKILLed (no cleanup of its own runs): every worker, whatever it was
doing (idle, streaming, loading), exits on its own within a second (parent-death
signal, pipe EOF). Each of the two suffices alone: the parent-death signal, also when
another process holds the worker's stdin open, so that it never sees EOF."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import httpx
import psutil

from tests.conftest import (
    ROOT,
    Server,
    fake_config,
    fake_model,
    live_workers,
    session_processes,
    wait_until,
)

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
    server.load("loading", ready_within_s=None)
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
    assert not session_processes(), "what the workers started outlived them"
    client.join(10)


# A stand-in for the server: spawns a worker as the server does, hands a duplicate of
# the worker's stdin to a long-lived holder process, then waits to be killed.
SPAWN_AND_SHARE_STDIN = textwrap.dedent("""
    import os, subprocess, sys
    import anyio
    from llmux.workers.handle import WorkerHandle

    async def main() -> None:
        worker = await WorkerHandle.spawn(python=sys.executable, model_id="orphan")
        stdin = os.dup(worker._stdin)
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                  pass_fds=(stdin,), stdin=subprocess.DEVNULL)
        print(worker.pid, holder.pid, flush=True)
        await anyio.sleep(60)

    anyio.run(main)
""")


def test_the_parent_death_signal_alone_ends_a_worker_whose_stdin_stays_open() -> None:
    """Pipe EOF cannot end this worker: a process it does not know holds its stdin
    open (a helper that inherited the pipe, say). Only the parent-death signal the
    worker asked the kernel for can, when its parent is SIGKILLed."""
    parent = subprocess.Popen([sys.executable, "-c", SPAWN_AND_SHARE_STDIN], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    spawned: list[psutil.Process] = []
    try:
        spawned = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
        worker, holder = spawned
        assert worker.ppid() == parent.pid and running(worker) and running(holder)
        parent.kill()
        parent.wait(timeout=10)
        wait_until(lambda: not running(worker), 2, "the worker to die with its parent")
        assert running(holder), "the holder went first: the worker may have seen EOF"
    finally:
        parent.kill()
        parent.wait(timeout=10)
        parent.stdout.close()
        for proc in spawned:
            if running(proc):
                proc.kill()


def running(proc: psutil.Process) -> bool:
    """Not exited. An exited worker whose parent died stays a zombie until the
    process that inherits it reaps it, which is not the worker's doing."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
