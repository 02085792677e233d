"""The operator commands around a server: ``llmux state`` and ``llmux move`` against a
real server (with API keys) or an address nobody answers on, ``llmux pull``'s and
``serve``'s argument handling, the state text, and ``check-config``'s summary and
missing-file report. (Pull against a fake hub is in tests/test_pull.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, fake_config, fake_model, free_port, wait_until

ADMIN_KEY = "sk-operator-admin-4f1c"


def llmux(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m llmux.cli ARGS``, its output once it exited."""
    return subprocess.run([sys.executable, "-m", "llmux.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


# --- state and move on a server with keys -------------------------------------------------


def test_state_and_move_send_the_admin_key_and_never_print_it(
        start_server: Any, tmp_path: Path) -> None:
    """The key from $LLMUX_API_KEY or --api-key reaches the server (without it the admin
    routes refuse); ``--json`` is /admin/state as the server gives it; a URL written with
    a trailing slash works; neither the key nor the keys file's secret is ever printed."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "ops", "key": ADMIN_KEY,
                                              "admin": True}]}))
    server = start_server(fake_config(a=fake_model()), "--api-keys", str(keys),
                          admin_key=ADMIN_KEY)
    refused = llmux("state", "--url", server.url)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"cannot read state from {server.url}: HTTP Error 401")

    text = llmux("state", "--url", server.url + "/", env={"LLMUX_API_KEY": ADMIN_KEY})
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("devices:\n  cpu ")
    assert [line.split()[:3] for line in text.stdout.splitlines()
            if line.startswith("  a ")] == [["a", "unloaded", "cpu"]]

    as_json = llmux("state", "--json", "--url", server.url, "--api-key", ADMIN_KEY)
    assert as_json.returncode == 0, as_json.stderr
    state = json.loads(as_json.stdout)
    assert [m["id"] for m in state["models"]] == ["a"]
    assert state.keys() == server.state().keys()

    refused = llmux("move", "--url", server.url, "a", "cpu")
    assert refused.returncode == 1 and refused.stderr.startswith("llmux: ")
    moved = llmux("move", "--url", server.url, "a", "cpu", env={"LLMUX_API_KEY": ADMIN_KEY})
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == "a: moving to cpu; `llmux state` shows when it is ready\n"
    wait_until(lambda: server.model("a")["state"] == "ready", 20, "a to load on cpu")

    printed = "".join(out.stdout + out.stderr
                      for out in (refused, text, as_json, moved)) + server.logs()
    assert ADMIN_KEY not in printed
    assert "authentication on: 1 API keys (ops)" in server.logs()


def test_move_takes_a_virtual_model_named_with_a_slash(start_server: Any) -> None:
    config = fake_config(chat=fake_model())
    config["virtual_models"] = {"acme/chat": {"physical": "chat"}}
    server = start_server(config)
    """A virtual name may hold '/' but the admin route takes one path segment (a server
    decodes %2F before routing): the CLI sends the physical model it runs on."""
    out = llmux("move", "--url", server.url, "acme/chat", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("acme/chat: moving to cpu")
    wait_until(lambda: server.model("chat")["state"] == "ready", 20, "chat to load on cpu")


def test_state_and_move_with_nobody_listening_fail_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    state = llmux("state", "--url", url)
    assert state.returncode == 1
    assert state.stderr.startswith(f"cannot read state from {url}: ")
    assert "Traceback" not in state.stderr and state.stdout == ""
    move = llmux("move", "--url", url, "a", "cpu")
    assert move.returncode == 1
    assert move.stderr.startswith(f"cannot reach {url}: ")
    assert "Traceback" not in move.stderr and move.stdout == ""


# --- the state text -------------------------------------------------------------------------


def _model(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "state": "ready", "device": "cpu", "footprint_bytes": 10**8,
            "footprint_source": "measured", "pid": 7, "queue_depth": 0, "in_flight": 0,
            "load_count": 1, "jobs_started": 2, **extra}


def _state(events: int = 0, spares: dict[str, Any] | None = None,
           **models: dict[str, Any]) -> dict[str, Any]:
    at = time.mktime((2026, 11, 24, 7, 0, 0, 0, 0, -1))
    return {
        "devices": [{"id": "cpu", "capacity_bytes": 10**9, "used_bytes": 0,
                     "reserved_bytes": 0, "free_bytes": 10**9}],
        "models": [_model(name, **extra) for name, extra in models.items()],
        "spares": spares or {"enabled": False},
        "events": [{"at": at + i, "model": "a", "kind": "evict", "reason": f"event {i}",
                    "from_state": None, "to_state": None} for i in range(events)],
    }


def test_state_shows_the_last_twenty_events_oldest_first() -> None:
    from llmux.cli import render_state

    lines = render_state(_state(events=25, a={})).splitlines()
    shown = lines[lines.index("recent events:") + 1:]
    assert [line.split(maxsplit=3)[-1] for line in shown] == [
        f"event {i}" for i in range(5, 25)]
    assert shown[0].split()[0] == "07:00:05"


def test_state_gives_a_last_error_line_only_to_a_model_that_has_one() -> None:
    from llmux.cli import render_state

    lines = render_state(_state(a={"last_error": None}, b={"last_error": "boom"},
                                c={})).splitlines()
    models = lines[lines.index("models:") + 1:lines.index("recent events:")]
    assert [line.split()[0] for line in models] == ["a", "b", "last", "c"]
    assert models[2].endswith("last error: boom")


def test_state_names_warm_spares_only_when_they_are_on() -> None:
    from llmux.cli import render_state

    off = _state(a={}, spares={"enabled": False, "ready": [], "handed_out": 4, "dropped": 0})
    assert "warm spares" not in render_state(off)
    none_ready = _state(a={}, spares={"enabled": True, "ready": [], "handed_out": 2,
                                      "dropped": 1})
    assert "warm spares: none ready; handed out 2, dropped 1" in \
        render_state(none_ready).splitlines()


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "port"), [("1", 1), ("8081", 8081), ("65535", 65535)])
def test_a_port_in_range_is_taken(text: str, port: int) -> None:
    from llmux.cli import port_number

    assert port_number(text) == port


@pytest.mark.parametrize("text", ["0", "65536", "-1", "http", ""])
def test_a_port_out_of_range_or_not_a_number_is_refused(text: str) -> None:
    import argparse

    from llmux.cli import port_number

    with pytest.raises(argparse.ArgumentTypeError, match="is not a port"):
        port_number(text)


def test_serve_with_a_broken_keys_file_lists_its_problems_and_does_not_start(
        tmp_path: Path) -> None:
    """Before any port is bound: the file's problems by path, never the key itself."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(fake_config(a=fake_model())))
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "a", "key": ADMIN_KEY},
                                             {"name": "a", "key": "sk-other-key-9"}]}))
    out = llmux("serve", str(config), "--api-keys", str(keys), "--port", str(free_port()))
    assert out.returncode == 1
    assert out.stderr.startswith(f"{keys}: 1 problem(s)\n  keys[1].name: ")
    assert ADMIN_KEY not in out.stderr and "sk-other-key-9" not in out.stderr


