"""The embedded default (`config/llmux.yaml`, what `make serve` runs): real models from
PyPI packages on the CPU, through a live server and the openai SDK."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import ROOT, Server, live_workers, wait_until
from tests.helpers import WORDS, encoded, pdf_of, text_image, word_error_rate, words

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = yaml.safe_load((ROOT / "config" / "llmux.yaml").read_text())
    server = Server(config, tmp_path_factory.mktemp("default"))
    yield server
    server.stop()
    wait_until(lambda: not live_workers(), 10, "workers to exit")


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                       timeout=300) as c:
        yield c



def espeak(text: str, path: Path) -> bytes:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text],
                   check=True, capture_output=True)
    return path.read_bytes()


@pytest.mark.parametrize("model", ["chat", "chat-hf"])
def test_chat_tokens_stream_from_smollm2(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, stream=True, stream_options={"include_usage": True})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and
              c.choices[0].delta.content]
    assert len(pieces) >= 3, pieces
    assert "".join(pieces).strip()


def test_paraphrases_embed_closer_than_an_unrelated_sentence(client: openai.OpenAI) -> None:
    texts = ["A man is playing a guitar.", "Someone is strumming a guitar.",
             "The stock market fell sharply today."]
    a, b, c = (d.embedding for d in client.embeddings.create(model="embed", input=texts).data)

    def cosine(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True)) / math.sqrt(
            sum(p * p for p in x) * sum(q * q for q in y))

    assert len(a) == 384
    assert cosine(a, b) > cosine(a, c) + 0.2


def test_espeak_speech_is_transcribed(client: openai.OpenAI, tmp_path: Path) -> None:
    spoken = "hello world this is a test"
    audio = espeak(spoken, tmp_path / "hello.wav")
    text = client.audio.transcriptions.create(model="whisper", file=("hello.wav", audio)).text
    # tiny.en mishears espeak's robotic voice now and then ("this is my past"): most of
    # the words, not all, must come back; the piper round trip below is held to WER 0.2
    heard = set(words(text))
    assert len([w for w in words(spoken) if w in heard]) >= 4, text


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_voice_round_trip(client: openai.OpenAI, fmt: Any) -> None:
    said = "Please remind me to water the plants tomorrow morning."
    speech = client.audio.speech.create(model="tts", voice="alloy", input=said,
                                        response_format=fmt)
    heard = client.audio.transcriptions.create(model="whisper",
                                               file=(f"speech.{fmt}", speech.content)).text
    assert word_error_rate(said, heard) <= 0.2, heard


def test_the_tight_budget_swaps_real_models_by_measured_footprints(
    client: openai.OpenAI, server: Server,
) -> None:
    # every model has been used by now (tests run in file order; use them again anyway)
    client.embeddings.create(model="embed", input=["one"])
    client.audio.speech.create(model="tts", voice="alloy", input="Hello there.")
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Say hello."}], max_tokens=5)
    assert reply.choices[0].message.content
    state = server.state()
    evictions = [e for e in state["events"] if e["kind"] == "evict"]
    assert evictions, "the 2 GB budget cannot hold every model at once"
    device = state["devices"][0]
    assert device["used_bytes"] + device["reserved_bytes"] <= device["capacity_bytes"]
    for model in state["models"]:
        if model["state"] == "ready":
            assert model["footprint_source"] == "measured", model
    embedding = client.embeddings.create(model="embed", input=["still correct"])
    assert len(embedding.data[0].embedding) == 384


@pytest.mark.parametrize("kind", ["png", "pdf"])
def test_transcribe_reads_a_rendered_image_and_a_one_page_pdf(server: Server, kind: str) -> None:
    image = text_image()
    data = pdf_of(image) if kind == "pdf" else encoded(image, "PNG")
    reply = httpx.post(f"{server.url}/v1/transcribe", data={"model": "ocr"}, timeout=120,
                       files={"file": (f"scan.{kind}", data)})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["pages"]) == 1
    assert words(body["text"]) == words(" ".join(WORDS)), body["text"]
