"""Uploaded audio to the one shape speech models read: mono float32 at 16 kHz.

Clients of ``/v1/audio/transcriptions`` send ``application/octet-stream`` under
names like ``<uuid>.bin``, so the container is recognised from the bytes alone,
never from a name or a content type. Whatever is wrong with the upload becomes a
``BadRequest`` on ``file`` that names the formats we take; no PyAV error escapes.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Final

from llmux.errors import BadRequest

if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.audio.resampler import AudioResampler
    from av.audio.stream import AudioStream
    from av.container import InputContainer

# PERF: PyAV is imported where it is used: its ~90 ms would otherwise delay the
# server's start, though only transcription requests need it.

__all__ = ["ACCEPTED_FORMATS", "SAMPLE_RATE", "decode_to_pcm", "duration_s"]

ACCEPTED_FORMATS: tuple[str, ...] = (
    "flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm",
)
"""What OpenAI documents for transcriptions; ffmpeg reads more, we promise these."""

SAMPLE_RATE: Final = 16000
"""Samples per second of ``decode_to_pcm``'s output (what Whisper-style models read)."""

_BYTES_PER_SAMPLE: Final = 4  # float32

# NOTE: some demuxers (concat, hls, ...) open further files or URLs named inside the
# upload; a client could make us read local files or fetch from the network. No
# protocol is named "none", so every nested open fails and only our bytes are read.
_INPUT_OPTIONS: Final = {"protocol_whitelist": "none"}


def _decode_errors() -> tuple[type[Exception], ...]:
    """What PyAV raises on bad input: FFmpegError, a frame the resampler rejects
    (ValueError), undecodable tag text (UnicodeDecodeError, a ValueError), a short read."""
    from av.error import FFmpegError

    return (FFmpegError, ValueError, EOFError)


def decode_to_pcm(data: bytes, *, max_seconds: float | None = None) -> bytes:
    """The first audio stream of ``data``, as mono float32 little-endian at 16 kHz.

    Decoding stops at the first error; what decoded before it is returned, so a
    truncated upload still transcribes. ``max_seconds`` is checked while decoding,
    so a small file that expands to hours of audio costs at most the limit; without
    it, memory grows with the audio's length, however small the upload.

    Raises:
        BadRequest: (param ``file``) the bytes are empty, not a container ffmpeg
            reads, hold no audio stream, decode to no samples, or are longer than
            ``max_seconds``.
    """
    import av

    if not data:
        raise _not_audio("the file is empty")
    try:
        container = av.open(
            io.BytesIO(data), mode="r", container_options=_INPUT_OPTIONS,
            metadata_errors="replace",
        )
    except _decode_errors() as exc:
        raise _not_audio(_describe("read", exc)) from exc
    with container:
        if not container.streams.audio:
            raise _not_audio("it has no audio stream")
        pcm = _decode(container, container.streams.audio[0], max_seconds)
    if not pcm:
        raise _not_audio("no audio samples could be decoded")
    return pcm


def duration_s(pcm: bytes) -> float:
    """Seconds of audio in ``decode_to_pcm`` output."""
    return len(pcm) / _BYTES_PER_SAMPLE / SAMPLE_RATE


def _decode(container: InputContainer, stream: AudioStream, max_seconds: float | None) -> bytes:
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    out = bytearray()
    to_mono = _Mono16k()
    try:
        for frame in container.decode(stream):
            for chunk in to_mono.convert(frame):
                out += chunk
                _check_length(len(out), limit, max_seconds)
        for chunk in to_mono.flush():
            out += chunk
    except _decode_errors() as exc:
        if not out:
            raise _not_audio(_describe("decode", exc)) from exc
        # NOTE: a truncated or partly corrupt file; keep what decoded before the damage.
    _check_length(len(out), limit, max_seconds)
    return bytes(out)


class _Mono16k:
    """Resamples decoded frames to mono float32 at 16 kHz.

    A resampler is fixed to the format of its first frame, but a stream may change
    rate or layout midway (MP3 frames of two rates joined, AAC with SBR): then the old
    one is flushed and a new one takes over.
    """

    def __init__(self) -> None:
        self._resampler = _new_resampler()
        self._source: tuple[str, str, int] | None = None

    def convert(self, frame: AudioFrame) -> list[bytes]:
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        chunks = []
        if source != self._source:
            chunks = self.flush()
            self._resampler = _new_resampler()
            self._source = source
        return chunks + [_samples(f) for f in self._resampler.resample(frame)]

    def flush(self) -> list[bytes]:
        return [_samples(f) for f in self._resampler.resample(None)]


def _new_resampler() -> AudioResampler:
    from av.audio.resampler import AudioResampler

    return AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)


def _samples(frame: AudioFrame) -> bytes:
    # NOTE: "flt" is native-endian; llmux runs on little-endian hosts (x86-64, arm64).
    # The plane may be padded past the last sample, so cut it to size.
    return bytes(frame.planes[0])[: frame.samples * _BYTES_PER_SAMPLE]


def _check_length(n_bytes: int, limit: int | None, max_seconds: float | None) -> None:
    if limit is not None and n_bytes // _BYTES_PER_SAMPLE > limit:
        raise BadRequest(
            f"The uploaded audio is longer than the limit of {max_seconds:g} s; "
            "send a shorter recording or split it.",
            param="file",
        )


def _describe(verb: str, exc: Exception) -> str:
    """``ffmpeg could not read it: Invalid data found ...``, without errno or file name."""
    from av.error import FFmpegError

    reason = exc.strerror if isinstance(exc, FFmpegError) and exc.strerror else str(exc)
    return f"ffmpeg could not {verb} it: {reason}"


def _not_audio(detail: str) -> BadRequest:
    return BadRequest(
        f"The uploaded file is not audio llmux can decode ({detail}). "
        f"Send one of: {', '.join(ACCEPTED_FORMATS)}.",
        param="file",
    )
