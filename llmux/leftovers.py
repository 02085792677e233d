"""Leftovers of a previous llmux, found through the pid file in the state directory
and killed before this server's first load (guarantee 4).

Workers die with their server (parent-death signal, pipe EOF), but what a worker
started (a runtime's own server process, a helper) may survive it. So every worker
is spawned with this server instance's id in its environment (``LLMUX_INSTANCE``),
which whatever it starts inherits, and ``workers.pid`` names the instance, its server
process and its workers. A new server reads the file first: if that server is gone,
every process still carrying its id is SIGKILLed. A clean shutdown removes the file,
so the next start has nothing to scan.

NOTE: processes are matched by the instance id in their environment, never by pid
alone: a pid recorded by a dead server may belong to anybody by now.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import psutil

log = logging.getLogger(__name__)

INSTANCE_ENV: Final = "LLMUX_INSTANCE"
PID_FILE: Final = "workers.pid"

Spawn = Callable[..., Awaitable[Any]]


def _started(pid: int) -> float | None:
    """When ``pid`` started (its identity together with the pid); None if gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def processes_of(instance: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``instance`` (ours to read)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(INSTANCE_ENV) == instance and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue  # gone, or another user's: not ours
    return found


class WorkerPids:
    """The pid file of this server instance. ``path`` None: no file, no cleanup."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.instance = uuid.uuid4().hex
        self._workers: list[int] = []

    def env(self) -> dict[str, str]:
        """What every process spawned for this instance gets in its environment."""
        return {INSTANCE_ENV: self.instance}

    def clean_previous(self) -> list[int]:
        """Kill what a previous, dead instance left; then claim the file. Returns the
        pids killed. A previous server that still runs is left alone (and warned of)."""
        if self.path is None:
            return []
        killed: list[int] = []
        previous = self._read()
        if previous is not None:
            pid, started = previous.get("server_pid"), previous.get("server_started")
            instance = str(previous.get("instance", ""))
            alive = isinstance(pid, int) and started is not None and _started(pid) == started
            if alive and pid != os.getpid():
                log.warning("another llmux (pid %s) uses the state directory %s; "
                            "leaving its workers alone", pid, self.path.parent)
            elif instance:
                for proc in processes_of(instance):
                    try:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                    except psutil.Error:
                        continue
                if killed:
                    log.warning("killed %d leftover processes of a previous llmux (pid %s): %s",
                                len(killed), pid, ", ".join(map(str, sorted(killed))))
        self._write()
        return killed

    def track(self, spawn: Spawn) -> Spawn:
        """``spawn`` (``WorkerHandle.spawn``) with the instance id in the worker's
        environment and its pid recorded in the file."""

        async def spawn_tracked(**kwargs: Any) -> Any:
            kwargs["env"] = {**(kwargs.get("env") or {}), **self.env()}
            handle = await spawn(**kwargs)
            self._workers = [p for p in self._workers if _started(p) is not None]
            self._workers.append(int(handle.pid))
            self._write()
            return handle

        return spawn_tracked

    def close(self) -> None:
        """At shutdown: once nothing of this instance runs, there is nothing to clean
        next time (the file stays while anything does)."""
        if self.path is not None and not processes_of(self.instance):
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", self.path, exc)

    def _read(self) -> dict[str, Any] | None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable pid file %s: %s", self.path, exc)
            return None
        return data if isinstance(data, dict) else None

    def _write(self) -> None:
        if self.path is None:
            return
        data = {"server_pid": os.getpid(), "server_started": _started(os.getpid()),
                "instance": self.instance, "workers": self._workers}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write the pid file %s: %s", self.path, exc)
