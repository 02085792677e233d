"""llama.cpp (through llama-cpp-python) for GGUF models: ``chat`` and ``complete``,
or ``embed`` when loaded with ``embedding: true``.

``model_path`` is the ``.gguf`` file. The ops are dispatched, chat prompts rendered and
replies parsed by the code the two GGUF backends share (gguf.py); this module runs the
generation loop in Python, token by token. Chat prompts come from the GGUF's own Jinja
chat template (``render_chat``), not from llama-cpp-python's chat handlers, so
``tools``, ``reasoning_effort`` and ``chat_template_kwargs`` (``enable_thinking``) reach
the template exactly as the model's authors wrote it. Options, all optional:

    n_ctx         context length in tokens (4096); prompt + answer must fit
    n_gpu_layers  layers on the GPU: -1 (the default on cuda) all, 0 (the only value on cpu)
    n_batch       prompt-processing batch size (512)
    n_threads     generation threads (default: the cores less one, ``default_threads``)
    flash_attn    flash attention: true, false or "auto" (the default): on for "cpu",
                  whose backend has it for every model, off on "cuda" (llama-cpp-python
                  cannot ask llama.cpp for its own "auto", which checks the GPU)
    type_k        KV cache type of K: "f16" (default), "q8_0", "q4_0", ... (KV_CACHE_TYPES)
    type_v        same for V; a quantised V cache needs ``flash_attn: true``
    chat_template a Jinja template replacing the GGUF's own
    reasoning_format  "auto" (from the template), "none", "think" or "harmony": how
                  reasoning is told from the answer (llmux/chat/output.py)
    tool_format   "auto" (from the template), "none", "hermes" or "harmony"
    embedding     load for the ``embed`` op only (false)
    pooling       embedding models: "mean", "cls", "last" or "none" (the GGUF's choice)
    verbose       llama.cpp's info and debug log lines too (false: its warnings and
                  errors only, as records of the ``llama.cpp`` logger)
    mmproj        (or ``files: {mmproj: ...}``) the vision projector GGUF: chat messages
                  may then hold images (llama_vision.py); it runs on the model's device

The reply is parsed for reasoning and tool calls by the model's format; a request that
demands a tool call (``tool_choice`` "required" or a named function) of a Hermes-format
model is held to it by a grammar. The ``template`` op returns the rendered prompt.

Sampling defaults, where a request leaves a parameter out: the GGUF's recommended
``general.sampling.*`` values if it has them, else llama.cpp's (temperature 0.8, top_p
0.95, min_p 0.05, top_k 40). Without ``max_tokens`` a reply may fill the context.
"""

from __future__ import annotations

import codecs
import ctypes
import gc
import json
import logging
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final

import llama_cpp  # type: ignore[import-untyped,unused-ignore]
from llama_cpp import llama_grammar  # type: ignore[import-untyped,unused-ignore]

from llmux.backends.base import (
    InvalidInput,
    ProgressFn,
    Stream,
    auto_bool_option,
    bool_option,
    default_threads,
    int_option,
    parse_device,
)
from llmux.backends.gguf import (
    GgufBackend,
    max_tokens,
    mean_vector,
    stop_strings,
    token_bias,
)
from llmux.backends.llama_log import install as install_llama_log
from llmux.backends.llama_vision import MARKER, Projector, bos_prefix
from llmux.chat.output import output_formats
from llmux.chat.render import FALLBACK_TEMPLATE, model_template, render_chat
from llmux.chat.stops import StopText
from llmux.chat.templates import template_messages

__all__ = ["FALLBACK_TEMPLATE", "KV_CACHE_TYPES", "POOLING", "LlamaCppBackend",
           "render_chat", "template_messages"]

log = logging.getLogger(__name__)


KV_CACHE_TYPES: Final[Mapping[str, int]] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
    "iq4_nl": 20, "bf16": 30,
}
"""KV cache type names to GGML type numbers (``enum ggml_type``)."""