def test_pull_takes_its_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmux.cli import DEFAULT_CONFIG, parse_args

    assert parse_args(["pull"]).config == DEFAULT_CONFIG
    monkeypatch.setenv("LLMUX_CONFIG", "env.yaml")
    assert parse_args(["pull", "m"]).config == "env.yaml"
    assert parse_args(["pull", "--config", "given.yaml"]).config == "given.yaml"


def test_pull_of_an_invalid_config_lists_its_problems_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("physical_models:\n  m: {type: llm, backend: fake, estimated_vram: lots}\n"
                   "virtual_models: {}\n")
    out = llmux("pull", "--config", str(bad))
    assert out.returncode == 1
    assert out.stderr.startswith(f"{bad}: 1 problem(s)\n")
    assert 'physical_models.m.estimated_vram: "lots" is not a size' in out.stderr
    assert out.stdout == ""


def test_an_interrupted_pull_says_what_is_kept_and_exits_130(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import llmux.pull
    from llmux import cli

    def interrupted(*_: Any, **__: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(llmux.pull, "pull", interrupted)
    monkeypatch.setattr(cli, "setup_logging", lambda *args, **kwargs: None)  # pytest's
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(fake_config(a=fake_model())))
    assert cli.main(["pull", "--config", str(config)]) == 130
    assert capsys.readouterr().err == \
        "llmux pull: interrupted; files already complete are kept\n"


# --- check-config's summary and missing files -----------------------------------------------


def test_summary_shows_what_an_operator_checks_before_serving(tmp_path: Path) -> None:
    """Where the config came from, an open server, the flags, the idle timeout, the
    exclusive group, and a prefix of exactly the column's width shown whole (its
    whitespace flattened)."""
    from llmux.config import load_config
    from llmux.config_report import render_summary

    prefix = "You are\n terse." + "x" * 26  # 40 characters once flattened
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "physical_models": {
            "m": fake_model() | {"preload": True, "idle_timeout_s": 90,
                                 "exclusive_group": "big"},
            "n": fake_model() | {"pinned": True}},
        "virtual_models": {"v": {"physical": "m", "system_prompt_prefix": prefix}}}))
    config = load_config(path)
    lines = render_summary(config).splitlines()
    assert lines[0] == f"llmux configuration from {path}"
    assert lines[1].endswith("api keys: none (open)")
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("m ", "n "))}
    assert rows["m"][-4:] == ["big", "preload", "90", "s"]
    assert rows["n"][-3:] == ["-", "pinned", "never"]
    virtual = next(line for line in lines if line.startswith("v "))
    assert virtual.endswith("You are terse." + "x" * 26)


def test_one_missing_model_file_is_counted_in_the_singular(tmp_path: Path) -> None:
    """A model served by another interpreter keeps its package there: its ``pkg:`` path
    is not looked for here."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(fake_config(
        gone=fake_model() | {"model_path": f"{tmp_path}/gone.gguf"},
        elsewhere=fake_model() | {"model_path": "pkg:only_in_that_venv/m.gguf",
                                  "python": sys.executable})))
    out = llmux("check-config", str(path))
    assert out.returncode == 0, out.stderr
    report = out.stdout.split("Model files on this machine")[1].strip().splitlines()
    assert [line.split()[0] for line in report[2:-1]] == ["gone"]
    assert report[-1] == "1 model file missing"


def test_one_missing_file_of_a_pullable_model_is_it_not_them(tmp_path: Path) -> None:
    from llmux.config import load_config
    from llmux.model_files import cannot_load

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(fake_config(one=fake_model() | {
        "model_path": f"{tmp_path}/one.gguf", "source": {"repo": "acme/One-GGUF"}})))
    config = load_config(path)
    assert cannot_load(config.physical_models["one"], config) == (
        f"one cannot load: its model_path {tmp_path}/one.gguf is missing (no such file or "
        f"directory); `llmux pull one --config {path}` fetches it")
