"""Speech PCM to the files ``/v1/audio/speech`` returns, encoded while it streams.

A TTS backend yields mono int16 PCM a chunk at a time; ``SpeechEncoder`` turns each
chunk into the bytes of the requested format that are ready now, so the client
hears the first sentence before the last is synthesised. The muxer writes into a
non-seekable sink, which makes it write strictly forward: whatever it wrote can be
sent at once. The price is that headers a muxer would patch at the end keep
placeholders (a WAV's sizes, MP3's Xing frame, FLAC's total samples), which
decoders accept and which is what OpenAI sends too.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.codec import Codec

# PERF: PyAV is imported where it is used: its ~90 ms would otherwise delay the
# server's start, though only speech requests need it.

__all__ = ["PCM_RATE", "SPEECH_FORMATS", "SpeechEncoder"]

SPEECH_FORMATS: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
"""OpenAI's ``response_format`` values and the content type each is sent with."""

PCM_RATE: Final = 24000
"""OpenAI's ``pcm`` is raw int16 little-endian mono at 24 kHz, whatever the model made."""


@attrs.frozen(kw_only=True)
class _Recipe:
    """How one response format is made: muxer, encoder and their settings."""

    muxer: str
    codec: str
    bit_rate: int | None = None
    rate: int | None = None  # None: the input's rate, or the nearest the codec takes
    muxer_options: dict[str, str] = attrs.field(factory=dict)


_RECIPES: Final = {
    "mp3": _Recipe(muxer="mp3", codec="libmp3lame", bit_rate=64_000),
    # NOTE: the ogg muxer holds packets until a page fills (seconds of speech at
    # 32 kb/s); capping pages at 100 ms (in microseconds) lets opus stream.
    "opus": _Recipe(muxer="ogg", codec="libopus", bit_rate=32_000,
                    muxer_options={"page_duration": "100000"}),
    "aac": _Recipe(muxer="adts", codec="aac", bit_rate=64_000),
    "flac": _Recipe(muxer="flac", codec="flac"),
    "wav": _Recipe(muxer="wav", codec="pcm_s16le"),
    "pcm": _Recipe(muxer="s16le", codec="pcm_s16le", rate=PCM_RATE),
}


class SpeechEncoder:
    """Encodes mono int16 little-endian PCM into one of ``SPEECH_FORMATS``, streaming.

    Every byte ``feed()`` and ``finish()`` return belongs to the output, in order:
    their concatenation is a complete file. ``feed()`` may return ``b""`` while the
    codec buffers (flac, aac and opus hold a frame or two). Chunks need not end on
    a sample boundary. After ``finish()`` the encoder is spent; using it again
    raises ``ValueError``. An encoder dropped before ``finish()`` (the client went
    away) holds nothing that needs closing beyond memory.

    Encoding is blocking CPU work: per second of speech about 12 ms for mp3, 7 for
    opus and aac, under 2 for flac, wav and pcm. On an event loop, run it in a thread.
    """

    def __init__(self, fmt: str, sample_rate: int) -> None:
        """Prepare to encode PCM at ``sample_rate`` Hz as ``fmt``.

        Raises:
            ValueError: ``fmt`` is not one of ``SPEECH_FORMATS``, or the rate is not positive.
        """
        import av
        from av.audio.resampler import AudioResampler
        from av.audio.stream import AudioStream
        from av.codec import Capabilities, Codec

        recipe = _RECIPES.get(fmt)
        if recipe is None:
            raise ValueError(
                f"unknown speech format {fmt!r}; expected one of {', '.join(SPEECH_FORMATS)}"
            )
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self._content_type = SPEECH_FORMATS[fmt]
        self._in_rate = sample_rate
        self._sink = _Sink()
        self._container = av.open(
            self._sink, mode="w", format=recipe.muxer, container_options=recipe.muxer_options
        )
        codec = Codec(recipe.codec, "w")
        rate = recipe.rate or _nearest_rate(codec, sample_rate)
        stream = self._container.add_stream(recipe.codec, rate=rate, layout="mono")
        if not isinstance(stream, AudioStream):
            raise TypeError(f"{recipe.codec} is not an audio codec")
        if recipe.bit_rate is not None:
            stream.codec_context.bit_rate = recipe.bit_rate
        # Write the header now: it opens the codec, whose frame size and sample
        # format are only final once open, and makes even silence a valid file.
        self._container.start_encoding()
        ctx = stream.codec_context
        fixed_size = not codec.capabilities & Capabilities.variable_frame_size
        self._stream = stream
        self._to_codec = AudioResampler(
            format=ctx.format, layout="mono", rate=rate,
            frame_size=ctx.frame_size if fixed_size and ctx.frame_size else None,
        )
        self._time_base = Fraction(1, rate)
        self._pts = 0
        self._carry = b""  # an odd byte: half a sample, completed by the next chunk
        self._samples = 0  # fed so far (the codec may hold them back: flac's frames)
        self._finished = False

    @property
    def content_type(self) -> str:
        """The ``Content-Type`` to send the output under."""
        return self._content_type

    def feed(self, pcm: bytes) -> bytes:
        """Encode a chunk of PCM; returns the output bytes ready so far (maybe none).

        Raises:
            ValueError: the encoder is finished.
        """
        self._check_open()
        data = self._carry + pcm
        whole = len(data) - len(data) % 2
        self._carry = data[whole:]
        if whole:
            self._samples += whole // 2
            self._encode(self._to_codec.resample(self._frame(data[:whole])))
        return self._sink.drain()

    def finish(self) -> bytes:
        """Flush the codec and muxer; returns the rest of the file.

        A half sample left over from ``feed()`` is dropped. Speech of no samples (text
        with nothing to pronounce: "...") becomes a tenth of a second of silence: an
        mp3 or aac of no frames is no file a player takes, and Open WebUI caches it.

        Raises:
            ValueError: the encoder is already finished.
        """
        self._check_open()
        head = b"" if self._samples else self.feed(bytes(2 * (self._in_rate // 10)))
        self._finished = True
        self._encode(self._to_codec.resample(None))
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return head + self._sink.drain()

    def _frame(self, pcm: bytes) -> AudioFrame:
        from av.audio.frame import AudioFrame

        frame = AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        # NOTE: "s16" is native-endian; llmux runs on little-endian hosts only.
        frame.planes[0].update(pcm)
        frame.sample_rate = self._in_rate
        return frame

    def _encode(self, frames: list[AudioFrame]) -> None:
        for frame in frames:
            # Count time ourselves, in samples at the codec's rate: the muxer needs
            # gapless, increasing timestamps, whatever the resampler's delay.
            frame.pts = self._pts
            frame.time_base = self._time_base
            self._pts += frame.samples
            self._container.mux(self._stream.encode(frame))

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError("this SpeechEncoder is finished; make a new one")


class _Sink:
    """A write-only, non-seekable file for PyAV to mux into.

    PyAV treats a file object as seekable only if it has ``seek`` and ``tell``;
    without them it tells the muxer so, and the muxer never goes back to patch.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(data)
        return len(data)

    def seekable(self) -> bool:
        return False

    def drain(self) -> bytes:
        """Everything written since the last drain."""
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


def _nearest_rate(codec: Codec, wanted: int) -> int:
    """``wanted`` if the codec takes it, else the next higher rate it takes (or its highest)."""
    rates = codec.audio_rates
    if not rates or wanted in rates:
        return wanted
    return min((r for r in rates if r >= wanted), default=max(rates))
