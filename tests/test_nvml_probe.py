"""The CUDA probe (llmux/actors/devices.py NvmlProbe) over a scripted NVML: there is no
GPU here, so these check the probe's own logic, the calls it makes and what it does
when NVML fails (it runs inside the arbiter, which an exception would stop)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from llmux.actors.devices import NvmlProbe

GB = 1 << 30


class NVMLError(Exception):
    pass


class ScriptedNvml:
    """The few pynvml calls the probe makes (by their names); ``broken`` makes them fail."""

    NVMLError = NVMLError

    def __init__(self) -> None:
        self.used = 2 * GB
        self.processes: list[Any] = []
        self.broken = False

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        if self.broken:
            raise NVMLError("Unknown Error")
        return SimpleNamespace(total=16 * GB, used=self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        if self.broken:
            raise NVMLError("Unknown Error")
        return self.processes


def test_a_worker_is_measured_by_its_own_processes_else_by_the_delta() -> None:
    nvml = ScriptedNvml()
    probe = NvmlProbe(0, nvml)
    assert (probe.total_bytes(), probe.used_bytes()) == (16 * GB, 2 * GB)
    nvml.processes = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * GB),
                      SimpleNamespace(pid=1, usedGpuMemory=5 * GB)]
    assert probe.footprint(os.getpid(), used_at_grant=2 * GB) == 3 * GB
    nvml.processes, nvml.used = [], 6 * GB  # PIDs hidden (a container): the delta
    assert probe.footprint(os.getpid(), used_at_grant=2 * GB) == 4 * GB


def test_a_failing_nvml_answers_with_the_last_reading_and_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    nvml = ScriptedNvml()
    probe = NvmlProbe(1, nvml)
    assert probe.used_bytes() == 2 * GB
    nvml.broken = True
    with caplog.at_level(logging.INFO, logger="llmux.actors.devices"):
        assert probe.used_bytes() == 2 * GB
        assert probe.total_bytes() == 16 * GB
        assert probe.process_bytes(os.getpid()) is None
        assert probe.footprint(os.getpid(), used_at_grant=1 * GB) == 1 * GB
        nvml.broken, nvml.used = False, 3 * GB
        assert probe.used_bytes() == 3 * GB
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("NVML failed for cuda:1 (Unknown Error)")
    assert messages[1] == "NVML answers again for cuda:1"


def test_nvml_broken_at_start_is_an_error_at_start() -> None:
    nvml = ScriptedNvml()
    nvml.broken = True
    with pytest.raises(NVMLError):
        NvmlProbe(0, nvml)


def test_a_worker_counts_its_children_and_never_a_negative_delta() -> None:
    """Memory of the worker's child processes is the worker's; a process NVML lists
    without a figure (None) is not counted; a device that freed memory since the grant
    gives a footprint of 0, not a negative one."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        nvml = ScriptedNvml()
        probe = NvmlProbe(0, nvml)
        nvml.processes = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=1 * GB),
                          SimpleNamespace(pid=child.pid, usedGpuMemory=2 * GB)]
        assert probe.process_bytes(os.getpid()) == 3 * GB
        nvml.processes = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]
        assert probe.process_bytes(os.getpid()) is None
        assert probe.footprint(os.getpid(), used_at_grant=1 * GB) == 1 * GB
        assert probe.footprint(os.getpid(), used_at_grant=5 * GB) == 0
    finally:
        child.kill()
        child.wait()


def test_each_spell_of_failures_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """A failure after NVML answered again warns again; repeated failures do not."""
    nvml = ScriptedNvml()
    probe = NvmlProbe(0, nvml)
    with caplog.at_level(logging.INFO, logger="llmux.actors.devices"):
        for broken in (True, True, False, False, True, True):
            nvml.broken = broken
            probe.used_bytes()
            probe.process_bytes(os.getpid())
    messages = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert messages == ["NVML failed for cuda:0", "NVML answers again for cuda:0",
                        "NVML failed for cuda:0"]
