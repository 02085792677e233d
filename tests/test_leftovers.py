"""The pid file of llmux/leftovers.py in process, with real processes standing in for
workers: it names the instance, the server and its live workers; a clean stop removes
it only once nothing of the instance runs (a zombie does not count); a file that is
not an object is ignored; a previous instance in this very process is cleaned up, one
in another live server is not. End to end: tests/guarantees/test_g04_no_orphans.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmux.leftovers import INSTANCE_ENV, LOCK_FILE, StateDirBusy, StateDirLock, WorkerPids
from tests.conftest import wait_until


class Processes:
    """Sleeping python processes started for a test, killed and reaped after it."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                env={**os.environ, **(env or {})})
        self.started.append(proc)
        return proc

    async def spawn(self, **kwargs: Any) -> subprocess.Popen[bytes]:
        """As ``WorkerHandle.spawn`` is called: the handle has the pid."""
        return self.start(kwargs.get("env"))


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    for proc in procs.started:
        proc.kill()
        proc.wait()


def read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.anyio
async def test_the_pid_file_names_the_instance_the_server_and_its_live_workers(
    tmp_path: Path, processes: Processes,
) -> None:
    path = tmp_path / "workers.pid"
    pids = WorkerPids(path)
    assert pids.clean_previous() == []
    data = read(path)  # written at start, before any worker
    assert (data["instance"], data["server_pid"], data["workers"]) == (
        pids.instance, os.getpid(), [])
    assert data["server_started"] == psutil.Process().create_time()
    spawn = pids.track(processes.spawn)
    first = await spawn(python=sys.executable, model_id="a")
    assert psutil.Process(first.pid).environ()[INSTANCE_ENV] == pids.instance
    second = await spawn(python=sys.executable, model_id="b", env={"OTHER": "1"})
    assert psutil.Process(second.pid).environ()["OTHER"] == "1"
    assert read(path)["workers"] == [first.pid, second.pid]
    first.kill()
    first.wait()
    third = await spawn(python=sys.executable, model_id="c")
    assert read(path)["workers"] == [second.pid, third.pid]  # the dead one went


def test_a_clean_stop_keeps_the_file_while_a_process_of_the_instance_runs(
    tmp_path: Path, processes: Processes,
) -> None:
    path = tmp_path / "workers.pid"
    pids = WorkerPids(path)
    pids.clean_previous()
    helper = processes.start(pids.env())  # a worker's helper that outlived it
    pids.close()
    assert path.exists()  # the next server must still find and kill it
    helper.kill()
    # NOTE: not reaped yet: a zombie is dead, and holds nothing the file is kept for
    wait_until(lambda: psutil.Process(helper.pid).status() == psutil.STATUS_ZOMBIE, 10,
               "the helper to die")
    pids.close()
    assert not path.exists()
    helper.wait()


def test_a_pid_file_that_is_not_an_object_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "workers.pid"
    path.write_text("[1, 2, 3]")
    pids = WorkerPids(path)
    assert pids.clean_previous() == []
    assert read(path)["instance"] == pids.instance


def test_a_previous_instance_in_this_very_process_is_cleaned_up(
    tmp_path: Path, processes: Processes,
) -> None:
    """A runtime started again in the same process (its pid file names this live
    process): the earlier runtime's leftovers are killed, not taken for another
    server's."""
    path = tmp_path / "workers.pid"
    earlier = WorkerPids(path)
    earlier.clean_previous()
    helper = processes.start(earlier.env())
    assert WorkerPids(path).clean_previous() == [helper.pid]
    assert helper.wait(timeout=10) == -signal.SIGKILL


def test_the_processes_of_another_live_server_are_left_alone(
    tmp_path: Path, processes: Processes, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "workers.pid"
    other_server = processes.start()
    helper = processes.start({INSTANCE_ENV: "other"})
    path.write_text(json.dumps({
        "server_pid": other_server.pid, "instance": "other", "workers": [helper.pid],
        "server_started": psutil.Process(other_server.pid).create_time()}))
    assert WorkerPids(path).clean_previous() == []
    assert helper.poll() is None
    assert f"another llmux (pid {other_server.pid}) uses the state directory" in caplog.text


def test_the_lock_file_holds_only_the_holders_pid(tmp_path: Path) -> None:
    """A longer pid left in the file by an earlier holder is overwritten whole, so a
    refused server names the live holder."""
    (tmp_path / LOCK_FILE).write_text("4194304999\n")
    with StateDirLock.take(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateDirBusy, match=rf"another llmux \(pid {os.getpid()}\)"):
            StateDirLock.take(tmp_path)
