"""The faster_whisper backend's options: checked with the config (every bad one named by
path), and handed to faster-whisper's ``transcribe()`` as configured."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from llmux.backends.faster_whisper import FasterWhisperBackend
from llmux.config import ConfigError, parse_config
from tests.helpers import drain

TUNED: dict[str, Any] = {
    "compute_type": "int8", "cpu_threads": 2, "beam_size": 5, "vad_filter": False,
    "condition_on_previous_text": False, "temperature": [0.0, 0.5], "log_prob_threshold": -2,
    "compression_ratio_threshold": None, "no_speech_threshold": 0.8,
    "hallucination_silence_threshold": 2.0,
}


def config(**options: Any) -> dict[str, Any]:
    return {
        "physical_models": {"whisper": {"type": "asr", "backend": "faster_whisper",
                                        "estimated_vram": "400MB", "options": options}},
        "virtual_models": {"whisper": {"physical": "whisper"}},
    }


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


# -- checked with the config -------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {},
    TUNED,
    {"temperature": 0},
    {"temperature": 0.2},
    {"temperature": [0]},
    {"log_prob_threshold": None, "no_speech_threshold": None,
     "hallucination_silence_threshold": None},
    {"log_prob_threshold": 0, "no_speech_threshold": 1, "compression_ratio_threshold": 3},
    {"no_speech_threshold": 0},
])
def test_good_options_pass(options: dict[str, Any]) -> None:
    model = parse_config(config(**options)).physical_models["whisper"]
    assert model.options == options


def test_every_bad_option_is_named_by_path() -> None:
    bad = {
        "compute_type": 8, "cpu_threads": -1, "beam_size": 0, "vad_filter": "no",
        "condition_on_previous_text": 1, "temperature": [0, -0.2, "hot", [1]],
        "compression_ratio_threshold": 0, "log_prob_threshold": 0.5,
        "no_speech_threshold": 1.5, "hallucination_silence_threshold": -1,
        "compression_ratio_treshold": 2.0,
    }
    where = "physical_models.whisper.options"
    assert problems_of(config(**bad)) == [
        f"{where}.compute_type: expected a string, got 8",
        f"{where}.cpu_threads: must not be negative",
        f"{where}.beam_size: must be at least 1",
        f'{where}.vad_filter: expected a boolean, got "no"',
        f"{where}.condition_on_previous_text: expected a boolean, got 1",
        f"{where}.temperature[1]: must not be negative",
        f'{where}.temperature[2]: expected a number, got "hot"',
        f"{where}.temperature[3]: expected a number, got a list",
        f"{where}.compression_ratio_threshold: must be positive",
        f"{where}.log_prob_threshold: must not be positive: an average log probability is "
        "at most 0",
        f"{where}.no_speech_threshold: must be from 0 to 1: it bounds a probability",
        f"{where}.hallucination_silence_threshold: must be positive (seconds)",
        f"{where}.compression_ratio_treshold: unknown option, did you mean "
        "compression_ratio_threshold? (faster_whisper takes "
        "beam_size, compression_ratio_threshold, compute_type, condition_on_previous_text, "
        "cpu_threads, hallucination_silence_threshold, log_prob_threshold, "
        "no_speech_threshold, temperature, vad_filter)",
    ]


@pytest.mark.parametrize(("options", "problem"), [
    ({"temperature": []}, "temperature: expected a number or a list of numbers, got an "
                          "empty list"),
    ({"temperature": "auto"}, 'temperature: expected a number or a list of numbers, got '
                              '"auto"'),
    ({"temperature": -1}, "temperature: must not be negative"),
    ({"temperature": float("nan")}, "temperature: expected a number or a list of numbers, "
                                    "got nan"),
    ({"beam_size": 2.0}, "beam_size: expected an integer, got 2.0"),
    ({"hallucination_silence_threshold": 0}, "hallucination_silence_threshold: must be "
                                             "positive (seconds)"),
    ({"no_speech_threshold": -0.1}, "no_speech_threshold: must be from 0 to 1: it bounds a "
                                    "probability"),
    ({"cpu_threads": True}, "cpu_threads: expected an integer, got true"),
    ({"no_speech_threshold": "0.6"}, 'no_speech_threshold: expected a number or null, '
                                     'got "0.6"'),
    ({"log_prob_threshold": {"max": 0}}, "log_prob_threshold: expected a number or null, "
                                         "got a mapping"),
])
def test_a_bad_value_is_a_config_problem(options: dict[str, Any], problem: str) -> None:
    assert problems_of(config(**options)) == [f"physical_models.whisper.options.{problem}"]


def test_other_backends_options_are_not_checked_as_faster_whisper_s() -> None:
    data = config(temperature=-1)
    data["physical_models"]["whisper"]["backend"] = "transformers"
    problem, = problems_of(data)
    assert problem.startswith("physical_models.whisper.options.temperature: unknown option "
                              "(transformers takes ")


# -- handed to transcribe() ----------------------------------------------------------------


class Recorder:
    """A stand-in for faster-whisper's WhisperModel: keeps what transcribe() was given."""

    def __init__(self) -> None:
        self.model = SimpleNamespace(is_multilingual=False)
        self.supported_languages = ["en"]
        self.calls: list[dict[str, Any]] = []

    def transcribe(self, audio: Any, **options: Any) -> tuple[list[Any], Any]:
        self.calls.append(options)
        return [], SimpleNamespace(language="en", duration=1.0)


def transcribe_options(options: dict[str, Any], **payload: Any) -> dict[str, Any]:
    """The keywords ``transcribe()`` gets for one second of silence."""
    backend = FasterWhisperBackend({"model_id": "w", "model_path": "unused", "files": {},
                                    "options": options, "device": "cpu"})
    backend._model = recorder = Recorder()
    request = {"samples": bytes(16000 * 4), "task": "transcribe", **payload}
    drain(backend.infer("transcribe", request, threading.Event()))
    call, = recorder.calls
    return call


def test_decoding_options_reach_transcribe() -> None:
    call = transcribe_options(TUNED)
    assert {key: call[key] for key in TUNED if key in call} == {
        "beam_size": 5, "vad_filter": False, "condition_on_previous_text": False,
        "temperature": (0.0, 0.5), "log_prob_threshold": -2,
        "compression_ratio_threshold": None, "no_speech_threshold": 0.8,
        "hallucination_silence_threshold": 2.0,
    }


def test_unset_decoding_options_keep_faster_whisper_s_defaults() -> None:
    call = transcribe_options({})
    assert set(call) == {"language", "task", "initial_prompt", "temperature",
                         "word_timestamps", "beam_size", "vad_filter"}
    assert call["temperature"] == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@pytest.mark.parametrize(("option", "request_temperature", "expected"), [
    (0.0, None, (0.0,)),
    ([0.0, 0.4], 0, (0.0, 0.4)),  # OpenAI: 0 is "automatic", the configured ladder
    ([0.0, 0.4], 0.7, (0.7,)),  # the request's own temperature wins
])
def test_the_temperature_option_is_the_ladder_a_request_leaves_to_the_server(
        option: Any, request_temperature: float | None, expected: tuple[float, ...]) -> None:
    call = transcribe_options({"temperature": option}, temperature=request_temperature)
    assert call["temperature"] == expected


def test_the_hallucination_silence_threshold_times_words_it_needs() -> None:
    """faster-whisper looks for hallucinated segments in the word timings only."""
    assert transcribe_options({})["word_timestamps"] is False
    assert transcribe_options({"hallucination_silence_threshold": 2.0})[
        "word_timestamps"] is True
