"""Causal language models through transformers: the ``chat`` and ``complete`` ops.

``generate()`` runs in a thread and hands text to this one through a streamer that
detokenises incrementally (a chunk is what one token adds to the text). Once the request
is cancelled, a stop string is seen in the answer, or the consumer of the stream goes
away, the generation ends at the model's next layer, even within the prompt's prefill;
the thread is always joined before the stream returns.

Sampling: no ``temperature`` (or 0) decodes greedily; otherwise ``temperature``,
``top_p``, ``top_k``, ``min_p`` sample. ``repetition_penalty`` and ``seed`` apply either
way; ``logit_bias`` becomes ``sequence_bias``; ``stop`` strings end the answer and are
not part of it. ``presence_penalty`` and ``frequency_penalty`` apply as OpenAI defines
them, over the answer's tokens. ``response_format`` ``json_object`` and ``json_schema``
hold the answer to JSON (to the schema) by constrained decoding, and it ends when the
JSON does (hf_logits); a tokenizer llguidance cannot read (WordPiece) refuses them. The
tools go to the chat template, and the model's tool calls come back as it writes them,
as text; a Hermes-format model that must call a tool starts its answer with the call
(``tool_prefill``), which then wins over ``response_format``, as in llama_cpp.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from llmux.backends.base import InvalidInput, ProgressFn, answer
from llmux.backends.hf_common import (
    Checkpoint,
    LoadSettings,
    Stream,
    TokenStreamer,
    release,
    token_ids,
)
from llmux.backends.hf_logits import (
    JsonConstraint,
    guidance_tokenizer,
    penalties,
    response_grammar,
)
from llmux.chat.output import output_formats, output_parser, parsed
from llmux.chat.render import template_kwargs
from llmux.chat.stops import StopText
from llmux.chat.tagged import json_answer, open_thought_closed
from llmux.chat.templates import template_messages

__all__ = ["CausalLM", "StopText", "render_prompt", "sampling_kwargs"]


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                  tools: Sequence[Mapping[str, Any]] | None,
                  kwargs: Mapping[str, Any]) -> str:
    """The prompt text the chat template makes of ``messages``, ending with the
    assistant's turn; ``tools`` and ``kwargs`` (``enable_thinking``, ...) go to the
    template. Pure apart from the tokenizer's template.

    Raises:
        InvalidInput: no messages, non-text parts, or the tokenizer has no template.
    """
    if not messages:
        raise InvalidInput("messages is empty: send at least one message.")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput("This model has no chat template; use the completions endpoint "
                           "with a prompt instead.")
    prompt = tokenizer.apply_chat_template(
        template_messages(messages, template=str(tokenizer.chat_template)),
        tools=list(tools) if tools else None,
        add_generation_prompt=True, tokenize=False, **kwargs)
    return str(prompt)


def _number(payload: Mapping[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{key} must be a number, got {value!r}")
    return float(value)


def sampling_kwargs(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``generate()`` keyword arguments for the request's sampling keys (not the
    token budget, the stop strings or the seed).

    Raises:
        InvalidInput: a value of the wrong type or out of range.
    """
    kwargs: dict[str, Any] = {}
    temperature = _number(payload, "temperature")
    if not temperature:
        kwargs["do_sample"] = False
    else:
        if temperature < 0:
            raise InvalidInput(f"temperature must be 0 or more, got {temperature:g}")
        kwargs.update(do_sample=True, temperature=temperature)
        for key in ("top_p", "min_p"):
            value = _number(payload, key)
            if value is not None:
                kwargs[key] = value
        top_k = _number(payload, "top_k")
        if top_k is not None:
            kwargs["top_k"] = int(top_k)
    penalty = _number(payload, "repetition_penalty")
    if penalty is not None:
        kwargs["repetition_penalty"] = penalty
    bias = payload.get("logit_bias")
    if bias:
        try:
            kwargs["sequence_bias"] = {(int(k),): float(v) for k, v in dict(bias).items()}
        except (TypeError, ValueError) as exc:
            raise InvalidInput("logit_bias must map token ids to numbers",
                               param="logit_bias") from exc
    return kwargs


class _Cancelled(Exception):
    """Raised inside the model's forward pass to abandon a generation; never leaves
    this module."""


