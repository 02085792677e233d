"""What an operator sees and gets when a model's worker goes away, on a live server:
an unloading model shows the pid of the worker that is leaving until it has exited,
and a pinned model whose worker dies comes back by itself, backing off if it keeps
dying, while a model that is only preloaded waits for its next request."""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import psutil

from tests.conftest import Server, fake_config, fake_model, wait_until

UNLOAD_S = 3.0  # how long the fake worker takes to unload: the window the test looks in


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ready_pid(server: Server, model: str, timeout: float = 10.0) -> int:
    """The pid of ``model``'s worker once the model is ready."""
    wait_until(lambda: server.model(model)["state"] == "ready", timeout, f"{model} to be ready")
    pid: int = server.model(model)["pid"]
    assert alive(pid), pid
    return pid


def kill_worker(server: Server, model: str) -> int:
    """SIGKILL the ready worker of ``model`` as the OOM killer would; returns its pid."""
    pid = ready_pid(server, model)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 5, f"worker {pid} to die")
    return pid


def reloaded_pid(server: Server, model: str, old_pid: int, timeout: float) -> int:
    """The pid of the new worker of ``model``, once it is ready again."""
    wait_until(lambda: (m := server.model(model))["state"] == "ready" and m["pid"] != old_pid,
               timeout, f"{model} to be ready again with a new worker")
    return ready_pid(server, model)


def died(model: str, pid: int) -> str:
    """How the event log words a worker SIGKILLed from outside."""
    return f"worker died: worker {model} (pid {pid}) closed its pipe and was killed by SIGKILL"


def failures(server: Server, model: str) -> list[str]:
    return [e["reason"] for e in server.state()["events"] if e["model"] == model
            and e["kind"] == "transition" and e["to_state"] == "failed"]


def retries(server: Server, model: str) -> list[str]:
    return [e["reason"] for e in server.state()["events"]
            if e["model"] == model and e["kind"] == "retry"]


def chat(server: Server, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


def test_an_unloading_model_shows_its_worker_pid_until_the_worker_has_exited(
    start_server: Any,
) -> None:
    server: Server = start_server(
        fake_config(slow=fake_model(unload_time_s=UNLOAD_S) | {"preload": True}))
    pid = ready_pid(server, "slow")

    response = httpx.post(f"{server.url}/admin/models/slow/unload", timeout=10)
    assert response.status_code == 202, response.text
    wait_until(lambda: server.model("slow")["state"] == "unloading", 5, "slow to unload")
    unloading = server.model("slow")
    assert (unloading["state"], unloading["pid"]) == ("unloading", pid)
    assert alive(pid)

    wait_until(lambda: server.model("slow")["state"] == "unloaded", UNLOAD_S + 10,
               "slow to finish unloading")
    assert server.model("slow")["pid"] is None
    assert not alive(pid)


def test_a_pinned_model_whose_worker_is_killed_is_loaded_again_without_a_request(
    start_server: Any,
) -> None:
    server: Server = start_server(fake_config(kept=fake_model() | {"pinned": True}))
    killed = kill_worker(server, "kept")

    new_pid = reloaded_pid(server, "kept", killed, timeout=5)
    assert new_pid != killed
    assert failures(server, "kept") == [
        f"{died('kept', killed)}; retry at once; pinned, so it reloads by itself"]
    assert retries(server, "kept") == [
        f"retrying the load (failures in a row: 1) after: {died('kept', killed)}"]


def test_a_pinned_model_that_keeps_crashing_backs_off_like_a_failed_load(
    start_server: Any,
) -> None:
    server: Server = start_server(fake_config(kept=fake_model() | {"pinned": True}))
    reloaded_pid(server, "kept", kill_worker(server, "kept"), timeout=5)

    again = kill_worker(server, "kept")  # soon after its reload: a second failure in a row
    wait_until(lambda: len(failures(server, "kept")) == 2, 5, "the second failure")
    assert failures(server, "kept")[1] == \
        f"{died('kept', again)}; retry in 2 s; pinned, so it reloads by itself"
    assert server.model("kept")["state"] == "failed"  # waiting out its backoff
    reloaded_pid(server, "kept", again, timeout=10)
    assert retries(server, "kept")[1] == \
        f"retrying the load (failures in a row: 2) after: {died('kept', again)}"


def test_a_preloaded_model_whose_worker_is_killed_waits_for_its_next_request(
    start_server: Any,
) -> None:
    server: Server = start_server({
        "devices": {"cpu": {"capacity": "1GB"}},
        **fake_config(warm=fake_model() | {"preload": True},
                      kept=fake_model() | {"pinned": True}),
    })
    dead = kill_worker(server, "warm")
    wait_until(lambda: server.model("warm")["state"] == "failed", 5, "warm to be failed")
    # The pinned model's reload is the clock: a preloaded model that came back by
    # itself would be back well within it.
    killed = kill_worker(server, "kept")
    reloaded_pid(server, "kept", killed, timeout=5)
    warm = server.model("warm")
    assert (warm["state"], warm["pid"]) == ("failed", None)
    assert failures(server, "warm") == [
        f"{died('warm', dead)}; retry at once"]

    assert chat(server, "warm").status_code == 200
    assert server.model("warm")["state"] == "ready"
