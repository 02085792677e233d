"""Shared fixtures: a real llmux server in a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).parent.parent
# Property tests check behaviour, not speed: on a loaded 2-core CI machine one example,
# or the drawing of its input, can take seconds (a forecast test's draw once took 2.9 s).
settings.register_profile("llmux", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("llmux")
# Every process this test session starts inherits this marker, so the session finds
# its own workers (orphans included) and not those of another session on the machine.
SESSION_MARK = "PYTEST_LLMUX_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex
# A server started without server.state_dir uses $XDG_STATE_HOME/llmux and locks it: the
# session's own, so it never meets a real server's (or another session's) lock there.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="llmux-test-state-")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean_llmux_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LLMUX_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 here and in the workers a live server starts (they inherit
    it), also when transformers was imported before the module."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def live_workers() -> list[psutil.Process]:
    """Every live llmux worker process this test session started (tests run one server
    at a time)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            if ("llmux.worker" in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.environ().get(SESSION_MARK) == os.environ[SESSION_MARK]):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def session_processes() -> list[psutil.Process]:
    """Every live process this test session started, directly or not, whatever it runs:
    servers, workers, and what a worker starts (a runtime's helper), orphans included.
    Each carries the session's marker in its environment. Not this process itself."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if (proc.pid != os.getpid() and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.environ().get(SESSION_MARK) == os.environ[SESSION_MARK]):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    """``pid: command line`` of each process, for a failure message."""
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
        except psutil.Error:
            lines.append(f"{proc.pid}: (gone)")
    return "; ".join(lines)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Server:
    """A running ``llmux serve`` subprocess."""

    def __init__(self, config: dict[str, Any], tmp: Path, *args: str,
                 admin_key: str | None = None) -> None:
        self.port = free_port()
        self.admin_headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        config.setdefault("server", {}).update(port=self.port, state_dir=str(tmp / "state"))
        self.config_path = tmp / "llmux.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # Append mode: the server's writes go to the end of the file whatever a reader
        # of it does (a shared offset moved by a seek would let them overwrite lines).
        self.log = (tmp / "server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmux.cli", "serve", "--config", str(self.config_path),
             *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_until(self._healthy, 20, "the server to answer /health")
        except BaseException:
            self.stop()  # a server that never got healthy must not outlive its test
            raise

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited: {self.logs()}")
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/admin/state", timeout=5,
                                         headers=self.admin_headers).json()
        return data

    def model(self, model_id: str) -> dict[str, Any]:
        return next(m for m in self.state()["models"] if m["id"] == model_id)

    def load(self, model_id: str, ready_within_s: float | None = 30) -> None:
        """Load ``model_id`` through the admin route; wait until it is ready (unless
        ``ready_within_s`` is None)."""
        response = httpx.post(f"{self.url}/admin/models/{model_id}/load", timeout=10,
                              headers=self.admin_headers)
        assert response.status_code == 202, response.text
        if ready_within_s is not None:
            wait_until(lambda: self.model(model_id)["state"] == "ready", ready_within_s,
                       f"{model_id} to load")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.log.close()


@contextmanager
def serving(config: dict[str, Any], tmp: Path, *, keys: dict[str, Any] | None = None,
            admin_key: str | None = None) -> Iterator[Server]:
    """A server for a module's tests: stopped after them, and its workers gone.
    ``keys``: the API keys file's content (written in ``tmp``); ``admin_key`` the one
    ``Server.state`` and ``Server.load`` use."""
    args: list[str] = []
    if keys is not None:
        (tmp / "api_keys.yaml").write_text(yaml.safe_dump(keys))
        args = ["--api-keys", str(tmp / "api_keys.yaml")]
    server = Server(config, tmp, *args, admin_key=admin_key)
    try:
        yield server
    finally:
        server.stop()
        wait_until(lambda: not live_workers(), 10, "workers to exit")


@contextmanager
def sdk_client(server: Server) -> Iterator[openai.OpenAI]:
    """The openai SDK on ``server``, without its retries (a test sees each answer)."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def fake_model(**options: Any) -> dict[str, Any]:
    return {"type": "llm", "backend": "fake", "estimated_vram": "200MB",
            "options": {"load_time_s": 0.2, "footprint": "150MB", "tokens_per_s": 200,
                        **options}}


def fake_config(**models: dict[str, Any]) -> dict[str, Any]:
    """A config serving each physical model under a virtual model of the same name."""
    return {"physical_models": models,
            "virtual_models": {name: {"physical": name} for name in models}}


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """Start servers for a test; afterwards stop them, and check that nothing the test
    started still runs (guarantee 4: no worker, and no process a worker started, may
    outlive its server). Leftovers are killed, and the test fails in its teardown."""
    servers: list[Server] = []
    # What ran before the test started (another fixture's) is not the test's.
    before = {(p.pid, _started_at(p)) for p in session_processes()}

    def start(config: dict[str, Any], *args: str, admin_key: str | None = None) -> Server:
        server = Server(config, tmp_path, *args, admin_key=admin_key)
        servers.append(server)
        return server

    def leftovers() -> list[psutil.Process]:
        return [p for p in session_processes()
                if (started := _started_at(p)) is not None and (p.pid, started) not in before]

    try:
        yield start
        for server in servers:
            server.stop()
    finally:
        for server in servers:
            if server.proc.poll() is None:  # stop() failed: do not leave it running
                server.proc.kill()
                server.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (left := leftovers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            message = f"left running after the test: {describe(left)}"
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            pytest.fail(message)


def _started_at(proc: psutil.Process) -> float | None:
    try:
        return proc.create_time()
    except psutil.Error:
        return None
