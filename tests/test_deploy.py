"""The deployment files in deploy/: parsed and cross-checked against the package, the
Makefile and the shipped configs, and checked by the real tools (shellcheck, hadolint,
systemd-analyze; `make` installs them). No Docker or Podman here: a fake ``podman``
records what the pod script would run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmux.audio.voices import voice_names
from llmux.config import Server, load_config
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "podman" / "create_pod_llmux.sh"
GRACE_S = Server().shutdown_grace_s
SERVE_ARGS = ["serve", "--config", "/config/llmux.yaml", "--host", "0.0.0.0", "--port", "8081",
              "--api-keys", "/config/api_keys.yaml"]


def tool(name: str) -> str:
    """A checker's path: this interpreter's scripts first (hadolint comes from the test
    extra), then PATH (shellcheck and systemd-analyze from the Makefile's apt-get)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make setup` installs it")
    return found


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def build_args(text: str) -> dict[str, str]:
    """Every ``ARG NAME=default`` of the Dockerfile (the last one wins)."""
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)=(.*)$", text, re.M)}


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name} :?= ?(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, name
    return match[1].strip()


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", value)
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match[2]]


# -- Dockerfile ---------------------------------------------------------------------------

def test_the_dockerfile_builds_in_stages_and_runs_as_a_user_with_a_health_check() -> None:
    text = dockerfile()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages[-2:] == ["build", "runtime"]
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:8081/health", text, re.M)
    assert "curl" not in text
    assert re.search(r"^EXPOSE 8081$", text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    cmd = re.search(r"^CMD (\[.*?\])$", text, re.M | re.S)
    assert cmd and json.loads(cmd[1].replace("\\\n", "")) == SERVE_ARGS


def test_the_dockerfile_defaults_to_the_cpu_build_of_the_embedded_default() -> None:
    args = build_args(dockerfile())
    assert args["BASE"] == args["BUILD_BASE"] == "python:3.11-slim"
    assert args["TORCH_INDEX"] == "cpu"
    assert args["CHATTERBOX"] == "0"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={args['PYTHON']}" in requires


def test_the_dockerfile_installs_what_the_makefile_installs() -> None:
    text = dockerfile()
    args = build_args(text)
    assert args["TORCH"] == makefile_var("TORCH")
    assert 'pip install "torch==${TORCH}"' in text
    assert '-c /opt/venv/constraints.txt -e "/opt/llmux[${EXTRAS}]"' in text
    extras = set(args["EXTRAS"].split(","))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras <= set(declared)
    make_extras = re.search(r"-e '\.\[([\w,]+)\]'", (ROOT / "Makefile").read_text())
    assert make_extras
    runtime_extras = set(make_extras[1].split(",")) - {"test", "lint"}
    assert runtime_extras <= extras
    chatterbox = re.search(r"\$\(CHATTERBOX_VENV\)/bin/pip install -q (.*)$",
                           (ROOT / "Makefile").read_text(), re.M)
    assert chatterbox
    for pin in chatterbox[1].split():
        assert pin in text


def test_the_chatterbox_virtualenv_is_where_the_gpu_config_expects_it() -> None:
    config = load_config(ROOT / "config" / "kischdle-5070ti.yaml")
    pythons = {m.python for m in config.physical_models.values() if m.backend == "chatterbox"}
    assert pythons == {"/opt/chatterbox-venv/bin/python"}
    assert "uv venv --seed --python \"${PYTHON}\" /opt/chatterbox-venv" in dockerfile()
    assert "COPY --from=build /opt/chatterbox-venv /opt/chatterbox-venv" in dockerfile()


def test_the_build_context_lets_through_exactly_what_the_dockerfile_copies() -> None:
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile(), re.M)
    sources = {s for line in copied for s in line.split()}
    assert sources == {"pyproject.toml", "README.md", "llmux"}
    assert all((ROOT / s).exists() for s in sources)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*"):][:4] == ["*", "!pyproject.toml", "!README.md", "!llmux/"]


def test_hadolint_accepts_the_dockerfile() -> None:
    """Every rule at every level (info included); a rule is ignored only inline, with
    its reason above it."""
    out = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info",
                          str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    lines = dockerfile().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            above = []  # the comment block right above the directive
            for previous in reversed(lines[:i]):
                if not previous.startswith("#"):
                    break
                above.append(previous)
            for rule in line.removeprefix("# hadolint ignore=").split(","):
                assert any(c.startswith(f"# {rule}: ") for c in above), (
                    f"line {i + 1}: say why above it, as '# {rule}: <reason>'")


