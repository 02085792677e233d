"""The audio codec layer: uploads in every accepted format, bad uploads, streamed speech."""

from __future__ import annotations

import array
import functools
import io
import itertools
import math
import random
import re
import struct
import zlib
from pathlib import Path

import av
import pytest
from av.audio.frame import AudioFrame
from av.audio.resampler import AudioResampler
from av.audio.stream import AudioStream
from hypothesis import given, settings
from hypothesis import strategies as st

from llmux.audio.decode import ACCEPTED_FORMATS, SAMPLE_RATE, decode_to_pcm, duration_s
from llmux.audio.encode import PCM_RATE, SPEECH_FORMATS, SpeechEncoder
from llmux.errors import BadRequest

TONE_HZ = 440
SEND_ONE_OF = "Send one of: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm."

# accepted format -> (muxer, encoder) that ffmpeg makes it with
UPLOAD_RECIPES = {
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"),
    "mp4": ("mp4", "aac"),
    "mpeg": ("mpeg", "mp2"),  # MPEG-PS with MPEG-1 layer II audio
    "mpga": ("mp3", "libmp3lame"),  # an .mpga is an MP3 under another name
    "m4a": ("ipod", "aac"),
    "ogg": ("ogg", "libopus"),  # no libvorbis in PyAV's ffmpeg
    "wav": ("wav", "pcm_s16le"),
    "webm": ("webm", "libopus"),
}


@functools.cache
def tone(seconds: float, rate: int, channels: int) -> bytes:
    """A 440 Hz sine as interleaved int16 samples, a quarter of full scale."""
    samples = array.array("h")
    for i in range(int(seconds * rate)):
        value = int(8000 * math.sin(2 * math.pi * TONE_HZ * i / rate))
        samples.extend([value] * channels)
    return samples.tobytes()


@functools.cache
def upload(fmt: str, seconds: float = 1.5) -> bytes:
    """A 48 kHz stereo tone in accepted format ``fmt``, made by ffmpeg, as a client sends it."""
    muxer, codec = UPLOAD_RECIPES[fmt]
    rate = 48000
    frame = AudioFrame(format="s16", layout="stereo", samples=int(seconds * rate))
    frame.planes[0].update(tone(seconds, rate, 2))
    frame.sample_rate = rate
    out = io.BytesIO()  # mp4 and m4a need a seekable file to write their index
    with av.open(out, mode="w", format=muxer) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        assert isinstance(stream, AudioStream)
        container.start_encoding()
        ctx = stream.codec_context
        to_codec = AudioResampler(format=ctx.format, layout="stereo", rate=rate,
                                  frame_size=ctx.frame_size or None)
        for converted in [*to_codec.resample(frame), *to_codec.resample(None)]:
            container.mux(stream.encode(converted))
        container.mux(stream.encode(None))
    return out.getvalue()


def samples(pcm: bytes) -> array.array[float]:
    values = array.array("f")
    values.frombytes(pcm)
    return values


