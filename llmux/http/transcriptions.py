"""``POST /v1/audio/transcriptions`` and ``/translations``: speech to text.

The upload is read with a size limit and decoded here, in a thread, to 16 kHz mono
float32 samples: the worker gets samples, never a file, so every backend accepts every
format and a bad file is a 400 before any model is loaded. The format is found from
the bytes (Open WebUI sends ``application/octet-stream`` and ``<uuid>.<ext>``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from typing import Any, cast

import anyio.to_thread
import falcon.asgi
from falcon.asgi.multipart import MultipartForm

from llmux.audio.decode import decode_to_pcm, duration_s
from llmux.audio.transcript import CONTENT_TYPES, RESPONSE_FORMATS, render
from llmux.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from llmux.http import json_shape
from llmux.http.body import media_type, read_json, refuse_encoded
from llmux.http.jobs import run_whole
from llmux.http.target import resolve_for
from llmux.runtime import Runtime

MAX_AUDIO_S = 3600.0  # an hour of samples (230 MB) still fits one worker frame
FORM_SLACK = 64 * 1024  # the form's other fields, on top of the upload limit
READ_CHUNK = 256 * 1024
GRANULARITIES = ("word", "segment")
RECOGNITION = frozenset({"asr"})


def language_code(language: str) -> str:
    """The ISO-639-1 code of a language as clients send it: ``EN``, ``en-US`` and
    ``en_GB`` are ``en`` (Open WebUI passes on its user's setting as typed)."""
    return language.strip().lower().replace("_", "-").partition("-")[0]


async def multipart_form(req: falcon.asgi.Request) -> MultipartForm:
    """The body as a multipart form, whatever the case of its media type.

    NOTE: ``req.get_media()`` picks the handler by the media type as sent, case by case,
    and answers ``Multipart/Form-Data`` with a 415; media types are case-insensitive
    (RFC 9110 8.3.1) and the caller has checked this one, so the form handler is named.
    """
    handler = req.options.media_handlers[falcon.MEDIA_MULTIPART]
    form = await handler.deserialize_async(req.stream, req.content_type, req.content_length)
    return cast(MultipartForm, form)


async def read_multipart(req: falcon.asgi.Request, limit: int,
                         advice: str = "Send a shorter recording or split it."
                         ) -> tuple[bytes | None, dict[str, Any]]:
    """The ``file`` part (at most ``limit`` bytes) and the other fields as text;
    ``advice`` ends the 413's message.

    Raises:
        UnsupportedMediaType: the body is compressed.
        PayloadTooLarge: the file (or the whole body) is over the limit.
        BadRequest: a field is not valid Unicode.
    """
    refuse_encoded(req)
    if req.content_length is not None and req.content_length > limit + FORM_SLACK:
        raise PayloadTooLarge(f"The upload has {req.content_length} bytes; the limit is "
                              f"{limit} bytes. {advice}")
    form = await multipart_form(req)
    audio: bytes | None = None
    fields: dict[str, Any] = {}
    async for part in form:
        try:
            name = part.name
        except UnicodeDecodeError as exc:  # NOTE: Falcon decodes the header as strict UTF-8
            raise BadRequest("A form part's Content-Disposition header is not valid "
                             "UTF-8.") from exc
        if name == "file":
            data = bytearray()
            while chunk := await part.stream.read(READ_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise PayloadTooLarge(f"The uploaded file is over the limit of {limit} "
                                          f"bytes. {advice}")
            audio = bytes(data)
        elif name in ("timestamp_granularities[]", "timestamp_granularities"):
            fields.setdefault("timestamp_granularities", []).append(await part.get_text())
        elif name is not None:  # a part without a name is no field
            fields[name] = await part.get_text()
    try:
        # NOTE: a part's charset may be any Python codec; utf-7 and unicode_escape
        # decode to unpaired surrogates, which no worker frame can carry.
        json_shape.check(fields)
    except json_shape.Unrepresentable as exc:
        raise BadRequest(exc.message, param=exc.param) from exc
    return audio, fields


def audio_from_json(body: dict[str, Any]) -> bytes:
    """Open WebUI's JSON variant: ``input_audio: {data: base64, format}``."""
    source = body.get("input_audio")
    data = source.get("data") if isinstance(source, dict) else None
    if not isinstance(data, str):
        raise BadRequest("Send the audio as multipart 'file', or as JSON "
                         "'input_audio': {'data': <base64>, 'format': ...}.", param="file")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("'input_audio.data' is not valid base64.",
                         param="input_audio") from exc


def text_field(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string.", param=name)
    return value


def options(fields: dict[str, Any], task: str) -> dict[str, Any]:
    """The checked form fields: response format, language, prompt, temperature."""
    fmt = text_field(fields, "response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise BadRequest(f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}.",
                         param="response_format")
    temperature = fields.get("temperature")
    try:
        temperature = None if temperature in (None, "") else float(temperature)
    except (TypeError, ValueError):
        temperature = -1.0
    if temperature is not None and not 0.0 <= temperature <= 1.0:
        raise BadRequest("'temperature' must be a number between 0 and 1.",
                         param="temperature")
    granularities = fields.get("timestamp_granularities") or []
    if not isinstance(granularities, list) or any(g not in GRANULARITIES
                                                  for g in granularities):
        raise BadRequest("'timestamp_granularities[]' takes word and segment.",
                         param="timestamp_granularities[]")
    language = text_field(fields, "language") if task == "transcribe" else None
    if language is not None:
        language = language_code(language)
    if language is not None and not (2 <= len(language) <= 8 and language.isascii()):
        raise BadRequest("'language' must be an ISO-639-1 code such as 'en'.",
                         param="language")
    stream = fields.get("stream", False)
    if stream not in (True, False, "true", "false"):
        raise BadRequest("'stream' must be true or false.", param="stream")
    stream = stream in (True, "true")  # a form's field is text
    if stream and fmt not in ("json", "text"):
        raise BadRequest("A streamed transcription is text: 'response_format' json or text.",
                         param="response_format")
    return {"response_format": fmt, "language": language,
            "prompt": text_field(fields, "prompt"), "temperature": temperature,
            "words": "word" in granularities, "stream": stream}


def transcript_events(text: str) -> bytes:
    """A streamed transcription as OpenAI's SSE events: the text as one delta, then
    done (the recogniser answers whole, so there is nothing sooner to send). The openai
    SDK's ``stream=True`` reads these; a JSON body would give it no event at all."""
    events = [{"type": "transcript.text.delta", "delta": text},
              {"type": "transcript.text.done", "text": text}]
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


class Transcriptions:
    """One resource for both routes; ``task`` is "transcribe" or "translate"."""

    def __init__(self, runtime: Runtime, task: str) -> None:
        self.runtime = runtime
        self.task = task

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        limit = self.runtime.config.server.max_upload_bytes
        kind = media_type(req)
        if kind == "multipart/form-data":
            audio, fields = await read_multipart(req, limit)
        elif kind == "application/json":
            fields = await read_json(req, limit * 4 // 3 + FORM_SLACK)
            audio = audio_from_json(fields)
        else:
            raise UnsupportedMediaType("Send the audio as multipart/form-data with a 'file' "
                                       "part (or as JSON with 'input_audio').")
        name = text_field(fields, "model")
        if name is None:
            raise BadRequest("'model' is required.", param="model")
        _, physical = resolve_for(req, self.runtime, name, RECOGNITION,
                                  "cannot recognise speech")
        if self.task == "translate" and "translate" not in physical.capabilities:
            raise BadRequest(f"'{name}' cannot translate; use /v1/audio/transcriptions.",
                             param="model")
        opts = options(fields, self.task)
        if audio is None:
            raise BadRequest("'file' is required: the audio to transcribe.", param="file")
        if len(audio) > limit:
            raise PayloadTooLarge(f"The audio is over the limit of {limit} bytes.")
        samples = await anyio.to_thread.run_sync(
            functools.partial(decode_to_pcm, audio, max_seconds=MAX_AUDIO_S))
        payload = {"samples": samples, "task": self.task,
                   **{k: opts[k] for k in ("language", "prompt", "temperature", "words")
                      if opts[k] is not None}}
        _, result = await run_whole(req, self.runtime.submit(physical.id, "transcribe", payload))
        fmt = opts["response_format"]
        if opts["stream"]:
            resp.content_type = "text/event-stream"
            resp.data = transcript_events(str(result.get("text", "")).strip())
            return
        reply = render(result, fmt, task=self.task, duration=duration_s(samples),
                       words=opts["words"])
        if isinstance(reply, dict):
            resp.media = reply
        else:
            resp.content_type = CONTENT_TYPES[fmt]
            resp.text = reply