def test_hadolint_is_really_checking() -> None:
    """The same run flags a root user and a floating base image."""
    bad = "FROM python:latest\nUSER root\nRUN pip install falcon\n"
    out = subprocess.run([tool("hadolint"), "--no-color", "-"], input=bad,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert {"DL3002", "DL3007", "DL3013"} <= set(re.findall(r"DL\d{4}", out.stdout))


# -- compose ------------------------------------------------------------------------------

def test_compose_reserves_the_gpu_and_mounts_config_and_models_read_only() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = compose["services"]["llmux"]
    assert service["ports"] == ["127.0.0.1:8081:8081"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    mounts = {v["target"]: v for v in service["volumes"]}
    for target in ("/config", "/models"):
        assert mounts[target]["type"] == "bind" and mounts[target]["read_only"] is True
    assert mounts["/state"]["source"] in compose["volumes"]
    assert seconds(service["stop_grace_period"]) > GRACE_S
    assert service["init"] is True
    build = service["build"]
    dockerfile_path = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile_path == (DEPLOY / "Dockerfile").resolve()
    assert set(build["args"]) <= set(build_args(dockerfile()))
    assert "0.0.0.0" in service["command"] and "/config/api_keys.yaml" in service["command"]


# -- podman script and Quadlet units ------------------------------------------------------

FAKE_PODMAN = """#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
state = Path(os.environ["FAKE_PODMAN_STATE"])
with open(state / "calls.jsonl", "a") as log:
    log.write(json.dumps(args) + "\\n")
def marker(kind, name):
    return state / f"{{kind}}-{{name}}"
if args[1:2] == ["exists"]:
    sys.exit(0 if marker(args[0], args[2]).exists() else 1)
if args[:2] == ["pod", "create"]:
    marker("pod", args[args.index("--name") + 1]).touch()
elif args[:2] == ["pod", "rm"]:
    for path in state.glob("*-*"):
        path.unlink()
elif args[0] == "run":
    marker("container", args[args.index("--name") + 1]).touch()
elif args[0] == "rm":
    marker("container", args[-1]).unlink(missing_ok=True)
"""


@pytest.fixture
def fake_podman(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    podman = bin_dir / "podman"
    podman.write_text(FAKE_PODMAN.format(python=sys.executable))
    podman.chmod(0o755)
    state = tmp_path / "podman-state"
    state.mkdir()
    for d in ("config", "models"):
        (tmp_path / d).mkdir()
    (tmp_path / "config" / "llmux.yaml").write_text("{}\n")
    (tmp_path / "config" / "api_keys.yaml").write_text("keys: []\n")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_PODMAN_STATE": str(state), "HOME": str(tmp_path)}


def run_script(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                          list[list[str]]]:
    log = Path(env["FAKE_PODMAN_STATE"]) / "calls.jsonl"
    log.unlink(missing_ok=True)
    out = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                         text=True, timeout=30)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


def the_call(calls: list[list[str]], *prefix: str) -> list[str]:
    found = [c for c in calls if c[:len(prefix)] == list(prefix)]
    assert len(found) == 1, (prefix, calls)
    return found[0]


def test_the_pod_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert SCRIPT.read_text().splitlines()[:5][-1] == "set -euo pipefail"
    assert os.access(SCRIPT, os.X_OK)


SKIPPED_DIRS = {".git", ".venv", ".hypothesis", "node_modules", "__pycache__", "llmux.egg-info"}
SHELL_SHEBANG = re.compile(r"#!\s*(?:/usr)?/bin/(?:env\s+)?(?:ba|da|k)?sh\b")


def shell_scripts() -> list[Path]:
    """Every shell script of the repository: ``*.sh`` or a shell shebang."""
    found = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith("_cache")]
        for name in names:
            path = Path(directory) / name
            if name.endswith(".sh"):
                found.append(path)
                continue
            try:
                with path.open("rb") as f:
                    first = f.readline(200).decode("utf-8", "replace")
            except OSError:
                continue
            if SHELL_SHEBANG.match(first):
                found.append(path)
    return sorted(found)


def test_shellcheck_accepts_every_script() -> None:
    scripts = shell_scripts()
    assert {SCRIPT, ROOT / ".ci" / "run"} <= set(scripts)
    out = subprocess.run([tool("shellcheck"), "--severity=style", "--external-sources",
                          *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_shellcheck_is_really_checking(tmp_path: Path) -> None:
    script = tmp_path / "bad.sh"
    script.write_text("#!/usr/bin/env bash\nrm -rf $1/*\nfor f in $(ls); do echo $f; done\n")
    out = subprocess.run([tool("shellcheck"), "--format=gcc", str(script)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert {"SC2086", "SC2045"} <= set(re.findall(r"SC\d{4}", out.stdout))


def test_the_pod_script_prints_its_usage() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("Usage: create_pod_llmux.sh [options]")
    for option in ("--image", "--config-dir", "--models-dir", "--cpu"):
        assert option in out.stdout


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    return ["--config-dir", str(tmp_path / "config"), "--models-dir", str(tmp_path / "models")]


def test_the_pod_script_creates_the_pod_and_runs_llmux_with_the_gpu(
    fake_podman: dict[str, str], dirs: list[str], tmp_path: Path,
) -> None:
    out, calls = run_script(fake_podman, *dirs)
    assert out.returncode == 0, out.stderr
    assert [c[:2] for c in calls] == [["container", "exists"], ["pod", "exists"],
                                      ["pod", "create"], ["run", "--detach"]]
    create = the_call(calls, "pod", "create")
    assert create[create.index("--name") + 1] == "llmux_pod"
    assert create[create.index("--publish") + 1] == "127.0.0.1:8081:8081"
    run = the_call(calls, "run")
    assert run[run.index("--name") + 1] == "llmux_ctr"
    assert run[run.index("--pod") + 1] == "llmux_pod"
    assert run[run.index("--device") + 1] == "nvidia.com/gpu=all"
    volumes = [run[i + 1] for i, a in enumerate(run) if a == "--volume"]
    assert volumes[:2] == [f"{tmp_path}/config:/config:ro,Z", f"{tmp_path}/models:/models:ro,Z"]
    assert float(run[run.index("--stop-timeout") + 1]) > GRACE_S
    assert "/health" in run[run.index("--health-cmd") + 1]
    image = run.index("localhost/llmux:cuda")
    assert run[image + 1:] == SERVE_ARGS


def test_the_pod_script_replaces_a_previous_pod(fake_podman: dict[str, str],
                                                dirs: list[str]) -> None:
    first, _ = run_script(fake_podman, *dirs)
    assert first.returncode == 0, first.stderr
    second, calls = run_script(fake_podman, *dirs)
    assert second.returncode == 0, second.stderr
    kinds = [" ".join(c[:2]) for c in calls]
    assert kinds.index("rm --force") < kinds.index("pod rm") < kinds.index("pod create")
    assert the_call(calls, "pod", "rm")[-1] == "llmux_pod"
    assert the_call(calls, "rm")[-1] == "llmux_ctr"
    assert "removing the existing pod llmux_pod" in second.stdout


def test_the_pod_script_without_a_gpu_passes_no_device(fake_podman: dict[str, str],
                                                       dirs: list[str]) -> None:
    out, calls = run_script(fake_podman, *dirs, "--cpu", "--image", "localhost/llmux:cpu")
    assert out.returncode == 0, out.stderr
    run = the_call(calls, "run")
    assert "--device" not in run and "localhost/llmux:cpu" in run


def test_the_pod_script_refuses_a_config_dir_without_api_keys(
    fake_podman: dict[str, str], dirs: list[str], tmp_path: Path,
) -> None:
    (tmp_path / "config" / "api_keys.yaml").unlink()
    out, calls = run_script(fake_podman, *dirs)
    assert out.returncode == 2
    assert "no api_keys.yaml in" in out.stderr and "without keys" in out.stderr
    assert calls == []


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd-style unit as {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            sections[current].append((key, value))
    return sections


def one(entries: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in entries if k == key]
    assert len(values) == 1, (key, values)
    return values[0]


def test_the_quadlet_pod_publishes_the_loopback_port() -> None:
    pod = unit(DEPLOY / "podman" / "llmux.pod")
    assert one(pod["Pod"], "PodName") == "llmux_pod"
    assert one(pod["Pod"], "PublishPort") == "127.0.0.1:8081:8081"
    assert one(pod["Install"], "WantedBy") == "default.target"


def test_the_quadlet_container_runs_llmux_with_the_gpu_and_stops_gracefully() -> None:
    container = unit(DEPLOY / "podman" / "llmux.container")
    c = container["Container"]
    assert one(c, "ContainerName") == "llmux_ctr"
    assert one(c, "Pod") == "llmux.pod"
    assert one(c, "AddDevice") == "nvidia.com/gpu=all"
    volumes = [v for k, v in c if k == "Volume"]
    assert any(v.endswith(":/config:ro,Z") for v in volumes)
    assert any(v.endswith(":/models:ro,Z") for v in volumes)
    assert one(c, "Exec").split() == SERVE_ARGS
    assert "127.0.0.1:8081/health" in one(c, "HealthCmd")
    assert one(c, "RunInit") == "true"
    stop_timeout = float(one(c, "StopTimeout"))
    assert stop_timeout > GRACE_S
    assert one(container["Service"], "Restart") == "always"
    assert seconds(one(container["Service"], "TimeoutStopSec")) > stop_timeout


# What Quadlet copies unchanged into the .service it generates; [Container] and [Pod]
# become its ExecStart (podman run / podman pod create).
PASSED_THROUGH = ("Unit", "Service", "Install")


def as_service(path: Path) -> str:
    """The unit Quadlet would make of ``path``, with a stand-in ExecStart (no podman
    here): its own [Unit], [Service] and [Install] lines, verbatim."""
    sections = unit(path)
    service = sections.setdefault("Service", [])
    service.insert(0, ("ExecStart", "/bin/true"))
    return "\n".join(
        f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in sections[name])
        for name in PASSED_THROUGH if name in sections)


def systemd_verify(directory: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("systemd-analyze"), "verify", "--man=no",
                           *(str(directory / n) for n in names)],
                          capture_output=True, text=True, timeout=60)


def test_systemd_analyze_accepts_what_quadlet_passes_through(tmp_path: Path) -> None:
    """systemd-analyze verify on the [Unit], [Service] and [Install] sections of both
    Quadlet units (Quadlet's own dry run, below, needs Podman 5); systemd only warns, so
    nothing may be printed."""
    names = {"llmux.container": "llmux.service", "llmux.pod": "llmux-pod.service"}
    for source, service in names.items():
        (tmp_path / service).write_text(as_service(DEPLOY / "podman" / source))
    out = systemd_verify(tmp_path, *names.values())
    assert (out.returncode, out.stdout + out.stderr) == (0, "")

    broken = tmp_path / "broken.service"
    broken.write_text(as_service(DEPLOY / "podman" / "llmux.container")
                      .replace("Restart=always", "Restart=sometimes"))
    out = systemd_verify(tmp_path, broken.name)
    assert "Failed to parse service restart specifier" in out.stderr


QUADLET = [p for p in ("/usr/libexec/podman/quadlet", "/usr/lib/podman/quadlet")
           if os.access(p, os.X_OK)]


@pytest.mark.skipif(not QUADLET, reason="no Quadlet here: Debian 12's podman is 4.3, "
                    "Quadlet came with 4.4 and .pod units with 5.0")
def test_quadlet_generates_the_services(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    for name in ("llmux.pod", "llmux.container"):
        shutil.copy(DEPLOY / "podman" / name, units / name)
    out = subprocess.run([QUADLET[0], "-dryrun", "-user"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "QUADLET_UNIT_DIRS": str(units)})
    assert out.returncode == 0, out.stderr
    assert "---llmux.service---" in out.stdout and "---llmux-pod.service---" in out.stdout
    assert "nvidia.com/gpu=all" in out.stdout


# -- Traefik ------------------------------------------------------------------------------

def render_traefik(text: str, environ: dict[str, str]) -> str:
    """What Traefik's file provider makes of the template's one construct:
    ``{{ env "NAME" | default "value" }}``."""
    pattern = re.compile(r'\{\{ env "(\w+)" \| default "([^"]*)" \}\}')
    assert "{{" not in pattern.sub("", text), "a template construct this test does not know"
    return pattern.sub(lambda m: environ.get(m[1]) or m[2], text)


def test_the_traefik_router_reaches_llmux_through_a_streaming_transport() -> None:
    text = (DEPLOY / "traefik" / "llmux.yml").read_text()
    http = yaml.safe_load(render_traefik(text, {}))["http"]
    router = http["routers"]["llmux"]
    assert router["entryPoints"] == ["websecure"]
    assert router["rule"] == "Host(`llm.example.com`)"
    assert isinstance(router["priority"], int) and router["priority"] > 0
    service = http["services"][router["service"]]["loadBalancer"]
    assert service["servers"] == [{"url": "http://127.0.0.1:8081"}]
    assert service["healthCheck"]["path"] == "/health"
    assert service["responseForwarding"]["flushInterval"].startswith("-")
    timeouts = http["serversTransports"][service["serversTransport"]]["forwardingTimeouts"]
    assert seconds(timeouts["responseHeaderTimeout"]) == 0
    # Traefik drops an idle connection before llmux closes it (no reset POST, no 502)
    assert 0 < seconds(timeouts["idleConnTimeout"]) < Server().keep_alive_s
    assert "middlewares" not in router and "middlewares" not in http
    assert "buffering" not in yaml.safe_load(text).__repr__()


def test_the_traefik_host_and_upstream_are_parameters() -> None:
    text = (DEPLOY / "traefik" / "llmux.yml").read_text()
    http = yaml.safe_load(render_traefik(text, {
        "LLMUX_HOST": "ai.example.org", "LLMUX_ENTRYPOINT": "web",
        "LLMUX_UPSTREAM": "http://llmux_pod:8081"}))["http"]
    assert http["routers"]["llmux"]["rule"] == "Host(`ai.example.org`)"
    assert http["routers"]["llmux"]["entryPoints"] == ["web"]
    assert http["services"]["llmux"]["loadBalancer"]["servers"] == [
        {"url": "http://llmux_pod:8081"}]


# -- Open WebUI ---------------------------------------------------------------------------

# Checked against open-webui/open-webui backend/open_webui/config.py.
OPEN_WEBUI_VARIABLES = {
    "OPENAI_API_BASE_URL", "OPENAI_API_KEY", "ENABLE_OLLAMA_API",
    "AUDIO_STT_ENGINE", "AUDIO_STT_OPENAI_API_BASE_URL", "AUDIO_STT_OPENAI_API_KEY",
    "AUDIO_STT_MODEL", "AUDIO_TTS_ENGINE", "AUDIO_TTS_OPENAI_API_BASE_URL",
    "AUDIO_TTS_OPENAI_API_KEY", "AUDIO_TTS_MODEL", "AUDIO_TTS_VOICE",
    "RAG_EMBEDDING_ENGINE", "RAG_OPENAI_API_BASE_URL", "RAG_OPENAI_API_KEY",
    "RAG_EMBEDDING_MODEL",
}
TABLE_ROWS = {"STT model": "AUDIO_STT_MODEL", "TTS model": "AUDIO_TTS_MODEL",
              "TTS voice": "AUDIO_TTS_VOICE", "embedding model": "RAG_EMBEDDING_MODEL"}
SHIPPED = ["llmux.yaml", "kischdle-5070ti.yaml", "p40.yaml"]


def openwebui_sections() -> dict[str, str]:
    text = (DEPLOY / "openwebui.md").read_text()
    parts = re.split(r"^### `config/([\w.-]+)`.*$", text, flags=re.M)
    return dict(zip(parts[1::2], [p.split("\n## ")[0] for p in parts[2::2]], strict=True))


def test_openwebui_covers_every_shipped_config_with_real_variable_names() -> None:
    sections = openwebui_sections()
    assert list(sections) == SHIPPED
    for name, body in sections.items():
        env = dict(re.findall(r"^([A-Z_]+)=(.*)$", body, re.M))
        assert set(env) <= OPEN_WEBUI_VARIABLES, name
        assert env["ENABLE_OLLAMA_API"] == "false"
        assert env["AUDIO_STT_ENGINE"] == "openai"
        for key, value in env.items():
            if key.endswith("BASE_URL"):
                assert value.endswith("/v1"), (name, key)


@pytest.mark.parametrize("name", SHIPPED)
def test_openwebui_names_only_models_and_voices_the_config_has(name: str) -> None:
    config = load_config(ROOT / "config" / name)
    body = openwebui_sections()[name]
    env = dict(re.findall(r"^([A-Z_]+)=(.*)$", body, re.M))
    table = dict(re.findall(r"^\| ([\w ]+) \| `([^`]+)` \|$", body, re.M))
    chats = re.search(r"^\| chat models \| (.*) \|$", body, re.M)
    assert chats, name

    def physical(virtual: str) -> Any:
        assert virtual in config.virtual_models, (name, virtual)
        return config.physical_models[config.virtual_models[virtual].physical]

    for row, variable in TABLE_ROWS.items():
        assert table.get(row) == env.get(variable), (name, row)
    assert physical(env["AUDIO_STT_MODEL"]).type == "asr"
    if "AUDIO_TTS_MODEL" in env:
        tts = physical(env["AUDIO_TTS_MODEL"])
        assert tts.type == "tts"
        assert env["AUDIO_TTS_VOICE"] in voice_names(tts.voices)
    else:
        assert not any(m.type == "tts" for m in config.physical_models.values())
    if "RAG_EMBEDDING_MODEL" in env:
        assert physical(env["RAG_EMBEDDING_MODEL"]).type == "embedding"
    else:
        assert not any(m.type == "embedding" for m in config.physical_models.values())
    for chat in re.findall(r"`([\w.-]+)`", chats[1]):
        assert physical(chat).type in ("llm", "vlm"), (name, chat)
