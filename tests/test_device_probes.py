"""The CPU probe and ``probe_for`` (llmux/actors/devices.py): what a worker's process
tree holds, what the host uses, and which probe a configured device id gets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from llmux.actors import devices
from llmux.actors.devices import CpuProbe, DeviceUnavailable, probe_for, process_tree_rss

from .test_nvml_probe import GB, NVMLError, ScriptedNvml


@pytest.fixture
def child() -> Iterator[psutil.Process]:
    """A child process of this one, alive for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_process_tree_counts_the_children_too(child: psutil.Process) -> None:
    """The RSS of a worker is its own plus that of every process it started."""
    me = psutil.Process()
    assert child.ppid() == me.pid
    assert process_tree_rss(me.pid) > me.memory_info().rss  # the child is counted too


class _Gone:
    def memory_info(self) -> Any:
        raise psutil.NoSuchProcess(1)


class _Alive:
    def __init__(self, rss: int) -> None:
        self.rss = rss

    def memory_info(self) -> Any:
        return SimpleNamespace(rss=self.rss)


def test_a_child_that_exits_while_measured_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child gone between listing and reading costs nothing and hides no other."""
    class Root(_Alive):
        def children(self, recursive: bool) -> list[Any]:
            return [_Gone(), _Alive(5)]

    monkeypatch.setattr(devices.psutil, "Process", lambda pid: Root(100))
    assert process_tree_rss(1) == 105


def test_a_gone_worker_holds_nothing() -> None:
    """The footprint of a reaped worker is 0; for a re-measure it is unknown (None)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert process_tree_rss(proc.pid) == 0
    assert CpuProbe().footprint(proc.pid, used_at_grant=0) == 0
    assert CpuProbe().process_bytes(proc.pid) is None
    assert CpuProbe().process_bytes(psutil.Process().pid) == process_tree_rss(psutil.Process().pid)


def test_host_memory_used_is_what_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Used is total minus available (page cache counts as free), not psutil's ``used``."""
    memory = SimpleNamespace(total=100 * GB, available=30 * GB, used=50 * GB)
    monkeypatch.setattr(devices.psutil, "virtual_memory", lambda: memory)
    probe = CpuProbe()
    assert (probe.total_bytes(), probe.used_bytes()) == (100 * GB, 70 * GB)
    assert CpuProbe.verify_release is False  # RSS is gone with the process


def test_each_device_id_gets_its_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cpu`` is the CPU probe; ``cuda:N`` reads NVML device N (pynvml scripted)."""
    assert isinstance(probe_for("cpu"), CpuProbe)
    nvml = ScriptedNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = probe_for("cuda:12")
    assert isinstance(probe, devices.NvmlProbe) and probe.verify_release is True
    assert probe._handle == "gpu12"
    assert probe.total_bytes() == 16 * GB


def test_a_gpu_nvml_cannot_read_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An NVML error at start (no driver, no such GPU) is a DeviceUnavailable that says
    what failed, as is a missing pynvml."""
    nvml = ScriptedNvml()
    nvml.broken = True
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(DeviceUnavailable, match=r"device cuda:0: NVML cannot read its "
                       r"memory \(NVMLError: Unknown Error\)"):
        probe_for("cuda:0")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    with pytest.raises(DeviceUnavailable, match=r"(ModuleNotFoundError|ImportError): "):
        probe_for("cuda:1")
    assert NVMLError.__name__ == "NVMLError"