POOLING: Final[Mapping[str, int]] = {"none": 0, "mean": 1, "cls": 2, "last": 3}
# (payload key, Llama.generate argument, GGUF metadata key, llama.cpp's default)
_SAMPLING: Final = (
    ("temperature", "temp", "general.sampling.temp", 0.8),
    ("top_p", "top_p", "general.sampling.top_p", 0.95),
    ("min_p", "min_p", "general.sampling.min_p", 0.05),
    ("top_k", "top_k", "general.sampling.top_k", 40),
    ("repetition_penalty", "repeat_penalty", "general.sampling.penalty_repeat", 1.0),
    ("presence_penalty", "presence_penalty", None, 0.0),
    ("frequency_penalty", "frequency_penalty", None, 0.0),
)


# -- options ----------------------------------------------------------------------------


def _gpu_index(device: str) -> int | None:
    """None for "cpu", N for "cuda:N". Raises ValueError for anything else."""
    kind, index = parse_device(device)
    return index if kind == "cuda" else None


def _kv_type(options: Mapping[str, Any], key: str) -> int | None:
    name = options.get(key)
    return None if name is None else KV_CACHE_TYPES[str(name).lower()]


def llama_arguments(options: Mapping[str, Any], device: str) -> dict[str, Any]:
    """Keyword arguments of ``llama_cpp.Llama`` from the options and the device.

    On "cuda:N" the whole model goes to GPU N (no split across GPUs); on "cpu" nothing
    is offloaded, not even prompt processing, so a CUDA build leaves the GPU alone.

    The options were checked with the config (options.py); the device is "cpu" or
    "cuda:N".
    """
    gpu = _gpu_index(device)
    layers = int_option(options, "n_gpu_layers", -1 if gpu is not None else 0, -1)
    flash_attn = auto_bool_option(options, "flash_attn")
    if flash_attn is None:
        flash_attn = gpu is None  # on for the CPU: options.py's rule for type_v knows it
    pooling = options.get("pooling")
    arguments: dict[str, Any] = {
        "n_ctx": int_option(options, "n_ctx", 4096, 16),
        "n_batch": int_option(options, "n_batch", 512, 1),
        "n_threads": int_option(options, "n_threads", default_threads(), 1),
        "n_gpu_layers": layers,
        "flash_attn": flash_attn,
        "type_k": _kv_type(options, "type_k"),
        "type_v": _kv_type(options, "type_v"),
        "embedding": bool_option(options, "embedding"),
        "verbose": bool_option(options, "verbose"),
    }
    if pooling is not None:
        arguments["pooling_type"] = POOLING[pooling]
    if gpu is None:
        arguments.update(offload_kqv=False, op_offload=False)
    else:
        arguments.update(split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE, main_gpu=gpu)
    return arguments


# -- the backend ------------------------------------------------------------------------


