"""Chatterbox TTS (Resemble AI): the default, multilingual and turbo variants.

chatterbox-tts pins torch 2.6, transformers 5.2 and numpy < 2, so this backend runs in
a worker under its own interpreter (the model's ``python:`` in the config; ``make
chatterbox-venv`` builds one). Weights come from ``model_path`` (``from_local``), never
from a hub.

Options: ``variant`` (default | multilingual | turbo), ``language`` (multilingual's
default language), ``exaggeration``, ``cfg_weight``, ``temperature``. Voices in the
config map a voice name to a reference clip (a wav of the speaker); "" is the model's
built-in voice. Text is synthesised sentence by sentence, each sentence sent as soon
as it is made. Chatterbox has no speed control: ``speed`` other than 1 is refused.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from llmux.backends.base import Backend, InvalidInput, ProgressFn, Stream, parse_device
from llmux.backends.paths import resolve_model_path

VARIANTS: Final = {
    "default": ("chatterbox.tts", "ChatterboxTTS"),
    "multilingual": ("chatterbox.mtl_tts", "ChatterboxMultilingualTTS"),
    "turbo": ("chatterbox.tts_turbo", "ChatterboxTurboTTS"),
}
GENERATION_OPTIONS: Final = ("exaggeration", "cfg_weight", "temperature")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def sentences(text: str) -> list[str]:
    """The text in sentences, so the first one can be heard while the rest is made."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def to_pcm16(samples: Sequence[float]) -> bytes:
    """Float samples in [-1, 1] as int16 little-endian bytes (clipped)."""
    import array
    import sys

    pcm = array.array("h", (int(max(-1.0, min(1.0, x)) * 32767) for x in samples))
    if sys.byteorder == "big":  # pragma: no cover
        pcm.byteswap()
    return pcm.tobytes()


def model_class(variant: str) -> Any:
    """The chatterbox class of ``variant``, imported only now (its own interpreter).

    Raises:
        ValueError: an unknown variant.
        RuntimeError: chatterbox-tts is not installed in this interpreter.
    """
    if variant not in VARIANTS:
        raise ValueError(f"option variant must be one of {', '.join(VARIANTS)}, "
                         f"got {variant!r}")
    module_name, class_name = VARIANTS[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(
            f"chatterbox-tts is not installed in this interpreter ({exc}); give the model "
            "`python: /opt/chatterbox-venv/bin/python` (built by `make chatterbox-venv`)"
        ) from exc
    return getattr(module, class_name)


def is_english(language: Any) -> bool:
    """Whether a request's ``language`` is one the English-only variants speak: none,
    ``en`` or a regional ``en-*`` tag, in any case."""
    tag = str(language or "en").lower()
    return tag == "en" or tag.startswith("en-")


class ChatterboxBackend(Backend):
    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.variant = str(self.options.get("variant", "default"))
        self.language = self.options.get("language")
        self.generation = {k: float(self.options[k]) for k in GENERATION_OPTIONS
                           if k in self.options}
        self.model: Any = None

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        cls = model_class(self.variant)
        kind, index = parse_device(str(self.spec.get("device", "cpu")))
        if not self.spec.get("model_path"):
            raise ValueError("chatterbox needs model_path: the directory of its checkpoint")
        path = resolve_model_path(str(self.spec["model_path"]))
        progress(0.1, f"loading chatterbox {self.variant} from {path}")
        self.model = cls.from_local(path, "cpu" if kind == "cpu" else f"cuda:{index}")
        progress(1.0, "loaded")
        return {"sample_rate": int(self.model.sr), "variant": self.variant}

    def warmup(self) -> None:
        for _ in self._speak("Hi.", "", self.language, threading.Event()):
            pass

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event
              ) -> Stream:
        if op != "speech":
            raise InvalidInput(f"chatterbox only speaks; it cannot {op!r}")
        if float(payload.get("speed") or 1.0) != 1.0:
            raise InvalidInput("Chatterbox cannot change its speaking speed; leave 'speed' "
                               "at 1.0.")
        text = str(payload.get("text", ""))
        if not text.strip():
            raise InvalidInput("There is no text to speak.")
        language = payload.get("language") or self.language
        if not is_english(language) and self.variant != "multilingual":
            raise InvalidInput(f"The {self.variant} Chatterbox speaks English only; use the "
                               "multilingual model for other languages.")
        return self._speak(text, str(payload.get("voice") or ""), language, cancelled)

    def _speak(self, text: str, voice: str, language: Any, cancelled: threading.Event
               ) -> Stream:
        clip = None
        if voice:
            clip = Path(voice)
            if not clip.is_file():
                raise InvalidInput(f"The reference clip of this voice is missing: {voice}")
        rate = int(self.model.sr)
        kwargs: dict[str, Any] = dict(self.generation)
        if self.variant == "multilingual":
            kwargs["language_id"] = language or "en"
        for sentence in sentences(text):
            if cancelled.is_set():
                return {"sample_rate": rate, "finish_reason": "cancelled"}
            wav = self.model.generate(sentence, audio_prompt_path=clip and str(clip), **kwargs)
            yield {"pcm": to_pcm16(wav.squeeze(0).tolist()), "sample_rate": rate}
        return {"sample_rate": rate, "finish_reason": "stop"}

    def unload(self) -> None:
        self.model = None