def pitch_hz(pcm: bytes) -> float:
    """The frequency of a decoded sine, from its zero crossings in the middle half."""
    values = samples(pcm)
    middle = values[len(values) // 4 : 3 * len(values) // 4]
    crossings = sum(1 for a, b in itertools.pairwise(middle) if (a < 0) != (b < 0))
    return crossings / 2 / (len(middle) / SAMPLE_RATE)


def png() -> bytes:
    """A valid 1x1 grey PNG: ffmpeg opens it, as an image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))


def not_audio(detail: str) -> str:
    return f"The uploaded file is not audio llmux can decode ({detail}). {SEND_ONE_OF}"


# -- decoding uploads ---------------------------------------------------------------------


def test_the_recipes_cover_every_accepted_format() -> None:
    assert sorted(UPLOAD_RECIPES) == sorted(ACCEPTED_FORMATS)


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_each_accepted_format_decodes_to_its_duration_and_pitch(fmt: str) -> None:
    pcm = decode_to_pcm(upload(fmt))

    # Lossy codecs add priming and padding samples (AAC: 1024, MP2: a frame).
    assert duration_s(pcm) == pytest.approx(1.5, abs=0.1)
    assert max(abs(v) for v in samples(pcm)) > 0.1
    assert pitch_hz(pcm) == pytest.approx(TONE_HZ, rel=0.02)  # so it really is 16 kHz


def test_duration_counts_float32_samples_at_16_khz() -> None:
    assert duration_s(bytes(4 * SAMPLE_RATE * 3)) == 3.0


def test_a_truncated_file_returns_what_decoded() -> None:
    whole = upload("mp3")

    pcm = decode_to_pcm(whole[: len(whole) // 2])

    assert 0.5 < duration_s(pcm) < 1.0


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        pytest.param(b"", "the file is empty", id="empty"),
        pytest.param(random.Random(0).randbytes(4096),
                     "ffmpeg could not read it: Invalid data found when processing input",
                     id="garbage"),
        pytest.param(png(), "it has no audio stream", id="png"),
        pytest.param(b"Meeting notes, Tuesday.\nAgenda: audio.\n" * 20,
                     "ffmpeg could not read it: Invalid data found when processing input",
                     id="text"),
        pytest.param(upload("wav")[:30],
                     "ffmpeg could not read it: Invalid data found when processing input",
                     id="truncated-wav-header"),
    ],
)
def test_a_file_that_is_not_audio_is_a_bad_request_on_file(data: bytes, detail: str) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_to_pcm(data)

    assert caught.value.param == "file"
    assert caught.value.message == not_audio(detail)


def test_audio_after_a_decoding_error_is_dropped_not_the_whole_file() -> None:
    """Two MP3 files joined: ffmpeg stops at the second one's tag with an error."""
    mp3 = upload("mp3")

    assert duration_s(decode_to_pcm(mp3 + mp3)) >= 1.4


def test_the_first_of_two_audio_streams_is_decoded() -> None:
    """A recording with a second track (a commentary, another microphone)."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        streams = [container.add_stream("aac", rate=16000, layout="mono") for _ in range(2)]
        container.start_encoding()
        for stream, hz in zip(streams, (TONE_HZ, 2 * TONE_HZ), strict=True):
            assert isinstance(stream, AudioStream)
            pcm = array.array("h", (int(8000 * math.sin(2 * math.pi * hz * i / 16000))
                                    for i in range(16000)))
            frame = AudioFrame(format="s16", layout="mono", samples=16000)
            frame.planes[0].update(pcm.tobytes())
            frame.sample_rate = 16000
            to_codec = AudioResampler(format="fltp", layout="mono", rate=16000,
                                      frame_size=1024)
            for converted in [*to_codec.resample(frame), *to_codec.resample(None)]:
                container.mux(stream.encode(converted))
            container.mux(stream.encode(None))

    assert pitch_hz(decode_to_pcm(out.getvalue())) == pytest.approx(TONE_HZ, rel=0.02)


def test_audio_longer_than_max_seconds_is_a_bad_request() -> None:
    with pytest.raises(BadRequest) as caught:
        decode_to_pcm(upload("wav"), max_seconds=1)

    assert caught.value.param == "file"
    assert caught.value.message == (
        "The uploaded audio is longer than the limit of 1 s; send a shorter recording or split it."
    )


def test_audio_within_max_seconds_decodes() -> None:
    assert duration_s(decode_to_pcm(upload("wav"), max_seconds=2)) == pytest.approx(1.5)


def test_an_upload_cannot_make_ffmpeg_open_other_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret.wav").write_bytes(upload("wav"))
    monkeypatch.chdir(tmp_path)  # the concat demuxer resolves names against the cwd

    with pytest.raises(BadRequest) as caught:
        decode_to_pcm(b"ffconcat version 1.0\nfile secret.wav\n")

    assert caught.value.message == not_audio("ffmpeg could not read it: Invalid argument")


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_bad_request_only(data: bytes) -> None:
    try:
        pcm = decode_to_pcm(data, max_seconds=30)
    except BadRequest as exc:
        assert exc.param == "file"
    else:
        assert pcm
        assert len(pcm) % 4 == 0


@settings(max_examples=50, deadline=None)
@given(fmt=st.sampled_from(ACCEPTED_FORMATS), cut=st.integers(min_value=0),
       flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=20))
def test_damaged_audio_decodes_or_raises_bad_request_only(
    fmt: str, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(upload(fmt))
    for at, value in flips:
        data[at % len(data)] = value
    try:
        decode_to_pcm(bytes(data[: 1 + cut % len(data)]))
    except BadRequest as exc:
        assert exc.param == "file"


def wav_of_no_samples() -> bytes:
    """A canonical 44-byte WAV header whose data chunk is empty."""
    fmt = struct.pack("<HHIIHH", 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", 0))


def test_a_file_of_no_samples_is_a_bad_request_on_file() -> None:
    with pytest.raises(BadRequest) as caught:
        decode_to_pcm(wav_of_no_samples())

    assert caught.value.param == "file"
    assert caught.value.message == not_audio("no audio samples could be decoded")


@functools.cache
def encoded(muxer: str, codec: str, seconds: float, rate: int, layout: str,
            hz: int = TONE_HZ) -> bytes:
    """A tone of ``hz`` as ``codec`` in ``muxer``, written forward (as a stream is)."""
    channels = 1 if layout == "mono" else 2
    n = int(seconds * rate)
    pcm = array.array("h")
    for i in range(n):
        pcm.extend([int(8000 * math.sin(2 * math.pi * hz * i / rate))] * channels)
    frame = AudioFrame(format="s16", layout=layout, samples=n)
    frame.planes[0].update(pcm.tobytes())
    frame.sample_rate = rate
    out = io.BytesIO()
    with av.open(out, mode="w", format=muxer) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        assert isinstance(stream, AudioStream)
        container.start_encoding()
        ctx = stream.codec_context
        to_codec = AudioResampler(format=ctx.format, layout=layout, rate=rate,
                                  frame_size=ctx.frame_size or None)
        for converted in [*to_codec.resample(frame), *to_codec.resample(None)]:
            container.mux(stream.encode(converted))
        container.mux(stream.encode(None))
    return out.getvalue()


@pytest.mark.parametrize(("rate", "layout"), [(48000, "stereo"), (44100, "mono"),
                                              (22050, "stereo"), (16000, "mono"),
                                              (8000, "mono")])
def test_a_wav_decodes_to_exactly_its_samples_at_16_khz(rate: int, layout: str) -> None:
    """No sample is lost in the resampler: its buffered tail is flushed at the end."""
    pcm = decode_to_pcm(encoded("wav", "pcm_s16le", 1.5, rate, layout))

    assert len(pcm) == 4 * int(1.5 * SAMPLE_RATE)
    assert pitch_hz(pcm) == pytest.approx(TONE_HZ, rel=0.02)


def test_audio_exactly_max_seconds_long_decodes() -> None:
    wav = encoded("wav", "pcm_s16le", 1.0, 44100, "mono")

    assert duration_s(decode_to_pcm(wav, max_seconds=1)) == 1.0
    with pytest.raises(BadRequest, match=re.escape("longer than the limit of 0.999 s")):
        decode_to_pcm(wav, max_seconds=0.999)


@functools.cache
def silent_flac(seconds: int, rate: int = 8000) -> bytes:
    """Minutes of digital silence in a few kilobytes: FLAC codes it as constants."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        assert isinstance(stream, AudioStream)
        container.start_encoding()
        size = stream.codec_context.frame_size or 4608
        for i in range(seconds * rate // size):
            frame = AudioFrame(format="s16", layout="mono", samples=size)
            frame.planes[0].update(bytes(2 * size))
            frame.sample_rate, frame.pts = rate, i * size
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


def test_a_small_file_of_long_audio_is_refused_before_it_is_all_decoded() -> None:
    """The limit is checked while decoding: two minutes of samples (7.7 MB) are never held."""
    import tracemalloc

    flac = silent_flac(120)
    assert len(flac) < 50_000
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match="longer than the limit of 1 s"):
            decode_to_pcm(flac, max_seconds=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 1_000_000


def without_id3(mp3: bytes) -> bytes:
    assert mp3.startswith(b"ID3")
    size = int.from_bytes(bytes(b & 0x7F for b in mp3[6:10]), "big")
    return mp3[10 + size :]


@pytest.mark.parametrize(("muxer", "codec"), [("mp3", "libmp3lame"), ("adts", "aac")])
def test_a_stream_that_changes_rate_and_layout_midway_decodes_whole(muxer: str,
                                                                    codec: str) -> None:
    """Joined MP3s or ADTS: 48 kHz stereo, then 22.05 kHz mono at another pitch."""
    first = encoded(muxer, codec, 1.0, 48000, "stereo")
    second = encoded(muxer, codec, 1.0, 22050, "mono", hz=2 * TONE_HZ)
    if muxer == "mp3":
        second = without_id3(second)

    pcm = decode_to_pcm(first + second)

    assert duration_s(pcm) == pytest.approx(2.0, abs=0.15)
    half = 4 * SAMPLE_RATE
    assert pitch_hz(pcm[:half]) == pytest.approx(TONE_HZ, rel=0.03)
    assert pitch_hz(pcm[-half:]) == pytest.approx(2 * TONE_HZ, rel=0.1)


def test_no_sample_is_lost_where_the_rate_changes() -> None:
    """ADTS has no priming to skip: joined, it decodes to what its parts decode to."""
    first = encoded("adts", "aac", 1.0, 48000, "stereo")
    second = encoded("adts", "aac", 1.0, 22050, "mono")

    joined = decode_to_pcm(first + second)

    assert len(joined) == len(decode_to_pcm(first)) + len(decode_to_pcm(second))


# -- encoding speech ----------------------------------------------------------------------

SPEECH_RATE = 22050


def encode_in_chunks(fmt: str, seconds: float = 2.0, chunk_s: float = 0.1) -> list[bytes]:
    """What ``feed()`` returns for each chunk of a tone, then what ``finish()`` returns."""
    pcm = tone(seconds, SPEECH_RATE, 1)
    step = 2 * int(chunk_s * SPEECH_RATE)
    encoder = SpeechEncoder(fmt, SPEECH_RATE)
    outputs = [encoder.feed(pcm[i : i + step]) for i in range(0, len(pcm), step)]
    return [*outputs, encoder.finish()]


@pytest.mark.parametrize("fmt", sorted(set(SPEECH_FORMATS) - {"pcm"}))
def test_each_speech_format_decodes_back_to_its_duration(fmt: str) -> None:
    pcm = decode_to_pcm(b"".join(encode_in_chunks(fmt)))

    # MP3 and ADTS carry no priming information, so their padding stays in.
    assert duration_s(pcm) == pytest.approx(2.0, abs=0.15)
    assert pitch_hz(pcm) == pytest.approx(TONE_HZ, rel=0.02)


def test_pcm_is_int16_at_24_khz() -> None:
    out = b"".join(encode_in_chunks("pcm"))

    assert PCM_RATE == 24000  # OpenAI's
    assert len(out) == pytest.approx(2 * PCM_RATE * 2.0, abs=2 * PCM_RATE * 0.01)
    assert len(out) % 2 == 0


@pytest.mark.parametrize("fmt", sorted(SPEECH_FORMATS))
def test_each_speech_format_streams_while_fed(fmt: str) -> None:
    outputs = encode_in_chunks(fmt)

    # Not just a header up front: the second second of audio comes out as it is fed.
    assert sum(len(chunk) for chunk in outputs[:10]) > 0
    assert sum(len(chunk) for chunk in outputs[10:20]) > 0


def test_streamed_wav_has_placeholder_sizes() -> None:
    wav = b"".join(encode_in_chunks("wav"))

    assert wav.startswith(b"RIFF\xff\xff\xff\xffWAVE")


def test_chunks_may_split_a_sample() -> None:
    pcm = tone(1.0, SPEECH_RATE, 1)
    even, odd = SpeechEncoder("wav", SPEECH_RATE), SpeechEncoder("wav", SPEECH_RATE)

    whole = even.feed(pcm) + even.finish()
    pieces = b"".join(odd.feed(pcm[i : i + 1001]) for i in range(0, len(pcm), 1001))

    assert pieces + odd.finish() == whole


@pytest.mark.parametrize(("fmt", "content_type"), sorted(SPEECH_FORMATS.items()))
def test_each_speech_format_has_its_content_type(fmt: str, content_type: str) -> None:
    assert SpeechEncoder(fmt, SPEECH_RATE).content_type == content_type


def test_an_unknown_speech_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown speech format 'ogg'"):
        SpeechEncoder("ogg", SPEECH_RATE)


@pytest.mark.parametrize("fmt", sorted(SPEECH_FORMATS))
def test_speech_of_no_samples_is_a_tenth_of_a_second_of_silence(fmt: str) -> None:
    """Text with nothing to pronounce ("...") gives no samples; a file of no frames
    (a bare ID3 tag for mp3, nothing for aac) is no file a player takes."""
    out = SpeechEncoder(fmt, SPEECH_RATE).finish()
    if fmt == "pcm":
        assert out == bytes(2 * PCM_RATE // 10)
        return
    pcm = decode_to_pcm(out)
    assert 0.05 <= duration_s(pcm) <= 0.25  # aac adds its priming and last frame
    assert not any(pcm[::97])


@pytest.mark.parametrize("fmt", sorted(SPEECH_FORMATS))
def test_speech_shorter_than_a_codec_frame_gets_no_silence_added(fmt: str) -> None:
    """flac holds such a chunk back until finish: it was once taken for no speech."""
    encoder = SpeechEncoder(fmt, SPEECH_RATE)
    out = encoder.feed(tone(0.05, SPEECH_RATE, 1)) + encoder.finish()
    if fmt == "pcm":
        assert len(out) == pytest.approx(2 * PCM_RATE * 0.05, abs=4)
    else:  # mp3 and aac add a frame or so of padding
        padding = {"aac": 0.1, "mp3": 0.06}.get(fmt, 0.001)
        assert duration_s(decode_to_pcm(out)) == pytest.approx(0.05, abs=padding)


@pytest.mark.parametrize("rate", [0, -22050])
def test_a_rate_that_is_not_positive_is_a_value_error(rate: int) -> None:
    with pytest.raises(ValueError, match=f"sample_rate must be positive, got {rate}"):
        SpeechEncoder("wav", rate)


def encoded_rate(out: bytes) -> int:
    """The rate a speech file says it was encoded at (for Opus: its input rate)."""
    at = out.find(b"OpusHead")
    if at >= 0:
        return int.from_bytes(out[at + 12 : at + 16], "little")
    with av.open(io.BytesIO(out)) as container:
        return container.streams.audio[0].rate


@pytest.mark.parametrize(("fmt", "rate", "encoded_at"), [
    ("mp3", 22050, 22050), ("mp3", 7000, 8000), ("mp3", 96000, 48000),
    ("opus", 22050, 24000), ("opus", 11025, 12000), ("opus", 96000, 48000),
    ("aac", 7000, 7350), ("flac", 7000, 7000), ("wav", 96000, 96000),
])
def test_speech_is_encoded_at_its_rate_or_the_next_higher_one_the_codec_takes(
    fmt: str, rate: int, encoded_at: int
) -> None:
    encoder = SpeechEncoder(fmt, rate)
    out = encoder.feed(tone(0.2, rate, 1)) + encoder.finish()

    assert encoded_rate(out) == encoded_at


@pytest.mark.parametrize(("fmt", "low", "high"), [
    ("mp3", 56_000, 72_000), ("aac", 48_000, 72_000),
    ("opus", 32_000, 48_000),  # 32 kb/s, and a page header every 100 ms
])
def test_compressed_speech_is_sent_at_speech_bit_rates(fmt: str, low: int, high: int) -> None:
    bits_per_s = 8 * len(b"".join(encode_in_chunks(fmt))) / 2.0

    assert low < bits_per_s < high


def test_a_finished_encoder_refuses_more_audio() -> None:
    encoder = SpeechEncoder("mp3", SPEECH_RATE)
    encoder.finish()

    with pytest.raises(ValueError, match="finished"):
        encoder.feed(tone(0.1, SPEECH_RATE, 1))


def test_times_past_the_end_of_the_clip_are_cut_to_it() -> None:
    """Whisper ends a last segment on its window's grid (7.0 s for 6.4 s of audio)."""
    from llmux.audio.transcript import render

    result = {"text": "a b", "segments": [{"start": 0.0, "end": 3.0, "text": "a"},
                                          {"start": 6.0, "end": 7.0, "text": " b"}],
              "words": [{"word": "b", "start": 6.2, "end": 7.0}]}
    verbose = render(result, "verbose_json", task="transcribe", duration=6.409, words=True)
    assert isinstance(verbose, dict)
    assert [(s["start"], s["end"]) for s in verbose["segments"]] == [(0.0, 3.0), (6.0, 6.409)]
    assert verbose["words"] == [{"word": "b", "start": 6.2, "end": 6.409}]
    srt = render(result, "srt", task="transcribe", duration=6.409)
    assert isinstance(srt, str) and srt.endswith("00:00:06,000 --> 00:00:06,409\nb\n")


TWO_SEGMENTS = {"text": "a b", "segments": [{"start": 0.0, "end": 3.0, "text": "a"},
                                             {"start": 6.0, "end": 7.0, "text": " b"}]}


@pytest.mark.parametrize(("fmt", "expected"), [
    ("srt", "1\n00:00:00,000 --> 00:00:03,000\na\n\n2\n00:00:06,000 --> 00:00:06,409\nb\n"),
    ("vtt", "WEBVTT\n\n00:00:00.000 --> 00:00:03.000\na\n\n00:00:06.000 --> 00:00:06.409\nb\n"),
])
def test_subtitle_cues_are_numbered_and_parted_by_a_blank_line(fmt: str, expected: str) -> None:
    from llmux.audio.transcript import render

    assert render(TWO_SEGMENTS, fmt, task="transcribe", duration=6.409) == expected


@pytest.mark.parametrize(("fmt", "expected"), [
    ("srt", "1\n00:00:01,001 --> 00:00:01,005\na\n\n2\n00:59:59,999 --> 01:00:00,000\nb\n\n"
            "3\n01:02:03,042 --> 10:00:00,000\nc\n"),
    ("vtt", "WEBVTT\n\n00:00:01.001 --> 00:00:01.005\na\n\n00:59:59.999 --> 01:00:00.000\nb\n\n"
            "01:02:03.042 --> 10:00:00.000\nc\n"),
])
def test_subtitle_times_count_hours_minutes_seconds_and_rounded_milliseconds(
    fmt: str, expected: str
) -> None:
    from llmux.audio.transcript import render

    result = {"text": "a b c", "segments": [
        {"start": 1.001, "end": 1.005, "text": "a"},  # 1.005 * 1000 is 1004.999...
        {"start": 3599.9994, "end": 3599.9996, "text": "b"},  # rounds up to the hour
        {"start": 3723.0416, "end": 36000.0, "text": "c"}]}
    assert render(result, fmt, task="transcribe", duration=36000.0) == expected


def test_times_before_the_clip_or_ending_before_they_start_are_put_in_order() -> None:
    from llmux.audio.transcript import render

    result = {"text": "a b", "segments": [{"start": -0.3, "end": 1.0, "text": "a"},
                                          {"start": 2.5, "end": 2.0, "text": "b"}],
              "words": [{"word": "a", "start": -0.1, "end": -0.05},
                        {"word": "b", "start": 2.5, "end": 9.0}]}
    verbose = render(result, "verbose_json", task="transcribe", duration=4.0, words=True)
    assert isinstance(verbose, dict)
    assert [(s["start"], s["end"]) for s in verbose["segments"]] == [(0.0, 1.0), (2.5, 2.5)]
    assert verbose["words"] == [{"word": "a", "start": 0.0, "end": 0.0},
                                {"word": "b", "start": 2.5, "end": 4.0}]


def test_verbose_json_gives_the_duration_to_the_millisecond() -> None:
    from llmux.audio.transcript import render

    verbose = render({"text": "a"}, "verbose_json", task="translate", duration=6.40912)
    assert isinstance(verbose, dict)
    assert (verbose["task"], verbose["duration"]) == ("translate", 6.409)
    assert [(s["start"], s["end"]) for s in verbose["segments"]] == [(0.0, 6.409)]


FIGURES = {"seek": 3000, "tokens": [50364, 440, 50530], "temperature": 0.2,
           "avg_logprob": -0.29, "compression_ratio": 1.24, "no_speech_prob": 0.01}


def test_verbose_json_passes_the_backends_segment_figures_through() -> None:
    from llmux.audio.transcript import render

    result = {"text": "a", "language": "en",
              "segments": [{"start": 0.0, "end": 1.0, "text": " a", **FIGURES}]}
    verbose = render(result, "verbose_json", task="transcribe", duration=1.0)
    assert isinstance(verbose, dict)
    assert verbose["segments"] == [{"id": 0, "start": 0.0, "end": 1.0, "text": " a",
                                    **FIGURES}]


def test_figures_a_backend_does_not_know_are_neutral_and_typed_as_the_sdk_declares() -> None:
    from openai.types.audio import TranscriptionVerbose

    from llmux.audio.transcript import render

    text = "again and again " * 8
    verbose = render({"text": text}, "verbose_json", task="transcribe", duration=2.0)
    assert isinstance(verbose, dict)
    (segment,) = verbose["segments"]
    assert {k: segment[k] for k in FIGURES if k != "compression_ratio"} == {
        "seek": 0, "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
        "no_speech_prob": 0.0}
    # Whisper's own measure of the text: gzip finds the repetition
    raw = text.strip().encode()
    assert segment["compression_ratio"] == len(raw) / len(zlib.compress(raw)) > 2.4
    parsed = TranscriptionVerbose.model_validate(verbose)
    assert parsed.segments is not None
    assert all(value is not None for value in dict(parsed.segments[0]).values())


@pytest.mark.parametrize(("reported", "named"), [
    ({"language": "en"}, "english"), ({"language": "yue"}, "cantonese"),
    ({"language": "jw"}, "javanese"), ({}, "english"),
    ({"language": "xx"}, "xx"),  # a model that is not Whisper: its code as it said it
])
def test_verbose_json_names_the_language_as_openai_does(reported: dict[str, str],
                                                        named: str) -> None:
    from llmux.audio.transcript import render

    verbose = render({"text": "a", **reported}, "verbose_json", task="transcribe",
                     duration=1.0)
    assert isinstance(verbose, dict) and verbose["language"] == named


def test_the_language_table_holds_every_language_whisper_knows() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from llmux.audio.languages import WHISPER_LANGUAGES

    assert set(WHISPER_LANGUAGES) == set(_LANGUAGE_CODES)
    assert dict(WHISPER_LANGUAGES) == LANGUAGES  # and names each as Whisper does
