"""Guarantee 4: "No orphans, ever. Workers die with the server (SIGKILL included:
parent-death signal and pipe EOF); a new server cleans up a previous instance's
leftovers (pid file in the state dir) before its first load; a worker that ignores
SIGTERM gets SIGKILL after a grace period."
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import fake_config, fake_model, live_workers, wait_until
from tests.guarantees.common import chat


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_worker_survives_the_server(start_server: Any, sig: int) -> None:
    server = start_server(fake_config(a=fake_model(), b=fake_model()))
    for model in ("a", "b"):
        assert chat(server, model).status_code == 200
    pids = {m["pid"] for m in server.state()["models"]}
    assert len(pids) == 2 and None not in pids
    server.stop(sig)
    wait_until(lambda: not live_workers(), 2, "every worker to exit")


def test_a_new_server_kills_what_a_dead_one_left_before_its_first_load(
    start_server: Any,
) -> None:
    # The worker starts a helper process, as runtimes do; the worker itself dies with
    # its SIGKILLed server, its helper does not.
    config = fake_config(a=fake_model(spawn_child=True))
    first = start_server(config)
    assert chat(first, "a").status_code == 200
    worker = psutil.Process(first.model("a")["pid"])
    helper = worker.children()[0]
    try:
        first.stop(signal.SIGKILL)
        wait_until(lambda: not worker.is_running() or
                   worker.status() == psutil.STATUS_ZOMBIE, 5, "the worker to die")
        assert helper.is_running(), "nothing left over: the test proves nothing"
        second = start_server(config)  # same state dir
        wait_until(lambda: not helper.is_running() or
                   helper.status() == psutil.STATUS_ZOMBIE, 5, "the leftover to be killed")
        assert "killed 1 leftover processes of a previous llmux" in second.logs()
        assert second.model("a")["load_count"] == 0  # cleaned before any load
    finally:
        if helper.is_running():
            helper.kill()


def test_a_worker_that_ignores_sigterm_gets_sigkill_after_the_grace(start_server: Any) -> None:
    server = start_server({
        "server": {"shutdown_grace_s": 0.5},
        **fake_config(stuck=fake_model(tokens_per_s=50, hang_after_tokens=2,
                                       ignore_sigterm=True)),
    })
    body = {"model": "stuck", "messages": [{"role": "user", "content": "go"}], "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60):
        wait_until(lambda: server.model("stuck")["in_flight"] == 1, 30, "the job to run")
        worker = psutil.Process(server.model("stuck")["pid"])
        server.stop(signal.SIGTERM)  # shutdown: unload, SIGTERM (ignored), then SIGKILL
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert "ignored SIGTERM for 2.0 s: SIGKILL" in Path(server.log.name).read_text()
