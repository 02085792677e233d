"""Idle: what llmux costs while it serves nothing.

``llmux serve`` on the shipped default config (or the one given), on a free port:
seconds from starting the process to ``/health`` answering 200 (median of ``STARTS``
starts), then, after ``SETTLE_S`` idle, the resident memory of the server process
(and of its whole tree, which holds any worker it keeps ready) and the GPU memory
the tree holds on the config's CUDA devices, through the server's own NVML probe
(llmux/actors/devices.py): 0 on a CPU-only config.

Headline: the start time in seconds (goal < 1 s); the details give RSS (goal < 80 MB)
and GPU memory.

    .venv/bin/python bench/idle.py [config.yaml]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from common import ROOT, Llmux, record, sweep

STARTS = 3
SETTLE_S = 3.0


def load(path: Path) -> dict[str, Any]:
    """The config with its relative API-keys path made absolute (the copy the server
    runs lives elsewhere)."""
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    server = config.get("server") or {}
    keys = server.get("api_keys_file")
    if keys and not Path(keys).is_absolute():
        server["api_keys_file"] = str((path.parent / keys).resolve())
    return config


def cuda_devices(config: dict[str, Any]) -> list[int]:
    return [int(device.split(":", 1)[1]) for device in config.get("devices") or {}
            if device.startswith("cuda:")]


def gpu_bytes(devices: list[int], pid: int, before: dict[int, int]) -> int:
    """Bytes the process tree of ``pid`` holds on the CUDA ``devices`` (by NVML's
    per-process accounting, else the device's growth since ``before``)."""
    if not devices:
        return 0
    from llmux.actors.devices import NvmlProbe

    return sum(NvmlProbe(index).footprint(pid, before[index]) for index in devices)


def used_now(devices: list[int]) -> dict[int, int]:
    if not devices:
        return {}
    from llmux.actors.devices import NvmlProbe

    return {index: NvmlProbe(index).used_bytes() for index in devices}


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "config" / "llmux.yaml"
    devices = cuda_devices(load(path))
    before = used_now(devices)
    starts: list[float] = []
    try:
        for attempt in range(STARTS):
            server = Llmux(load(path)).start()
            try:
                starts.append(server.ready_s)
                if attempt < STARTS - 1:
                    continue
                time.sleep(SETTLE_S)
                assert server.proc is not None
                tree = server.proc.tree()
                rss = tree[0].memory_info().rss
                tree_rss = sum(p.memory_info().rss for p in tree if p.is_running())
                gpu = gpu_bytes(devices, server.proc.pid, before)
            finally:
                server.stop()
    except psutil.Error as exc:
        print(f"idle: the server vanished while measured ({exc})", file=sys.stderr)
        return 1
    finally:
        sweep()
    start = statistics.median(starts)
    record(f"idle: {start:.2f} s (start to /health, median of {STARTS}; RSS "
           f"{rss / 2**20:.0f} MiB server, {tree_rss / 2**20:.0f} MiB with its "
           f"{len(tree) - 1} children; GPU {gpu / 2**20:.0f} MiB"
           f"{'' if devices else ' (no CUDA device configured)'}; {path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
