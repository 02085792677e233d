"""The chatterbox backend's own code: variants, voices, sentence streaming, cancel.

chatterbox-tts cannot run here (it pins torch 2.6 and fetches nothing offline that we
have), so what is NOT run is chatterbox's model itself: the tests that drive the
sentence loop put a stand-in class where `chatterbox.tts` would be, with chatterbox's
own interface (`from_local(ckpt_dir, device)`, `.sr`, `generate(text, audio_prompt_path=,
**options) -> tensor [1, n]`). Loading without chatterbox installed is the real path.
"""

from __future__ import annotations

import math
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from llmux.backends.base import InvalidInput
from llmux.backends.chatterbox import ChatterboxBackend, model_class, sentences, to_pcm16
from tests.helpers import drain

SR = 24000


class StandIn:
    """chatterbox's interface; 0.1 s of tone per call, and a record of the calls."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, device: str) -> None:
        self.sr = SR
        self.device = device

    @classmethod
    def from_local(cls, ckpt_dir: Path, device: str) -> StandIn:
        assert Path(ckpt_dir).is_dir()
        return cls(device)

    def generate(self, text: str, **options: Any) -> torch.Tensor:
        self.calls.append((text, options))
        n = SR // 10
        return torch.tensor([[0.5 * math.sin(2 * math.pi * 440 * i / SR) for i in range(n)]])


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandIn]:
    for name, cls in (("chatterbox.tts", "ChatterboxTTS"),
                      ("chatterbox.mtl_tts", "ChatterboxMultilingualTTS")):
        module = types.ModuleType(name)
        setattr(module, cls, StandIn)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "chatterbox", types.ModuleType("chatterbox"))
    StandIn.calls = []
    return StandIn


def backend(tmp_path: Path, **options: Any) -> ChatterboxBackend:
    b = ChatterboxBackend({"model_id": "cb", "model_path": str(tmp_path), "device": "cpu",
                           "options": options})
    b.load(lambda fraction, message: None)
    return b


def test_sentences_and_pcm() -> None:
    assert sentences("One. Two!  Three? Four") == ["One.", "Two!", "Three?", "Four"]
    assert to_pcm16([0.0, 1.0, -1.0, 2.0]) == b"\x00\x00\xff\x7f\x01\x80\xff\x7f"


def test_loading_without_chatterbox_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="make chatterbox-venv"):
        ChatterboxBackend({"model_path": str(tmp_path)}).load(lambda f, m: None)
    with pytest.raises(ValueError, match="variant must be one of default, multilingual"):
        model_class("huge")


def test_each_sentence_is_sent_as_it_is_made(stand_in: type[StandIn], tmp_path: Path) -> None:
    b = backend(tmp_path, exaggeration=0.7)
    chunks, done = drain(b.infer("speech", {"text": "Hello there. How are you?", "voice": "",
                                            "speed": 1.0}, threading.Event()))
    assert [len(c["pcm"]) for c in chunks] == [2 * SR // 10] * 2
    assert {c["sample_rate"] for c in chunks} == {SR}
    assert done == {"sample_rate": SR, "finish_reason": "stop"}
    assert stand_in.calls == [("Hello there.", {"audio_prompt_path": None, "exaggeration": 0.7}),
                              ("How are you?", {"audio_prompt_path": None,
                                                "exaggeration": 0.7})]


def test_voices_are_reference_clips_and_languages_need_the_multilingual_model(
    stand_in: type[StandIn], tmp_path: Path,
) -> None:
    clip = tmp_path / "anna.wav"
    clip.write_bytes(b"RIFF")
    drain(backend(tmp_path).infer("speech", {"text": "Hi.", "voice": str(clip)},
                                  threading.Event()))
    assert stand_in.calls[-1][1]["audio_prompt_path"] == str(clip)
    with pytest.raises(InvalidInput, match="reference clip of this voice is missing"):
        drain(backend(tmp_path).infer("speech", {"text": "Hi.", "voice": "/no/such.wav"},
                                      threading.Event()))
    with pytest.raises(InvalidInput, match="speaks English only"):
        backend(tmp_path).infer("speech", {"text": "Hallo.", "language": "de"},
                                threading.Event())
    multilingual = backend(tmp_path, variant="multilingual", language="fr")
    drain(multilingual.infer("speech", {"text": "Bonjour."}, threading.Event()))
    assert stand_in.calls[-1][1]["language_id"] == "fr"
    with pytest.raises(InvalidInput, match="speed"):
        multilingual.infer("speech", {"text": "Vite.", "speed": 1.5}, threading.Event())


def test_cancel_stops_between_sentences(stand_in: type[StandIn], tmp_path: Path) -> None:
    cancelled = threading.Event()
    stream = backend(tmp_path).infer("speech", {"text": "One. Two. Three."}, cancelled)
    next(stream)
    cancelled.set()
    rest, done = drain(stream)
    assert rest == [] and done["finish_reason"] == "cancelled"
    assert len(stand_in.calls) == 1


@pytest.mark.parametrize("language", [None, "", "en", "EN", "en-US", "En-gb"])
def test_the_english_chatterbox_takes_no_language_or_english(
        stand_in: type[StandIn], tmp_path: Path, language: str | None) -> None:
    chunks, done = drain(backend(tmp_path).infer(
        "speech", {"text": "Hello.", "language": language}, threading.Event()))
    assert len(chunks) == 1 and done["finish_reason"] == "stop"
    assert "language_id" not in stand_in.calls[-1][1]


@pytest.mark.parametrize("language", ["de", "english", "eng", "fr-CA"])
def test_the_english_chatterbox_refuses_other_languages(
        stand_in: type[StandIn], tmp_path: Path, language: str) -> None:
    with pytest.raises(InvalidInput, match="speaks English only"):
        backend(tmp_path).infer("speech", {"text": "Hallo.", "language": language},
                                threading.Event())
