"""Device probes: how much memory a device has, uses, and a worker holds.

The arbiter gets a probe per device in its constructor (a seam: tests script one).
``CpuProbe`` reads RSS with psutil; ``NvmlProbe`` reads NVML and is imported only
when a CUDA device is configured, so a CPU-only server never loads NVML.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import psutil

log = logging.getLogger(__name__)


class DeviceProbe(Protocol):
    """Readings of one device. Calls are quick and synchronous."""

    #: whether freed memory must be seen on the device before the next grant
    verify_release: bool

    def total_bytes(self) -> int: ...

    def used_bytes(self) -> int: ...

    def footprint(self, pid: int, used_at_grant: int) -> int:
        """Bytes held by the worker ``pid`` (and its children) on this device;
        ``used_at_grant`` is ``used_bytes()`` read when its load was granted, for
        probes that can only measure by difference."""
        ...

    def process_bytes(self, pid: int) -> int | None:
        """Bytes held now by the worker ``pid`` (and its children), for re-measuring
        a loaded worker; None where the device cannot attribute memory to a process."""
        ...


def process_tree_rss(pid: int) -> int:
    """Resident memory of a process and its children; 0 if it is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class CpuProbe:
    """Host memory: a worker's footprint is its process tree's RSS."""

    verify_release = False  # RSS is gone when the process is reaped

    def total_bytes(self) -> int:
        return int(psutil.virtual_memory().total)

    def used_bytes(self) -> int:
        vm = psutil.virtual_memory()
        return int(vm.total - vm.available)

    def footprint(self, pid: int, used_at_grant: int) -> int:
        return process_tree_rss(pid)

    def process_bytes(self, pid: int) -> int | None:
        return process_tree_rss(pid) or None


class NvmlProbe:
    """One CUDA device through NVML (nvidia-ml-py, the ``cuda`` extra).

    Per-process memory where the worker's PID is visible; inside a container NVML
    reports host PIDs, so the fallback is the device's used-memory delta since the
    grant (the arbiter serialises loads per device, so the delta is this model's).

    A failed NVML call (a driver hiccup, a GPU gone) answers with the last reading and
    a warning, not an exception: the probe runs inside the device's arbiter, and an
    exception there would stop the server.
    """

    verify_release = True

    def __init__(self, index: int, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml  # only with a CUDA device configured

            nvml = pynvml
        nvml.nvmlInit()
        self._nvml: Any = nvml
        self._index = index
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)  # fails at start if broken
        self._failing = False

    def total_bytes(self) -> int:
        return int(self._read_memory().total)

    def used_bytes(self) -> int:
        return int(self._read_memory().used)

    def footprint(self, pid: int, used_at_grant: int) -> int:
        mine = self.process_bytes(pid)
        if mine is not None:
            return mine
        return max(0, self.used_bytes() - used_at_grant)

    def process_bytes(self, pid: int) -> int | None:
        pids = {pid}
        try:
            pids |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError as exc:
            self._failed(exc)
            return None
        mine = [p.usedGpuMemory for p in procs if p.pid in pids and p.usedGpuMemory]
        return int(sum(mine)) if mine else None

    def _read_memory(self) -> Any:
        try:
            self._memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except self._nvml.NVMLError as exc:
            self._failed(exc)
        else:
            if self._failing:
                log.info("NVML answers again for cuda:%d", self._index)
                self._failing = False
        return self._memory

    def _failed(self, exc: Exception) -> None:
        if not self._failing:
            log.warning("NVML failed for cuda:%d (%s): using its last reading until it "
                        "answers again", self._index, exc)
        self._failing = True


class DeviceUnavailable(RuntimeError):
    """A configured CUDA device whose memory NVML cannot read here."""


def probe_for(device_id: str) -> DeviceProbe:
    """The real probe for a configured device id (``cpu`` or ``cuda:N``).

    Raises:
        DeviceUnavailable: no NVML (the ``cuda`` extra), no driver, or no such GPU.
    """
    if device_id == "cpu":
        return CpuProbe()
    try:
        return NvmlProbe(int(device_id.split(":", 1)[1]))
    except Exception as exc:  # ImportError, NVMLError (no driver, no such index), ...
        raise DeviceUnavailable(
            f"device {device_id}: NVML cannot read its memory ({type(exc).__name__}: "
            f"{exc}); install llmux[cuda] on a machine with that NVIDIA GPU and its "
            "driver, or leave the device out of the config") from None
