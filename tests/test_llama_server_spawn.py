"""How the llama_server backend starts llama-server, without llama-server: behind an exec
wrapper (util-linux's setpriv, else a Python one) that asks for the parent-death signal,
so no Python runs in the forked worker; forked from a thread that lives as long as the
worker. Real processes, with small shell scripts standing in for llama-server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmux.backends import llama_server_io
from llmux.backends.llama_server import LlamaServerBackend
from llmux.backends.llama_server_io import spawn_tied, tied_argv
from llmux.leftovers import INSTANCE_ENV
from tests.conftest import wait_until

SETPRIV = shutil.which("setpriv")
needs_setpriv = pytest.mark.skipif(SETPRIV is None, reason="no setpriv (util-linux)")
SLEEP = shutil.which("sleep") or "/bin/sleep"
# A worker: starts the stand-in from a thread that ends once the stand-in runs (past
# the wrapper), says the stand-in's pid and that thread's native id, and lives on.
WORKER = """
import os, sys, threading, time
from llmux.backends.llama_server_io import spawn_tied

started = {}

def start():
    started["tid"] = threading.get_native_id()
    pid = started["pid"] = spawn_tied([sys.argv[1]]).pid
    while os.path.basename(os.readlink(f"/proc/{pid}/exe")) != "sleep":
        time.sleep(0.01)

thread = threading.Thread(target=start)
thread.start()
thread.join()
print(started["pid"], started["tid"], flush=True)
threading.Event().wait()
"""


def stand_in(folder: Path, script: str) -> str:
    """An executable shell script named llama-server in ``folder``."""
    path = folder / "llama-server"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(params=["setpriv", "python"])
def wrapper(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> str:
    """Which wrapper the spawns below use: setpriv, or the Python one when PATH has no
    setpriv (PATH is then an empty folder: the stand-ins name their commands in full)."""
    if request.param == "setpriv":
        if SETPRIV is None:
            pytest.skip("no setpriv (util-linux)")
    else:
        empty = tmp_path / "no-setpriv"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
    return str(request.param)


@pytest.fixture
def worker(tmp_path: Path, wrapper: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """A worker process (its own session, as llmux's are) that started a sleeping
    stand-in from a thread that ended: (the worker, the stand-in's pid, the thread's id).
    """
    binary = stand_in(tmp_path, f"exec {SLEEP} 600")
    env = {**os.environ, INSTANCE_ENV: "test-instance"}
    process = subprocess.Popen([sys.executable, "-c", WORKER, binary], stdout=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    assert process.stdout is not None
    child = 0
    try:
        child, tid = map(int, process.stdout.readline().split())
        yield process, child, tid
    finally:
        for pid in (process.pid, child):
            with contextlib.suppress(ProcessLookupError):
                if pid:
                    os.kill(pid, signal.SIGKILL)
        process.wait()


# -- the command line -------------------------------------------------------------------


@needs_setpriv
def test_llama_server_runs_behind_setpriv_which_asks_for_sigkill_when_the_worker_dies(
        ) -> None:
    assert tied_argv(["/opt/llama-server", "--model", "m.gguf"]) == [
        SETPRIV, "--pdeathsig", "KILL", "--", "/opt/llama-server", "--model", "m.gguf"]


def test_without_setpriv_a_fresh_python_asks_for_the_signal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = tied_argv(["/opt/llama-server", "--model", "m.gguf"])
    assert argv[:2] == [sys.executable, "-I"]
    assert argv[-3:] == ["/opt/llama-server", "--model", "m.gguf"]


def test_no_python_runs_between_the_fork_and_the_exec(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording)
    spawn_tied([stand_in(tmp_path, "exit 0")]).wait()
    [kwargs] = calls
    assert kwargs.get("preexec_fn") is None


# -- real processes ---------------------------------------------------------------------


def test_the_pid_environment_and_output_are_llama_servers_own(
        tmp_path: Path, wrapper: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The wrapper execs in place: the pid unload signals is the binary's; the
    # environment (LLMUX_INSTANCE, for the leftovers sweep) and the output pipe are as
    # with a plain Popen.
    monkeypatch.setenv(INSTANCE_ENV, "test-instance")
    binary = stand_in(tmp_path, f'echo "pid $$ instance ${INSTANCE_ENV}"; echo oops >&2; '
                                "exit 3")
    process = spawn_tied([binary])
    assert process.stdout is not None
    output = process.stdout.read().decode()
    assert process.wait() == 3
    assert output == f"pid {process.pid} instance test-instance\noops\n"


def test_llama_server_outlives_the_thread_that_started_it_and_dies_with_the_worker(
        worker: tuple[subprocess.Popen[str], int, int]) -> None:
    process, child, tid = worker
    # NOTE: Linux sends the parent-death signal when the forking thread ends: wait until
    # that thread is gone from the kernel, not just joined, then give a signal time.
    wait_until(lambda: not Path(f"/proc/{process.pid}/task/{tid}").exists(), 10,
               "the starting thread to end")
    time.sleep(0.3)
    assert alive(child), "llama-server died with the thread that started it"
    stand_in_process = psutil.Process(child)
    assert stand_in_process.ppid() == process.pid
    assert os.getpgid(child) == os.getpgid(process.pid)  # the worker's group
    assert stand_in_process.environ()[INSTANCE_ENV] == "test-instance"
    os.kill(process.pid, signal.SIGKILL)  # the worker alone, not its process group
    process.wait()
    wait_until(lambda: not alive(child), 10, "llama-server to die with its worker")


def test_a_failed_start_names_the_exit_code_and_the_log(tmp_path: Path) -> None:
    # The backend's load goes through the same spawn: llama-server gets the command
    # line, and its output is the error message's tail.
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    # Its last words come after its exit is seen (here from a child holding its output):
    # the load waits for the log reader to reach the log's end.
    binary = stand_in(tmp_path, f'({SLEEP} 0.3; echo "cannot load: $*") & exit 1')
    backend = LlamaServerBackend({"model_id": "m", "model_path": str(model), "device": "cpu",
                                  "options": {"binary": binary, "n_threads": 1}})
    try:
        with pytest.raises(ValueError, match=rf"^{model}: llama-server exited with code 1 "
                                             rf"while loading it: cannot load: --model "
                                             rf"{model} --host \S+/server.sock "):
            backend.load(lambda fraction, message: None)
    finally:
        backend.unload()


def test_a_spawn_error_is_raised_to_the_caller_and_the_spawner_lives_on(
        tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        llama_server_io._SPAWNER.call(lambda: subprocess.Popen([str(tmp_path / "none")]))
    assert spawn_tied([stand_in(tmp_path, "exit 0")]).wait() == 0