class LlamaCppBackend(GgufBackend):
    """One GGUF model in llama.cpp, generating on the worker's main thread."""

    backend_name = "llama_cpp"

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.arguments = llama_arguments(self.options, self.device)
        self._llm: Any = None
        self._llama_log = install_llama_log(bool(self.arguments["verbose"]))
        self._projector: Projector | None = None
        self._defaults: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        """Raises FileNotFoundError (no such file) or ValueError (not a loadable GGUF,
        no context for these options, no GPU support), naming the file."""
        path = self._model_path()
        if self.arguments["n_gpu_layers"] and not llama_cpp.llama_supports_gpu_offload():
            raise ValueError(f"{path}: device {self.device} asks for the GPU, but this "
                             "llama-cpp-python build has no GPU support")
        progress(0.0, f"loading {path.name}")
        with self._llama_log.explaining(f"{path}: llama.cpp could not load it", ValueError):
            llm = llama_cpp.Llama(str(path), **self.arguments)
        self._llm = llm
        mmproj = self._mmproj_path()
        if mmproj is not None:
            progress(0.8, "loading the vision projector")
            self._projector = Projector(llm, mmproj,
                                        use_gpu=self.arguments["n_gpu_layers"] != 0,
                                        n_threads=self.arguments["n_threads"])
            self._marker = MARKER
        # NOTE: llama.cpp may round the context up (64 -> 256), but llama-cpp-python
        # sizes its token buffer by the n_ctx asked for: that is the real limit.
        self._context = min(llm.n_ctx(), self.arguments["n_ctx"])
        progress(0.9, "loaded; preparing the chat template")
        self._bos = self._token_text(llm.token_bos())
        self._eos = self._token_text(llm.token_eos())
        self._template = model_template(
            self.options.get("chat_template") or llm.metadata.get("tokenizer.chat_template"),
            path)
        self._defaults = self._sampling_defaults(llm.metadata)
        self._formats = output_formats(self._template, self.options)
        progress(1.0, "loaded")
        if self.arguments["embedding"]:
            return {"context_length": self._context, "embedding_dim": llm.n_embd()}
        return {"context_length": self._context}

    def unload(self) -> None:
        if self._projector is not None:
            self._projector.close()
            self._projector = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        gc.collect()

    # -- inference ---------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self._llm is not None

    def _prompt_tokens(self, prompt: str) -> int:
        return len(self._tokens(prompt))

    def _tokens(self, prompt: str) -> list[int]:
        tokens: list[int] = self._llm.tokenize(prompt.encode(), add_bos=False, special=True)
        return [*bos_prefix(self._llm, tokens[0] if tokens else None), *tokens]

    def _complete(self, prompt: str, images: Sequence[bytes], payload: Mapping[str, Any],
                  cancelled: threading.Event, *, tool_grammar: str | None = None,
                  harmony: bool = False) -> Stream:
        """Tokens of ``prompt`` (its images evaluated into the context by the projector)
        and their generation."""
        grammar = None
        if tool_grammar is not None:
            grammar = llama_grammar.LlamaGrammar.from_string(tool_grammar, verbose=False)
        if images:
            assert self._projector is not None
            tokens = self._projector.evaluate(prompt, images)
        else:
            tokens = self._tokens(prompt)
        return self._generate(tokens, payload, cancelled, grammar=grammar, special=harmony)

    def _generate(self, tokens: list[int], payload: Mapping[str, Any],
                  cancelled: threading.Event, *, grammar: Any = None,
                  special: bool = False) -> Stream:
        """Stream the completion of ``tokens``, token by token; cancel is checked after
        every token and ends the stream there. ``special``: control tokens come out as
        text (a format parser needs them); end-of-generation tokens never do."""
        context = self._context
        if not tokens:
            raise InvalidInput("The prompt is empty.")
        if len(tokens) >= context:
            raise InvalidInput.context_exceeded(len(tokens), context)
        arguments, budget, stops, seed = self._sampling(payload, room=context - len(tokens))
        if grammar is None:
            grammar = self._grammar(payload.get("response_format"))
        llm = self._llm
        llm.set_seed(seed if seed is not None else random.getrandbits(32))
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop_text = StopText(stops)
        generated, finish = 0, "length"
        tokens_out = llm.generate(tokens, grammar=grammar, **arguments)
        # NOTE: the prompt's evaluation, before the first token, also stops on cancel
        # (a long prompt takes seconds); after it, cancel is checked at each token, so
        # the callback, which costs a call into Python at each step of llama.cpp's
        # graph, is gone.
        abort = llama_cpp.ggml_abort_callback(lambda _data: cancelled.is_set())
        llama_cpp.llama_set_abort_callback(llm.ctx, abort, None)
        try:
            with self._llama_log.explaining("llama.cpp could not generate"):
                for token in tokens_out:
                    if not generated:
                        llama_cpp.llama_set_abort_callback(llm.ctx, NO_ABORT, None)
                    if cancelled.is_set():
                        break
                    generated += 1
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        finish = "stop"
                        break
                    text = stop_text.feed(decoder.decode(token_bytes(vocab, token, special)))
                    if text:
                        yield {"text": text}
                    if stop_text.hit:
                        finish = "stop"
                        break
                    if generated >= budget:
                        break
        except RuntimeError:
            if not cancelled.is_set():
                raise  # not llama_decode's "aborted"
        finally:
            llama_cpp.llama_set_abort_callback(llm.ctx, NO_ABORT, None)
            tokens_out.close()
        if cancelled.is_set():
            finish = "cancelled"
        else:
            # NOTE: not the decoder's final flush: bytes still held there are a character
            # cut short (an emoji at max_tokens), which it would write as U+FFFD.
            tail = stop_text.flush()
            if tail:
                yield {"text": tail}
        usage = {"prompt_tokens": len(tokens), "completion_tokens": generated,
                 "total_tokens": len(tokens) + generated}
        return {"finish_reason": finish, "usage": usage}

    def _sampling(self, payload: Mapping[str, Any], *, room: int
                  ) -> tuple[dict[str, Any], int, list[str], int | None]:
        """``Llama.generate``'s sampling arguments, the token budget, the stop strings
        and the seed of a request whose reply has ``room`` tokens left in the context.

        Raises:
            InvalidInput: a bad max_tokens or logit_bias.
        """
        arguments: dict[str, Any] = {}
        for key, argument, _, _ in _SAMPLING:
            value = payload.get(key)
            arguments[argument] = self._defaults[argument] if value is None else value
        budget = max_tokens(payload)
        if payload.get("logit_bias"):
            bias = token_bias(payload["logit_bias"], self._llm.n_vocab())

            def biased(input_ids: Any, scores: Any) -> Any:
                for token, value in bias.items():
                    scores[token] += value
                return scores

            arguments["logits_processor"] = llama_cpp.LogitsProcessorList([biased])
        return (arguments, room if budget is None else min(budget, room),
                stop_strings(payload), payload.get("seed"))

    def _grammar(self, response_format: Mapping[str, Any] | None) -> Any:
        """A grammar constraining the reply to JSON, or to a JSON schema; None for text."""
        kind = (response_format or {}).get("type", "text")
        if kind == "json_object":
            return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF,
                                                          verbose=False)
        if kind != "json_schema":
            return None
        schema = ((response_format or {}).get("json_schema") or {}).get("schema") or {}
        try:
            return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema),
                                                               verbose=False)
        except Exception as exc:  # the converter raises bare Exceptions
            raise InvalidInput(f"response_format's JSON schema cannot be followed: {exc}",
                               param="response_format") from exc

    def _embed(self, texts: list[str]) -> tuple[Sequence[Sequence[float]], int]:
        for index, text in enumerate(texts):
            # NOTE: llama.cpp fails on a text of no tokens, and may then crash on exit.
            if not self._llm.tokenize(text.encode(), add_bos=True):
                raise InvalidInput(f"Input {index} has no tokens to embed.")
        with self._llama_log.explaining("llama.cpp could not embed"):
            if self._llm.pooling_type() != llama_cpp.LLAMA_POOLING_TYPE_NONE:
                vectors, count = self._llm.embed(texts, truncate=True, return_count=True)
                return vectors, count
            # NOTE: without pooling, llama-cpp-python 0.3.36 reads the per-token vectors of
            # a batch of several texts from the wrong offsets: embed one at a time, and
            # average the tokens.
            means, total = [], 0
            for text in texts:
                rows, tokens = self._llm.embed(text, truncate=True, return_count=True)
                means.append(mean_vector(rows))
                total += tokens
            return means, total

    # -- helpers -----------------------------------------------------------------------

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        return token_bytes(vocab, token, True).decode("utf-8", errors="replace")

    @staticmethod
    def _sampling_defaults(metadata: Mapping[str, str]) -> dict[str, Any]:
        """The GGUF's recommended sampling (``general.sampling.*``) over llama.cpp's."""
        defaults: dict[str, Any] = {}
        for _, argument, key, fallback in _SAMPLING:
            value: Any = fallback
            if key is not None and key in metadata:
                try:
                    value = type(fallback)(float(metadata[key]))
                except ValueError:
                    log.warning("ignoring %s = %r: not a number", key, metadata[key])
            defaults[argument] = value
        return defaults


NO_ABORT: Final = llama_cpp.ggml_abort_callback()  # a NULL callback: llama.cpp runs on


def token_bytes(vocab: Any, token: int, special: bool, size: int = 64) -> bytes:
    """A token's text, as bytes.

    NOTE: not ``Llama.detokenize``: its 32-byte buffer turns a longer piece (a newline
    and 32 spaces of indented code, a row of dashes) into nothing, without an error.
    llama.cpp answers a short buffer with the size it needs, as a negative count.
    """
    buffer = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, special)
    if n < 0:
        return token_bytes(vocab, token, special, -n)
    return ctypes.string_at(buffer, n)
