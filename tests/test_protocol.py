"""The worker wire format, without a process: round trips, framing, rejection."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.workers import protocol
from llmux.workers.protocol import (
    FRAME_TYPES,
    MAX_FRAME_BYTES,
    Cancel,
    Chunk,
    Done,
    Failed,
    Frame,
    FrameDecoder,
    Hello,
    Infer,
    Load,
    Loaded,
    LoadFailed,
    Progress,
    ProtocolError,
    Unload,
    encode,
)

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text() | st.binary()
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
maps = st.dictionaries(st.text(), values, max_size=5)

frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, pid=ints),
    st.builds(Progress, fraction=st.floats(allow_nan=False), message=st.text()),
    st.builds(Loaded, reported_bytes=st.none() | ints, info=maps),
    st.builds(LoadFailed, message=st.text()),
    st.builds(Chunk, id=ints, data=maps),
    st.builds(Done, id=ints, data=maps),
    st.builds(Failed, id=ints, message=st.text()),
    st.builds(Failed, id=ints, message=st.text(), kind=st.just("invalid_request"),
              param=st.none() | st.text(), code=st.none() | st.text()),
    st.builds(Load, spec=maps),
    st.builds(Infer, id=ints, op=st.text(), payload=maps),
    st.builds(Cancel, id=ints),
    st.just(Unload()),
)

ONE_OF_EACH: list[Frame] = [
    Hello(pid=41),
    Progress(fraction=0.5, message="loading"),
    Loaded(reported_bytes=1 << 30, info={"context_length": 4096, "voices": ["a"]}),
    Loaded(reported_bytes=None, info={}),
    LoadFailed(message="no such file"),
    Chunk(id=1, data={"text": "Hello "}),
    Done(id=1, data={"finish_reason": "stop", "usage": {"prompt_tokens": 3}}),
    Failed(id=2, message="ValueError: bad op"),
    Failed(id=2, message="The prompt is too long.", kind="invalid_request",
           code="context_length_exceeded"),
    Failed(id=2, message="logit_bias token 9 is not in the vocabulary.",
           kind="invalid_request", param="logit_bias"),
    Load(spec={"backend": "fake", "options": {"footprint": "1MB"}}),
    Infer(id=3, op="transcribe", payload={"samples": b"\x00\x01\xff", "language": None}),
    Cancel(id=3),
    Unload(),
]


def raw_frame(body: object) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


def test_examples_cover_every_frame_type() -> None:
    assert {type(f) for f in ONE_OF_EACH} == set(FRAME_TYPES.values())


@given(frames)
def test_every_frame_survives_a_round_trip(frame: Frame) -> None:
    assert FrameDecoder().feed(encode(frame)) == [frame]


@given(st.lists(frames, max_size=5), st.data())
def test_frames_decode_from_arbitrary_pieces(batch: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(encode(f) for f in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        decoded += decoder.feed(wire[start:end])
    assert decoded == batch
    assert decoder.pending_bytes == 0


def test_stream_decodes_at_every_split_point() -> None:
    wire = b"".join(encode(f) for f in ONE_OF_EACH)
    for split in range(len(wire) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(wire[:split]) + decoder.feed(wire[split:]) == ONE_OF_EACH


def test_stream_decodes_byte_by_byte() -> None:
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    for byte in b"".join(encode(f) for f in ONE_OF_EACH):
        decoded += decoder.feed(bytes([byte]))
    assert decoded == ONE_OF_EACH


def test_bytes_stay_bytes_and_strings_stay_strings() -> None:
    payload = {"samples": b"\x00\x80\xff", "nested": [{"png": b"\x89PNG"}], "text": "hi"}
    (frame,) = FrameDecoder().feed(encode(Infer(id=1, op="speech", payload=payload)))
    assert isinstance(frame, Infer)
    assert type(frame.payload["samples"]) is bytes
    assert type(frame.payload["nested"][0]["png"]) is bytes
    assert type(frame.payload["text"]) is str
    assert frame.payload == payload


def test_maps_keyed_by_numbers_survive_a_round_trip() -> None:
    frame = Done(id=1, data={"top_logprobs": {17: -0.5, 4: -1.25}})
    assert FrameDecoder().feed(encode(frame)) == [frame]


def test_oversize_length_is_rejected_before_the_body_arrives() -> None:
    with pytest.raises(ProtocolError, match=f"exceeds the {MAX_FRAME_BYTES} byte limit"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_BYTES + 1))


def test_decoder_limit_is_configurable() -> None:
    with pytest.raises(ProtocolError, match="frame length 11 exceeds the 10 byte limit"):
        FrameDecoder(max_frame_bytes=10).feed(struct.pack(">I", 11))


def test_a_frame_of_exactly_the_limit_is_decoded() -> None:
    wire = encode(Chunk(id=1, data={"pcm": bytes(100)}))
    assert FrameDecoder(max_frame_bytes=len(wire) - 4).feed(wire) == [
        Chunk(id=1, data={"pcm": bytes(100)})]


def test_encoding_an_oversize_frame_raises() -> None:
    with pytest.raises(ProtocolError, match=f"exceeds the {MAX_FRAME_BYTES} byte limit"):
        encode(Chunk(id=1, data={"pcm": bytes(MAX_FRAME_BYTES)}))


def test_a_frame_of_exactly_the_limit_is_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = Chunk(id=1, data={"pcm": bytes(100)})
    body_bytes = len(encode(frame)) - 4
    monkeypatch.setattr(protocol, "MAX_FRAME_BYTES", body_bytes)
    assert FrameDecoder().feed(encode(frame)) == [frame]
    monkeypatch.setattr(protocol, "MAX_FRAME_BYTES", body_bytes - 1)
    with pytest.raises(ProtocolError, match=f"chunk frame of {body_bytes} bytes exceeds"):
        encode(frame)


@pytest.mark.parametrize("value", [object(), 2**64, -(2**63) - 1], ids=["object", "too big",
                                                                       "too small"])
def test_encoding_an_unpackable_value_raises(value: object) -> None:
    with pytest.raises(ProtocolError, match="cannot encode chunk frame"):
        encode(Chunk(id=1, data={"x": value}))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (struct.pack(">I", 1) + b"\xc1", "bad msgpack frame body"),
        (struct.pack(">I", 2) + b"\x92\x01", "bad msgpack frame body"),
        (raw_frame([1, 2]), "frame body is not a map but list"),
        (raw_frame({"t": "launch", "id": 1}), "unknown frame type 'launch'"),
        (raw_frame({"id": 1}), "unknown frame type None"),
        (raw_frame({"t": 7}), "unknown frame type 7"),
        (raw_frame({"t": [1]}), r"unknown frame type \[1\]"),  # not even hashable
        (raw_frame({"t": "cancel"}), r"cancel frame has fields \[\], expected \['id'\]"),
        (raw_frame({"t": "cancel", "id": 1, "x": 2}), "cancel frame has fields"),
        (raw_frame({"t": "cancel", "id": "1"}), "bad cancel frame: id must be an int"),
        (raw_frame({"t": "cancel", "id": True}), "bad cancel frame: id must be an int"),
        (raw_frame({"t": "chunk", "id": 1, "data": [1]}), "bad chunk frame"),
        (raw_frame({"t": "progress", "fraction": "half", "message": ""}), "must be a number"),
        (raw_frame({"t": "progress", "fraction": True, "message": ""}), "must be a number"),
        (raw_frame({"t": "loaded", "reported_bytes": 1.5, "info": {}}), "reported_bytes"),
        (raw_frame({"t": "failed", "id": 1, "message": "m", "kind": "invalid_request"}),
         r"failed frame has fields \['id', 'kind', 'message'\], expected \['code', 'id', "
         r"'kind', 'message', 'param'\]"),
        (raw_frame({"t": "failed", "id": 1, "message": "m", "kind": "invalid_request",
                    "param": 7, "code": None}),
         "bad failed frame: param must be a string or None, got 7"),
        (raw_frame({"t": "failed", "id": 1, "message": "m", "kind": "invalid_request",
                    "param": None, "code": b"context_length_exceeded"}),
         "bad failed frame: code must be a string or None"),
        (raw_frame({"t": "failed", "id": 1, "message": "m", "kind": "internal",
                    "param": None, "code": "context_length_exceeded"}),
         "bad failed frame: code 'context_length_exceeded' is for kind 'invalid_request', "
         "not 'internal'"),
    ],
)
def test_garbage_is_rejected(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(wire)


def test_frames_validate_on_construction() -> None:
    with pytest.raises(TypeError, match="id must be an int, got 'x'"):
        Cancel(id="x")  # type: ignore[arg-type]


def test_only_a_refusal_names_a_param_or_a_code() -> None:
    with pytest.raises(ValueError, match="param 'messages' is for kind 'invalid_request', "
                                         "not 'internal'"):
        Failed(id=1, message="RuntimeError: boom", param="messages")


def test_a_refusal_carries_its_param_and_code_across_the_wire() -> None:
    wire = encode(Failed(id=4, message="too long", kind="invalid_request",
                         param="messages", code="context_length_exceeded"))
    assert msgpack.unpackb(wire[4:]) == {
        "t": "failed", "id": 4, "message": "too long", "kind": "invalid_request",
        "param": "messages", "code": "context_length_exceeded"}


def test_wire_format_is_a_tagged_map_behind_a_big_endian_length() -> None:
    wire = encode(Cancel(id=7))
    (length,) = struct.unpack(">I", wire[:4])
    assert length == len(wire) - 4
    assert msgpack.unpackb(wire[4:]) == {"t": "cancel", "id": 7}