@contextlib.contextmanager
def _abort_when_set(model: Any, *events: threading.Event) -> Iterator[None]:
    """Within it, each layer of ``model`` raises ``_Cancelled`` before it runs once
    one of ``events`` is set.

    NOTE: ``generate()`` asks its stopping criteria only between tokens, and the
    prompt's prefill is one forward pass: seconds for a long prompt, and a cancelled
    request would hold the model that long. A forward pre-hook on every member of
    each outermost ``ModuleList`` (the decoder's layers, a vision tower's blocks) runs many
    times within a pass on any device, and ``is_set()`` reads host memory only, so no
    CUDA sync is added. The hooks live for one generation (one request at a time).
    """
    def check(module: Any, args: Any) -> None:
        if any(event.is_set() for event in events):
            raise _Cancelled

    handles: list[Any] = []
    hooked: tuple[str, ...] = ()
    for name, stack in model.named_modules():  # parents before their children
        if isinstance(stack, torch.nn.ModuleList) and not name.startswith(hooked):
            # the outermost lists only: not a MoE layer's hundred experts
            handles += [layer.register_forward_pre_hook(check) for layer in stack]
            hooked += (f"{name}.",)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _WhenSet(StoppingCriteria):  # type: ignore[misc]
    """Stops the generation (every sequence) at the next token once an event is set:
    the fallback for a model whose layers are in no ``ModuleList``."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def tool_prefill(payload: Mapping[str, Any]) -> str:
    """The start of the answer that makes a Hermes-format model call a tool when the
    request demands one: ``<tool_call>``, and the name when one is named."""
    choice = payload.get("tool_choice")
    if not payload.get("tools"):
        return ""
    if isinstance(choice, Mapping):
        name = json.dumps((choice.get("function") or {}).get("name", ""))
        return f'<tool_call>\n{{"name": {name}, "arguments": '
    return "<tool_call>\n" if choice == "required" else ""


def _after(prefix: str, stream: Stream) -> Stream:
    """``stream`` with ``prefix`` as its first text."""
    if prefix:
        yield {"text": prefix}
    done: dict[str, Any] = yield from stream
    return done


class CausalLM:
    """A tokenizer and an ``AutoModelForCausalLM``; serves ``chat`` and ``complete``."""

    ops = frozenset({"chat", "complete", "template"})

    def __init__(self, checkpoint: Checkpoint, settings: LoadSettings,
                 options: Mapping[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self.chat_template = options.get("chat_template")
        self.context_override = options.get("context_length")
        self.default_max_tokens = options.get("max_new_tokens")
        self.options = options
        self.tokenizer: Any = None
        self.model: Any = None
        self.context_length = 0
        self.json_tokenizer: Any = None  # llguidance's, made at the first JSON request

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        label = self.checkpoint.label
        with self.checkpoint.loading():
            progress(0.05, f"loading the tokenizer of {label}")
            self.tokenizer = AutoTokenizer.from_pretrained(
                **self.checkpoint.kwargs(), trust_remote_code=self.settings.trust_remote_code)
            progress(0.3, f"loading the weights of {label}")
            self.model = AutoModelForCausalLM.from_pretrained(
                **self.checkpoint.kwargs(), **self.settings.model_kwargs())
        if self.chat_template:
            self.tokenizer.chat_template = str(self.chat_template)
        self.model.eval()
        self.context_length = self._context_length()
        progress(1.0, f"loaded {label}")
        return {"context_length": self.context_length}

    def _context_length(self) -> int:
        if self.context_override:
            return int(self.context_override)
        config = self.model.config
        config = getattr(config, "get_text_config", lambda: config)()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return int(min(self.tokenizer.model_max_length, 4096))

    def warmup(self) -> None:
        for _ in self._stream(self.tokenizer("Hello", return_tensors="pt"),
                              {"max_tokens": 1}, threading.Event()):
            pass

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
        self.json_tokenizer = None
        release(self.settings.on_cuda)

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event) -> Stream:
        if op == "complete":
            inputs = self.tokenizer(str(payload.get("prompt", "")), return_tensors="pt")
            return self._stream(inputs, payload, cancelled)
        formats = output_formats(self._template_source(), self.options)
        prefill = tool_prefill(payload) if formats[1] == "hermes" else ""
        if prefill:  # the demanded call decides the answer's shape
            payload = {**payload, "response_format": None}
        # NOTE: a demanded call or JSON answer comes first: a think block the template
        # leaves open is closed, or the parser would take the answer for reasoning.
        close = formats[0] == "think" and bool(prefill or json_answer(payload))
        prompt, inputs = self._chat_inputs(payload, prefill, close_thought=close)
        if op == "template":
            return answer({"prompt": prompt,
                            "prompt_tokens": int(inputs["input_ids"].shape[1])})
        parser = output_parser(formats, prompt[:len(prompt) - len(prefill)], payload)
        # Harmony's channels are special tokens: the parser must see them.
        stream = self._stream(inputs, payload, cancelled, special="harmony" in formats)
        return parsed(_after(prefill, stream), parser)

    def _template_source(self) -> str:
        return str(getattr(self.tokenizer, "chat_template", None) or "")

    def _chat_inputs(self, payload: Mapping[str, Any], prefill: str = "", *,
                     close_thought: bool = False) -> tuple[str, Any]:
        """The prompt text of a chat request (``prefill`` starts the answer) and its
        tokens; ``close_thought``: a think block the template leaves open is closed."""
        prompt = render_prompt(self.tokenizer, payload.get("messages") or [],
                               payload.get("tools"), template_kwargs(payload))
        prompt = (open_thought_closed(prompt) if close_thought else prompt) + prefill
        # NOTE: apply_chat_template(tokenize=True) does exactly this (render, then
        # tokenize without special tokens); rendering first keeps one code path.
        return prompt, self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")

    def _budget(self, prompt_tokens: int, payload: Mapping[str, Any]) -> int:
        room = self.context_length - prompt_tokens
        if room <= 0:
            raise InvalidInput.context_exceeded(prompt_tokens, self.context_length)
        wanted = payload.get("max_tokens") or self.default_max_tokens
        if wanted is None:
            return room
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise InvalidInput(f"max_tokens must be a positive integer, got {wanted!r}")
        return min(wanted, room)

    def _vocab_size(self) -> int:
        """How many logits the model gives: its vocabulary (often padded past the
        tokenizer's)."""
        return int(self.model.config.get_text_config().vocab_size)

    def _check_bias(self, bias: Mapping[tuple[int, ...], float]) -> None:
        vocab = self._vocab_size()
        outside = sorted(t for ids in bias for t in ids if not 0 <= t < vocab)
        if outside:
            raise InvalidInput(f"logit_bias names token {outside[0]}, outside this model's "
                               f"vocabulary of {vocab} tokens", param="logit_bias")

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return token_ids(eos)

    def _logits_processors(self, payload: Mapping[str, Any], prompt_tokens: int) -> list[Any]:
        """The penalties and the JSON constraint of a request (maybe neither).

        Raises:
            InvalidInput: a penalty that is not a number, a response_format that cannot
                be followed (a bad schema, a tokenizer llguidance cannot read).
        """
        processors: list[Any] = [*penalties(payload, prompt_tokens)]
        grammar = response_grammar(payload.get("response_format"))
        if grammar is not None:
            if self.json_tokenizer is None:
                # NOTE: a checkpoint's logits may outnumber its tokenizer's tokens
                # (padding) or fall short of them (added tokens it never writes).
                size = max(self._vocab_size(), len(self.tokenizer))
                self.json_tokenizer = guidance_tokenizer(self.tokenizer, size,
                                                         sorted(self._eos_ids()))
            processors.append(JsonConstraint.start(self.json_tokenizer, grammar,
                                                   prompt_tokens))
        return processors

    def _model_inputs(self, inputs: Any) -> dict[str, Any]:
        """What ``generate()`` gets of the tokenizer's output, on the model's device."""
        # Only what a decoder takes: BERT-style tokenizers add token_type_ids too.
        return {k: inputs[k].to(self.model.device)
                for k in ("input_ids", "attention_mask") if k in inputs}

    def _stream(self, inputs: Any, payload: Mapping[str, Any],
                cancelled: threading.Event, *, special: bool = False) -> Stream:
        """Generate in a thread, yield text pieces, return finish reason and usage.
        ``special``: special tokens come out as text (a format parser needs them),
        end-of-generation tokens never do.

        The one generate-and-stream loop: the vision-language kind (hf_vision) runs
        it too, with the processor's output as ``inputs``.
        """
        prompt_tokens = int(inputs["input_ids"].shape[1])
        budget = self._budget(prompt_tokens, payload)
        kwargs = sampling_kwargs(payload)
        self._check_bias(kwargs.get("sequence_bias") or {})
        processors = LogitsProcessorList(self._logits_processors(payload, prompt_tokens))
        stop = payload.get("stop") or []
        # NOTE: not generate()'s stop_strings, which also match across the prompt's end;
        # StopText sees the answer only, and ``leave`` then ends the generation.
        stops = [s for s in ([stop] if isinstance(stop, str) else map(str, stop)) if s]
        if self.model.generation_config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            kwargs["pad_token_id"] = pad if pad is not None else next(iter(self._eos_ids()), 0)
        seed = payload.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidInput(f"seed must be an integer, got {seed!r}")
        model_inputs = self._model_inputs(inputs)
        streamer = TokenStreamer(self.tokenizer, self._eos_ids() if special else None)
        leave = threading.Event()  # a stop string was seen, or the consumer went away
        outcome: dict[str, Any] = {}

        def generate() -> None:
            try:
                if seed is not None:
                    torch.manual_seed(int(seed))
                with torch.inference_mode(), _abort_when_set(self.model, cancelled, leave):
                    self.model.generate(
                        **model_inputs, max_new_tokens=budget, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_WhenSet(cancelled, leave)]),
                        logits_processor=processors, **kwargs)
            except _Cancelled:
                streamer.end()
            except BaseException as exc:
                outcome["error"] = exc
                streamer.end()  # generate() did not: unblock the reading side

        stop_text = StopText(stops)
        thread = threading.Thread(target=generate, name="hf-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if cancelled.is_set():
                    break
                text = stop_text.feed(piece)
                if text:
                    yield {"text": text}
                if stop_text.hit:
                    break
        finally:
            leave.set()
            thread.join()
        if "error" in outcome:
            raise RuntimeError(f"generation failed: {outcome['error']}") from outcome["error"]
        if not cancelled.is_set():
            tail = stop_text.flush()
            if tail:
                yield {"text": tail}
        generated = streamer.generated
        if cancelled.is_set():
            finish = "cancelled"
        elif (len(generated) >= budget and not stop_text.hit
              and generated[-1] not in self._eos_ids()):
            finish = "length"
        else:
            finish = "stop"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
                 "total_tokens": prompt_tokens + len(generated)}
        return {"finish_reason": finish, "usage": usage}
