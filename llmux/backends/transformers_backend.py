"""Hugging Face transformers models, on the CPU or one CUDA device.

The spec's ``type`` picks the model kind: ``llm`` (a causal LM: ``chat``, ``complete``;
see hf_causal), ``asr`` (speech seq2seq such as Whisper: ``transcribe``; see hf_asr),
``embedding`` (an encoder pooled as its sentence-transformers config says, else
mean-pooled: ``embed``; see hf_embed), ``forecast`` (TimesFM 2.5: ``forecast``; see
hf_forecast), ``vlm`` (an image-text-to-text model of the Qwen-VL family: ``chat``
with image parts, ``complete``; see hf_vision).

``model_path`` is a transformers checkpoint directory (``config.json`` and weights, the
tokenizer or processor beside them) or, for an ``llm``, a single ``.gguf`` file, which
transformers de-quantises into ``dtype`` on load (slow: it parses the GGUF three times).
Everything loads with ``local_files_only``: nothing is ever downloaded.

Options, all optional:

    dtype              "auto" (the checkpoint's), "float32", "bfloat16", "float16";
                       default float32 on cpu, auto on cuda
    device_map         passed to from_pretrained (default: the spec's device, e.g.
                       "cuda:0"; "auto" spreads a model over every visible GPU)
    trust_remote_code  run the checkpoint's own Python code (default false)
    attn_implementation  "sdpa", "eager", "flash_attention_2", ... (default: transformers')
    gguf               true: model_path must be a .gguf file (a reminder; the suffix decides)
    gguf_file          with a directory model_path: the .gguf file in it to load
  llm:
    context_length     the prompt + answer limit (default: max_position_embeddings)
    max_new_tokens     the answer limit when a request sets no max_tokens (default: the
                       rest of the context)
    chat_template      a Jinja chat template replacing the tokenizer's (for base models)
  vlm:
    the llm options, and
    min_pixels, max_pixels  the area each image is resized into (default: the
                       checkpoint's processor settings); fewer pixels, fewer tokens
  asr:
    language           the language when a request names none; needed by models whose
                       processor takes a language (Cohere ASR)
    max_new_tokens     tokens per 30 s window (default: half max_target_positions)
  embedding:
    max_length         truncate inputs to this many tokens (default: the checkpoint's
                       max_seq_length, else the tokenizer's; never beyond the model's)
    batch_size         inputs per forward pass (default 32)
  forecast:
    batch_size         series per forward pass (default 32)
    truncate           true: a series longer than the model's context (16384 for
                       TimesFM 2.5) keeps its most recent points; false (default): a 400
    fix_quantile_crossing  make the quantiles monotonic, as TimesFM's authors advise
                       (default true)

Quantized checkpoints (FP8, MXFP4, bitsandbytes, ...) load as transformers loads them:
their ``quantization_config`` in config.json is passed through untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final

from llmux.backends.base import Backend, InvalidInput, ProgressFn
from llmux.backends.hf_asr import SpeechToText
from llmux.backends.hf_causal import CausalLM
from llmux.backends.hf_common import Checkpoint, HfModel, LoadSettings, Stream
from llmux.backends.hf_embed import TextEmbedder
from llmux.backends.hf_forecast import Forecaster
from llmux.backends.hf_vision import VisionLM

__all__ = ["KINDS", "TransformersBackend"]

KINDS: Final[Mapping[str, type[CausalLM] | type[SpeechToText] | type[TextEmbedder]
                     | type[Forecaster]]] = {
    "llm": CausalLM,
    "asr": SpeechToText,
    "embedding": TextEmbedder,
    "forecast": Forecaster,
    "vlm": VisionLM,
}


class TransformersBackend(Backend):
    """One transformers model of the spec's type; dispatches to its kind's helper."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        """Raises ValueError for a type this backend does not serve or a bad option."""
        super().__init__(spec)
        self.kind = str(spec.get("type", ""))
        if self.kind not in KINDS:
            raise ValueError(f"the transformers backend serves {', '.join(KINDS)} models, "
                             f"not {self.kind!r}")
        self.settings = LoadSettings(self.options, str(spec.get("device") or "cpu"))
        self._model: HfModel | None = None

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        """Raises:
            ValueError: no model_path, or options that contradict it.
            FileNotFoundError: the checkpoint (or a file it needs) is missing.
            OSError, RuntimeError: transformers could not read the checkpoint.
        """
        checkpoint = Checkpoint.from_spec(self.spec, self.options)
        if checkpoint.gguf_file and self.kind != "llm":
            raise ValueError(f"{checkpoint.label}: only llm models load from GGUF here")
        model: HfModel = KINDS[self.kind](checkpoint, self.settings, self.options)
        info = model.load(progress)
        self._model = model
        return info

    def warmup(self) -> None:
        self._loaded().warmup()

    def footprint_bytes(self) -> int | None:
        return self.settings.footprint_bytes()

    def unload(self) -> None:
        if self._model is not None:
            self._model.unload()
            self._model = None

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event) -> Stream:
        model = self._loaded()
        if op not in model.ops:
            raise InvalidInput(f"this {self.kind} model cannot do {op!r}; it serves "
                               f"{', '.join(sorted(model.ops))}")
        return model.infer(op, payload, cancelled)

    def _loaded(self) -> HfModel:
        if self._model is None:
            raise RuntimeError("no model loaded: call load() first")
        return self._model
