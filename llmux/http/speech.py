"""``POST /v1/audio/speech`` and the name lists Open WebUI's settings page reads.

Speech streams: the worker sends PCM chunks (each with its sample rate) as the model
makes them; each is encoded in a thread and sent at once, so playback can start long
before the last sentence is synthesised.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import falcon.asgi

from llmux.actors.messages import Failure, Finished, Piece, Reply
from llmux.audio.encode import SPEECH_FORMATS, SpeechEncoder
from llmux.audio.voices import resolve_voice, voice_names
from llmux.config import PhysicalModel
from llmux.errors import BadRequest
from llmux.http.auth import Access
from llmux.http.body import field, number_in
from llmux.http.disconnect import StreamAborted
from llmux.http.jobs import replies, start_stream, unbuffered
from llmux.http.target import json_request, resolve_for
from llmux.runtime import Runtime, Ticket

log = logging.getLogger(__name__)

MAX_INPUT_CHARS = 4096
DEFAULT_SAMPLE_RATE = 24000
SPEECH = frozenset({"tts"})


def requested_voice(body: dict[str, Any]) -> str | None:
    """``voice`` as a name, or as the SDK's newer ``{"id": name}`` object."""
    voice = body.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
    if voice is not None and not isinstance(voice, str):
        raise BadRequest("'voice' must be a voice name.", param="voice")
    return voice


class Speech:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body, _, _, physical = await json_request(req, self.runtime, SPEECH,
                                                     "cannot speak")
        text = field(body, "input", str, required=True)
        if not text or not text.strip():
            raise BadRequest("'input' is empty: send the text to speak.", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise BadRequest(f"'input' has {len(text)} characters; the limit is "
                             f"{MAX_INPUT_CHARS}. Split the text.", param="input")
        fmt = field(body, "response_format", str, default="mp3")
        if fmt not in SPEECH_FORMATS:
            raise BadRequest(f"'response_format' must be one of {', '.join(SPEECH_FORMATS)}.",
                             param="response_format")
        if field(body, "stream_format", str) not in (None, "audio"):
            raise BadRequest("'stream_format' must be 'audio': llmux streams the audio "
                             "itself, not server-sent events.", param="stream_format")
        payload = {
            "text": text,
            "voice": resolve_voice(physical.voices, requested_voice(body)),
            "speed": number_in(body, "speed", 0.25, 4.0) or 1.0,
        }
        language = field(body, "language", str)
        if language:
            payload["language"] = language
        ticket = self.runtime.submit(physical.id, "speech", payload)
        first = await start_stream(req, ticket)
        resp.content_type = SPEECH_FORMATS[fmt]
        unbuffered(resp)
        resp.stream = encoded_audio(ticket, first, fmt)


async def new_encoder(fmt: str, data: dict[str, Any]) -> SpeechEncoder:
    """An encoder for the reply, made in a thread: the first one imports PyAV."""
    rate = int(data.get("sample_rate", DEFAULT_SAMPLE_RATE))
    return await anyio.to_thread.run_sync(SpeechEncoder, fmt, rate)


async def encoded_audio(ticket: Ticket, first: Reply, fmt: str) -> AsyncIterator[bytes]:
    encoder: SpeechEncoder | None = None
    async for reply in replies(ticket, first):
        match reply:
            case Piece(data=data) if "pcm" in data:
                if encoder is None:
                    encoder = await new_encoder(fmt, data)
                out = await anyio.to_thread.run_sync(encoder.feed, data["pcm"])
                if out:
                    yield out
            case Finished(data=data):
                if encoder is None:
                    encoder = await new_encoder(fmt, data)
                yield await anyio.to_thread.run_sync(encoder.finish)
            case Failure(error=error):
                raise StreamAborted(error.message)


def speech_models(runtime: Runtime) -> dict[str, PhysicalModel]:
    """Virtual name -> physical model, for every speech model."""
    models = runtime.config.physical_models
    return {name: models[v.physical] for name, v in runtime.config.virtual_models.items()
            if models[v.physical].type == "tts"}


class AudioModels:
    """``GET /v1/audio/models``: the speech models, as Open WebUI's settings page asks."""

    def __init__(self, runtime: Runtime, access: Access) -> None:
        self.runtime = runtime
        self.access = access

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"models": [{"id": name} for name in speech_models(self.runtime)]}

    on_head = on_get


class AudioVoices:
    """``GET /v1/audio/voices[?model=…]``: one model's voices, or every speech model's."""

    def __init__(self, runtime: Runtime, access: Access) -> None:
        self.runtime = runtime
        self.access = access

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        name = req.get_param("model")
        if name:
            _, physical = resolve_for(req, self.runtime, name, SPEECH, "has no voices")
            physicals = [physical]
        else:
            physicals = list(speech_models(self.runtime).values())
        names = dict.fromkeys(v for p in physicals for v in voice_names(p.voices))
        resp.media = {"voices": [{"id": v, "name": v} for v in names]}

    on_head = on_get
