"""``llmux pull`` against a local fake Hugging Face Hub, the planner, and the missing-file
list of ``llmux check-config``.

The fake hub speaks what huggingface_hub 2.4 asks for in ``model_info`` and
``hf_hub_download``: ``GET /api/models/{repo}/revision/{rev}`` (siblings with sizes and
LFS sha256), ``HEAD`` and ``GET /{repo}/resolve/{rev}/{file}`` (``X-Repo-Commit``,
``ETag``, ``Content-Length``, ranges), gated repos answering 401/403 with
``X-Error-Code: GatedRepo``, and a revision other than ``main`` or the repo's commit
answering 404 ``RevisionNotFound``. ``llmux pull`` runs as a subprocess pointed at it with
``HF_ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import pytest
import yaml
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

from llmux.config import ConfigError, PhysicalModel, Source, parse_config
from llmux.pull_plan import (
    Listing,
    LocalFile,
    RemoteFile,
    Status,
    download_dir,
    exit_code,
    plan,
    render_rows,
    select_files,
)
from tests.conftest import fake_config, fake_model

ROOT = Path(__file__).parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB), so
# only a file longer than one chunk shows a resume that starts past zero.
BIG = DOWNLOAD_CHUNK_SIZE + 2 * 2**20


# --- the fake hub ------------------------------------------------------------------------


@attrs.define
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    commit: str = COMMIT  # a push changes it


@attrs.define
class FakeHub:
    """Repos by id; counts every file GET and can drop a connection mid-file once."""

    repos: dict[str, FakeRepo]
    url: str = ""
    gets: Counter[str] = attrs.Factory(Counter)
    ranges: list[str] = attrs.Factory(list)
    drop_once: dict[str, int] = attrs.Factory(dict)  # file -> bytes sent before hanging up
    lock: threading.Lock = attrs.Factory(threading.Lock)


_INFO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            if (m := _INFO.fullmatch(path)) and m["repo"] in hub.repos:
                repo = hub.repos[m["repo"]]
                if m["rev"] not in ("main", repo.commit):
                    return self._reply(404, {"X-Error-Code": "RevisionNotFound"})
                siblings = [{"rfilename": name, "size": len(data), "blobId": _etag(data)[:40],
                             "lfs": {"sha256": _etag(data), "size": len(data),
                                     "pointerSize": 134}}
                            for name, data in repo.files.items()]
                body = json.dumps({"id": m["repo"], "sha": repo.commit, "private": False,
                                   "gated": "manual" if repo.gated else False,
                                   "siblings": siblings}).encode()
                return self._reply(200, {"Content-Type": "application/json"}, body)
            m = _RESOLVE.fullmatch(path)
            if m is None or m["repo"] not in hub.repos:
                return self._reply(404, {"X-Error-Code": "RepoNotFound"})
            repo = hub.repos[m["repo"]]
            if repo.gated:
                status = 403 if self.headers.get("Authorization") else 401
                return self._reply(status, {"X-Error-Code": "GatedRepo",
                                            "X-Error-Message": "Access to this model is "
                                            "restricted"})
            data = repo.files.get(m["file"])
            if data is None:
                return self._reply(404, {"X-Error-Code": "EntryNotFound",
                                         "X-Repo-Commit": repo.commit})
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_etag(data)}"',
                       "Accept-Ranges": "bytes"}
            if self.command == "HEAD":
                return self._reply(200, headers, data)
            key = f"{m['repo']}/{m['file']}"
            with hub.lock:
                hub.gets[key] += 1
                drop = hub.drop_once.pop(key, None)
            if (wanted := self.headers.get("Range")) is not None:
                hub.ranges.append(f"{key} {wanted}")
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._reply(206, headers, data[start:])
            if drop is not None:  # promise the whole file, send part of it, hang up
                self.send_response(200)
                for k, v in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[:drop])
                self.wfile.flush()
                self.close_connection = True
                return None
            return self._reply(200, headers, data)

    return Handler


def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub(repos={
        "acme/Chat-GGUF": FakeRepo({"Chat-Q4_K_M.gguf": _blob(1, 300_000),
                                    "Chat-Q8_0.gguf": _blob(2, 500_000),
                                    "mmproj-F16.gguf": _blob(3, 60_000),
                                    "README.md": b"# chat\n"}),
        "acme/whisper": FakeRepo({"config.json": b'{"a": 1}', "model.safetensors":
                                  _blob(4, 200_000), "original/model.bin": _blob(5, 200_000)}),
        "acme/Big-GGUF": FakeRepo({"Big.gguf": _blob(7, BIG)}),
        "acme/gated-asr": FakeRepo({"model.safetensors": _blob(6, 1000)}, gated=True),
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _model(path: str, **source: Any) -> dict[str, Any]:
    return {"type": "llm", "backend": "fake", "estimated_vram": "1GB", "model_path": path,
            "source": source}


def _config(tmp_path: Path, models: dict[str, Any]) -> Path:
    path = tmp_path / "llmux.yaml"
    path.write_text(yaml.safe_dump({"physical_models": models, "virtual_models": {}}))
    return path


def _shipped_models(tmp_path: Path) -> dict[str, Any]:
    models = tmp_path / "models"
    return {
        "chat": _model(f"{models}/chat/Chat-Q4_K_M.gguf", repo="acme/Chat-GGUF",
                       files=["Chat-Q4_K_M.gguf", "mmproj-F16.gguf"]),
        "whisper": _model(f"{models}/whisper", repo="acme/whisper", exclude=["original/*"]),
    }


def run_llmux(hub: FakeHub, tmp_path: Path, *args: str,
              token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "llmux.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _rows(stdout: str) -> dict[tuple[str, str], str]:
    """(model, file) -> status, from the summary table."""
    found = {}
    for line in stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 4 and parts[0] != "MODEL":
            found[parts[0], parts[1]] = parts[3]
    return found


# --- llmux pull against the fake hub -----------------------------------------------------


def test_first_pull_downloads_the_named_files_and_the_whole_repo(
        hub: FakeHub, tmp_path: Path) -> None:
    config = _config(tmp_path, _shipped_models(tmp_path))
    out = run_llmux(hub, tmp_path, "pull", "--config", str(config))
    assert out.returncode == 0, out.stderr
    chat, whisper = tmp_path / "models" / "chat", tmp_path / "models" / "whisper"
    repo = hub.repos["acme/Chat-GGUF"].files
    assert (chat / "Chat-Q4_K_M.gguf").read_bytes() == repo["Chat-Q4_K_M.gguf"]
    assert (chat / "mmproj-F16.gguf").read_bytes() == repo["mmproj-F16.gguf"]
    assert not (chat / "Chat-Q8_0.gguf").exists()  # not named in `files`
    whole = hub.repos["acme/whisper"].files
    assert (whisper / "model.safetensors").read_bytes() == whole["model.safetensors"]
    assert (whisper / "config.json").read_bytes() == whole["config.json"]
    assert not (whisper / "original").exists()  # excluded
    assert _rows(out.stdout) == {
        ("chat", "Chat-Q4_K_M.gguf"): "downloaded", ("chat", "mmproj-F16.gguf"): "downloaded",
        ("whisper", "config.json"): "downloaded", ("whisper", "model.safetensors"): "downloaded",
    }
    assert "4 files: 4 downloaded" in out.stdout


def test_second_pull_downloads_nothing_and_reports_present(
        hub: FakeHub, tmp_path: Path) -> None:
    config = _config(tmp_path, _shipped_models(tmp_path))
    assert run_llmux(hub, tmp_path, "pull", "--config", str(config)).returncode == 0
    gets = sum(hub.gets.values())
    again = run_llmux(hub, tmp_path, "pull", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert sum(hub.gets.values()) == gets == 4
    assert set(_rows(again.stdout).values()) == {"present"}
    assert "4 files: 4 present" in again.stdout


def test_pull_of_one_model_by_its_virtual_name_fetches_only_that_model(
        hub: FakeHub, tmp_path: Path) -> None:
    models = _shipped_models(tmp_path)
    path = tmp_path / "llmux.yaml"
    path.write_text(yaml.safe_dump({"physical_models": models,
                                    "virtual_models": {"Whisper": {"physical": "whisper"}}}))
    out = run_llmux(hub, tmp_path, "pull", "Whisper", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert {model for model, _ in _rows(out.stdout)} == {"whisper"}
    assert not (tmp_path / "models" / "chat").exists()


def test_unknown_model_name_is_refused_before_anything_happens(
        hub: FakeHub, tmp_path: Path) -> None:
    config = _config(tmp_path, _shipped_models(tmp_path))
    out = run_llmux(hub, tmp_path, "pull", "nope", "--config", str(config))
    assert out.returncode == 2
    assert "llmux pull: unknown model 'nope' (physical models: chat, whisper)" in out.stderr
    assert not hub.gets


def test_a_connection_dropped_mid_file_is_resumed_with_a_range_request(
        hub: FakeHub, tmp_path: Path) -> None:
    hub.drop_once["acme/Big-GGUF/Big.gguf"] = BIG - 2**20
    model = _model(f"{tmp_path}/models/big/Big.gguf", repo="acme/Big-GGUF", files=["Big.gguf"])
    out = run_llmux(hub, tmp_path, "pull", "--config", str(_config(tmp_path, {"big": model})))
    assert out.returncode == 0, out.stderr
    path = tmp_path / "models" / "big" / "Big.gguf"
    assert path.read_bytes() == hub.repos["acme/Big-GGUF"].files["Big.gguf"]
    assert hub.gets["acme/Big-GGUF/Big.gguf"] == 2
    # the second request asks only for what had not been written yet
    assert hub.ranges == [f"acme/Big-GGUF/Big.gguf bytes={DOWNLOAD_CHUNK_SIZE}-"]
    assert "Trying to resume download" in out.stderr


@pytest.mark.parametrize(("token", "says"), [
    (None, "no Hugging Face token is set: accept its license at {url}/acme/gated-asr, "
           "then set HF_TOKEN (or run `hf auth login`)"),
    ("hf_not_granted", "your token has no access: accept its license at "
                       "{url}/acme/gated-asr with the account of the token in HF_TOKEN"),
])
def test_gated_repo_says_what_to_do_and_fails(
        hub: FakeHub, tmp_path: Path, token: str | None, says: str) -> None:
    models = {"asr": _model(f"{tmp_path}/models/asr", repo="acme/gated-asr"),
              **_shipped_models(tmp_path)}
    out = run_llmux(hub, tmp_path, "pull", "--config", str(_config(tmp_path, models)),
                    token=token)
    assert out.returncode == 1
    message = f"llmux pull: asr: acme/gated-asr is gated and {says}"
    assert message.format(url=hub.url) in out.stderr
    assert _rows(out.stdout)["asr", "model.safetensors"] == "missing"
    assert _rows(out.stdout)["chat", "Chat-Q4_K_M.gguf"] == "downloaded"  # others go on
    assert "hf_not_granted" not in out.stdout + out.stderr
    assert not (tmp_path / "models" / "asr" / "model.safetensors").exists()


def test_too_small_a_disk_is_reported_before_downloading(
        hub: FakeHub, tmp_path: Path) -> None:
    config = _config(tmp_path, _shipped_models(tmp_path))
    out = run_llmux(hub, tmp_path, "pull", "--config", str(config), "--reserve", "999TB")
    assert out.returncode == 1
    assert not hub.gets
    assert set(_rows(out.stdout).values()) == {"too big for the disk"}
    assert "llmux pull: not enough disk space, not downloading: chat needs 360.0 KB" in out.stderr


def test_a_file_the_repo_lacks_and_a_repo_the_hub_lacks_are_missing(
        hub: FakeHub, tmp_path: Path) -> None:
    models = {"x": _model(f"{tmp_path}/m/x.gguf", repo="acme/Chat-GGUF", files=["x.gguf"]),
              "y": _model(f"{tmp_path}/m/y", repo="acme/nope")}
    out = run_llmux(hub, tmp_path, "pull", "--config", str(_config(tmp_path, models)))
    assert out.returncode == 1
    assert _rows(out.stdout) == {("x", "x.gguf"): "missing", ("y", "*"): "missing"}
    assert "no such file in acme/Chat-GGUF" in out.stdout
    assert (f"llmux pull: y: acme/nope: no such repository on {hub.url}, or a private one "
            "(set HF_TOKEN if it is yours)") in out.stderr


def test_a_gated_repo_is_asked_once_and_every_file_of_it_is_missing(
        hub: FakeHub, tmp_path: Path) -> None:
    """Refused once (401 without a token, 403 with one), its other files are not asked
    for: one message, each file missing."""
    hub.repos["acme/gated-two"] = FakeRepo({"a.bin": b"a" * 10, "b.bin": b"b" * 10},
                                           gated=True)
    config = _config(tmp_path, {"two": _model(f"{tmp_path}/models/two", repo="acme/gated-two")})
    for token in (None, "hf_not_granted"):
        out = run_llmux(hub, tmp_path, "pull", "--config", str(config), token=token)
        assert out.returncode == 1
        assert out.stderr.count("llmux pull: two: acme/gated-two is gated") == 1, out.stderr
        assert _rows(out.stdout) == {("two", "a.bin"): "missing", ("two", "b.bin"): "missing"}


def test_an_unknown_repo_with_a_token_says_the_token_cannot_read_it(
        hub: FakeHub, tmp_path: Path) -> None:
    config = _config(tmp_path, {"y": _model(f"{tmp_path}/m/y", repo="acme/nope")})
    out = run_llmux(hub, tmp_path, "pull", "--config", str(config), token="hf_someone")
    assert out.returncode == 1
    assert (f"llmux pull: y: acme/nope: no such repository on {hub.url}, or a private one "
            "(your token cannot read it)") in out.stderr
    assert "hf_someone" not in out.stdout + out.stderr


def test_a_revision_the_repo_lacks_is_named(hub: FakeHub, tmp_path: Path) -> None:
    config = _config(tmp_path, {"w": _model(f"{tmp_path}/m/w", repo="acme/whisper",
                                            revision="v9")})
    out = run_llmux(hub, tmp_path, "pull", "--config", str(config))
    assert out.returncode == 1
    assert "llmux pull: w: acme/whisper has no revision 'v9'" in out.stderr
    assert _rows(out.stdout) == {("w", "*"): "missing"}
    assert not hub.gets


def test_a_file_changed_upstream_is_downloaded_again(hub: FakeHub, tmp_path: Path) -> None:
    """Same size, new content: the etag huggingface_hub recorded tells them apart."""
    model = _model(f"{tmp_path}/models/w", repo="acme/whisper", files=["config.json"])
    config = _config(tmp_path, {"w": model})
    assert run_llmux(hub, tmp_path, "pull", "--config", str(config)).returncode == 0
    pushed = hub.repos["acme/whisper"]
    pushed.files["config.json"], pushed.commit = b'{"a": 2}', "f" * 40
    again = run_llmux(hub, tmp_path, "pull", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert _rows(again.stdout) == {("w", "config.json"): "downloaded"}
    assert (tmp_path / "models" / "w" / "config.json").read_bytes() == b'{"a": 2}'
    assert hub.gets["acme/whisper/config.json"] == 2


def test_models_without_a_source_are_left_alone(hub: FakeHub, tmp_path: Path) -> None:
    """Pulled by default: only the models with a source; none has one: nothing to do,
    and no failure; one named that has none: refused."""
    local = {"type": "llm", "backend": "fake", "estimated_vram": "1GB",
             "model_path": f"{tmp_path}/local.gguf"}
    mixed = _config(tmp_path, {"local": local, **_shipped_models(tmp_path)})
    out = run_llmux(hub, tmp_path, "pull", "--config", str(mixed))
    assert out.returncode == 0, out.stderr
    assert {model for model, _ in _rows(out.stdout)} == {"chat", "whisper"}
    named = run_llmux(hub, tmp_path, "pull", "local", "--config", str(mixed))
    assert named.returncode == 2
    assert "llmux pull: local has no source: in the config: nothing to download" in \
        named.stderr
    alone = run_llmux(hub, tmp_path, "pull", "--config", str(_config(tmp_path,
                                                                     {"local": local})))
    assert alone.returncode == 0, alone.stderr
    assert alone.stderr.strip() == ("llmux pull: no physical model in the config has a "
                                    "source: nothing to do")


# --- llmux check-config ------------------------------------------------------------------


def test_check_config_lists_missing_model_files_and_still_passes(
        hub: FakeHub, tmp_path: Path) -> None:
    present = tmp_path / "here.gguf"
    present.write_bytes(b"GGUF")
    models = {
        "here": {"type": "llm", "backend": "fake", "estimated_vram": 1,
                 "model_path": str(present)},
        "gone": {"type": "vlm", "backend": "fake", "estimated_vram": 1,
                 "model_path": f"{tmp_path}/gone/Chat-Q4_K_M.gguf",
                 "files": {"mmproj": f"{tmp_path}/gone/mmproj-F16.gguf"},
                 "source": {"repo": "acme/Chat-GGUF",
                            "files": ["Chat-Q4_K_M.gguf", "mmproj-F16.gguf"]}},
        "pkg": {"type": "llm", "backend": "fake", "estimated_vram": 1,
                "model_path": "pkg:no_such_package_here/model.gguf"},
    }
    config = _config(tmp_path, models)
    out = run_llmux(hub, tmp_path, "check-config", str(config))
    assert out.returncode == 0, out.stderr
    report = out.stdout.split("Model files on this machine")[1]
    lines = [re.split(r"\s{2,}", line) for line in report.splitlines()[2:]]
    assert lines[1][:4] == ["gone", "model_path", f"{tmp_path}/gone/Chat-Q4_K_M.gguf",
                            "missing"]
    assert lines[2][:4] == ["gone", "mmproj", f"{tmp_path}/gone/mmproj-F16.gguf", "missing"]
    assert lines[3] == ["pkg", "model_path", "pkg:no_such_package_here/model.gguf", "missing",
                        "the Python package 'no_such_package_here' is not installed in the "
                        "worker's interpreter"]
    assert "here.gguf" not in report
    assert f"3 model files missing; `llmux pull --config {config}` downloads" in report


def test_serve_warns_of_each_missing_model_file_at_start(start_server: Any,
                                                         tmp_path: Path) -> None:
    """The operator learns it from the log at start, not from the first request."""
    gone = f"{tmp_path}/gone/Chat-Q4_K_M.gguf"
    models = {"gone": fake_model() | {"model_path": gone, "source": {
                  "repo": "acme/Chat-GGUF", "files": ["Chat-Q4_K_M.gguf"]}},
              "pkg": fake_model() | {"model_path": "pkg:no_such_package_here/model.gguf"},
              "here": fake_model()}
    server = start_server(fake_config(**models))
    warnings = [line.split(" WARNING llmux: ", 1)[1] for line in server.logs().splitlines()
                if " WARNING llmux: model " in line]
    assert warnings == [
        f"model gone: its model_path {gone} is missing (no such file or directory), so it "
        f"cannot load; `llmux pull gone --config {server.config_path}` fetches it",
        "model pkg: its model_path pkg:no_such_package_here/model.gguf is missing (the "
        "Python package 'no_such_package_here' is not installed in the worker's "
        "interpreter), so it cannot load"]


def test_a_model_with_missing_files_says_which_and_how_to_pull_them(tmp_path: Path) -> None:
    """What the model actor answers instead of asking for memory for a load that would
    fail (the live test is in tests/faults/test_load_failures.py)."""
    from llmux.config import load_config
    from llmux.model_files import cannot_load

    (tmp_path / "here.gguf").write_bytes(b"GGUF")
    models = {
        "here": fake_model() | {"model_path": f"{tmp_path}/here.gguf"},
        "gone": fake_model() | {"model_path": f"{tmp_path}/gone.gguf",
                                "files": {"mmproj": f"{tmp_path}/mmproj.gguf"},
                                "source": {"repo": "acme/Chat-GGUF"}},
        "half": fake_model() | {"model_path": f"{tmp_path}/here.gguf",
                                "files": {"mmproj": f"{tmp_path}/mmproj.gguf"}},
    }
    path = _config(tmp_path, models)
    config = load_config(path)
    why = {name: cannot_load(model, config) for name, model in config.physical_models.items()}
    assert why == {
        "here": None,
        "gone": f"gone cannot load: its model_path {tmp_path}/gone.gguf is missing (no such "
                f"file or directory); its mmproj {tmp_path}/mmproj.gguf is missing (no such "
                f"file or directory); `llmux pull gone --config {path}` fetches them",
        "half": f"half cannot load: its mmproj {tmp_path}/mmproj.gguf is missing (no such "
                "file or directory)",
    }


def test_a_path_that_cannot_be_looked_at_is_named_not_raised(tmp_path: Path) -> None:
    """A name too long, no permission, a stale mount: the model cannot load, and says
    why (the exception once ended the look, and a request's look the whole server); a
    package path may name a subpackage, found without importing anything."""
    from llmux.config import load_config
    from llmux.model_files import cannot_load

    long_name = f"{tmp_path}/{'x' * 300}.gguf"
    models = {
        "long": fake_model() | {"model_path": long_name},
        "dotted": fake_model() | {"model_path": "pkg:nosuchpkg.sub/model.gguf"},
        "sub": fake_model() | {"model_path": "pkg:llmux.backends/fake.py"},
    }
    config = load_config(_config(tmp_path, models))
    why = {name: cannot_load(model, config) for name, model in config.physical_models.items()}
    assert why == {
        "long": f"long cannot load: its model_path {long_name} is missing (cannot be looked "
                "at: File name too long)",
        "dotted": "dotted cannot load: its model_path pkg:nosuchpkg.sub/model.gguf is missing "
                  "(the Python package 'nosuchpkg.sub' is not installed in the worker's "
                  "interpreter)",
        "sub": None,
    }


def test_serve_starts_though_the_look_for_model_files_hangs(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A network filesystem that does not answer delays the start by the bound only."""
    from llmux import cli
    from llmux.config import parse_config

    released = threading.Event()
    monkeypatch.setattr(cli, "missing_files", lambda config: released.wait(30) and [])
    with caplog.at_level("WARNING", logger="llmux"):
        cli.warn_of_missing_files(parse_config(fake_config(m=fake_model())), within_s=0.2)
    released.set()
    assert [r.getMessage() for r in caplog.records] == [
        "the model files were not all found within 0.2 s (a filesystem that does not "
        "answer?): starting anyway; a model whose files cannot be read will fail its load"]


def test_check_config_of_the_embedded_default_finds_its_packaged_models() -> None:
    out = subprocess.run([sys.executable, "-m", "llmux.cli", "check-config",
                          str(ROOT / "config" / "llmux.yaml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("Model files on this machine\n"
                                        "===========================\nnone missing")


# --- the planner (pure) ------------------------------------------------------------------


def _physical(model_path: str | None, **source: Any) -> tuple[PhysicalModel, Source]:
    src = Source(**source)
    return PhysicalModel(id="m", type="llm", backend="fake", estimated_vram=1,
                         model_path=model_path, source=src), src


@pytest.mark.parametrize(("model_path", "source", "expected"), [
    ("/models/q/Q-Q8_0.gguf", {"files": ["Q-Q8_0.gguf", "mmproj.gguf"]}, "/models/q"),
    ("/models/q/sub/Q.gguf", {"files": ["sub/Q.gguf"]}, "/models/q"),
    ("/models/q/Q-Q4_K_M.gguf", {"files": ["*Q4_K_M.gguf"]}, "/models/q"),  # not q/Q-...gguf/
    ("/models/q/sub/Q-Q4_K_M.gguf", {"files": ["sub/*.gguf"]}, "/models/q"),
    ("/models/whisper", {}, "/models/whisper"),
    ("/models/whisper/", {"files": ["*.json"]}, "/models/whisper"),
    ("/models/q/Q.gguf", {"files": ["Q.gguf"], "local_dir": "/elsewhere"}, "/elsewhere"),
    (None, {"local_dir": "/elsewhere"}, "/elsewhere"),
])
def test_download_dir_is_where_model_path_says(
        model_path: str | None, source: dict[str, Any], expected: str) -> None:
    assert download_dir(*_physical(model_path, repo="o/r", **source)) == expected


def test_select_files_takes_names_and_patterns_minus_excludes_and_reports_unmatched() -> None:
    names = ["a.gguf", "b.gguf", "mmproj-F16.gguf", "original/x.bin", "README.md"]
    source = Source(repo="o/r", files=["*.gguf", "c.gguf"], exclude=["b.*"])
    assert select_files(source, names) == (["a.gguf", "mmproj-F16.gguf"], ["c.gguf"])
    whole = Source(repo="o/r", exclude=["original/*"])
    assert select_files(whole, names) == (["a.gguf", "b.gguf", "mmproj-F16.gguf",
                                           "README.md"], [])


def _listing(model: str, *files: tuple[str, int], fs: str = "disk",
             local: dict[str, LocalFile] | None = None) -> Listing:
    return Listing(model=model, repo=f"o/{model}", local_dir=f"/m/{model}", filesystem=fs,
                   commit=COMMIT, files=tuple(RemoteFile(n, s, f"etag-{n}") for n, s in files),
                   local=local or {})


def _statuses(rows: Any) -> dict[tuple[str, str], Status]:
    return {(r.model, r.file): r.status for r in rows}


def test_a_file_counts_as_present_by_size_and_recorded_etag() -> None:
    listing = _listing("m", ("same", 10), ("unrecorded", 10), ("changed", 10), ("short", 10),
                       ("new", 10), local={"same": LocalFile(10, "etag-same"),
                                           "unrecorded": LocalFile(10, None),
                                           "changed": LocalFile(10, "old"),
                                           "short": LocalFile(4, "etag-short")})
    rows = plan([listing], {"disk": 1000})
    assert _statuses(rows) == {
        ("m", "same"): Status.PRESENT, ("m", "unrecorded"): Status.PRESENT,
        ("m", "changed"): Status.DOWNLOAD, ("m", "short"): Status.DOWNLOAD,
        ("m", "new"): Status.DOWNLOAD,
    }
    assert [r.detail for r in rows if r.status is Status.DOWNLOAD] == [
        "changed upstream", "local copy has 4 B of 10 B", "new"]


def test_a_model_that_does_not_fit_is_skipped_whole_and_a_smaller_one_after_it_still_fits(
        ) -> None:
    big = _listing("big", ("a", 600), ("b", 600))
    small = _listing("small", ("c", 300))
    rows = plan([big, small], {"disk": 1000})
    assert _statuses(rows) == {("big", "a"): Status.NO_SPACE, ("big", "b"): Status.NO_SPACE,
                               ("small", "c"): Status.DOWNLOAD}
    assert rows[0].detail == "big needs 1.2 KB, 1.0 KB free for it"
    assert exit_code(rows) == 1


def test_earlier_downloads_and_the_reserve_use_up_the_free_space() -> None:
    first, second = _listing("first", ("a", 500)), _listing("second", ("b", 500))
    assert _statuses(plan([first, second], {"disk": 1000})) == {
        ("first", "a"): Status.DOWNLOAD, ("second", "b"): Status.DOWNLOAD}
    assert _statuses(plan([first, second], {"disk": 1000}, reserve_bytes=1)) == {
        ("first", "a"): Status.DOWNLOAD, ("second", "b"): Status.NO_SPACE}


def test_each_filesystem_has_its_own_budget() -> None:
    one, two = _listing("one", ("a", 800), fs="sda"), _listing("two", ("b", 800), fs="sdb")
    assert _statuses(plan([one, two], {"sda": 1000, "sdb": 1000})) == {
        ("one", "a"): Status.DOWNLOAD, ("two", "b"): Status.DOWNLOAD}


def test_present_files_need_no_space() -> None:
    listing = _listing("m", ("a", 5000), local={"a": LocalFile(5000, "etag-a")})
    rows = plan([listing], {"disk": 0})
    assert _statuses(rows) == {("m", "a"): Status.PRESENT}
    assert exit_code(rows) == 0


def test_an_unlistable_repo_and_an_absent_file_are_missing() -> None:
    gated = Listing(model="g", repo="o/g", local_dir="/m/g", filesystem="disk",
                    error="o/g is gated")
    absent = attrs.evolve(_listing("a", ("x", 1)), absent=("y.gguf",))
    rows = plan([gated, absent], {"disk": 100})
    assert [(r.model, r.file, r.status, r.detail) for r in rows] == [
        ("g", "*", Status.MISSING, "o/g is gated"),
        ("a", "x", Status.DOWNLOAD, "new"),
        ("a", "y.gguf", Status.MISSING, "no such file in o/a"),
    ]
    assert exit_code(rows) == 1
    assert render_rows(rows).endswith("3 files: 1 to download, 2 missing")


def test_a_file_the_hub_gives_no_etag_for_is_present_by_its_size() -> None:
    listing = attrs.evolve(_listing("m"), files=(RemoteFile("a", 10, None),),
                           local={"a": LocalFile(10, "recorded")})
    assert _statuses(plan([listing], {"disk": 0})) == {("m", "a"): Status.PRESENT}


def test_a_reserve_bigger_than_the_disk_leaves_nothing_not_less() -> None:
    rows = plan([_listing("m", ("a", 10))], {"disk": 100}, reserve_bytes=1000)
    assert rows[0].status is Status.NO_SPACE
    assert rows[0].detail == "m needs 10 B, 0 B free for it"


def test_a_summary_of_no_files_says_there_is_nothing_to_do() -> None:
    assert render_rows([]).endswith("\n0 files: nothing to do")


# --- config: source ----------------------------------------------------------------------


def test_source_problems_are_reported_by_path() -> None:
    bad = {
        "a": {"type": "llm", "backend": "fake", "estimated_vram": 1, "model_path": "/m/a",
              "source": {"repo": "not a repo", "revision": "", "files": ["../up", "ok"],
                         "exclude": ["/abs"]}},
        "b": {"type": "llm", "backend": "fake", "estimated_vram": 1,
              "source": {"repo": "o/b"}},
        "c": {"type": "llm", "backend": "fake", "estimated_vram": 1,
              "model_path": "pkg:some_pkg/x.gguf", "source": {"repo": "o/c"}},
        "d": {"type": "llm", "backend": "fake", "estimated_vram": 1, "model_path": "/m/d",
              "source": {"repo": "o/d", "branch": "main"}},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config({"physical_models": bad, "virtual_models": {}})
    assert caught.value.problems == [
        'physical_models.a.source.repo: "not a repo" is not a Hugging Face repo id '
        '(like "Qwen/Qwen3-8B-GGUF")',
        "physical_models.a.source.revision: must not be empty",
        'physical_models.a.source.files[0]: "../up" is not a path inside the repo',
        'physical_models.a.source.exclude[0]: "/abs" is not a path inside the repo',
        "physical_models.b.source: needs model_path or source.local_dir: where to download to",
        "physical_models.c.source: a pkg: model ships in a Python package: there is nothing "
        "to download",
        "physical_models.d.source.branch: unknown key",
    ]


@pytest.mark.parametrize("name", ["p40.yaml", "kischdle-5070ti.yaml"])
def test_shipped_gpu_configs_name_sources_for_their_hub_models(name: str) -> None:
    from llmux.config import load_config

    config = load_config(ROOT / "config" / name)
    sourced = {m.id for m in config.physical_models.values() if m.source is not None}
    assert len(sourced) >= 4
    for model in config.physical_models.values():
        if model.source is not None:
            assert download_dir(model, model.source).startswith("/models/")
