"""``POST /v1/transcribe``: documents to page images, the reading order of OCR lines, and
the route through live servers — a fake vision-language model for the live, the
real RapidOCR model (slow) for reading text Pillow draws, and the shipped default."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image, ImageOps

from llmux.backends.rapidocr import RapidOcrBackend, _decode, reading_order, rows_text
from llmux.documents import MAX_PAGES, document_pages, image_page, kind_of, pdf_pages
from llmux.errors import BadRequest
from llmux.http.transcribe import DEFAULT_PROMPT
from tests.conftest import Server, live_workers, wait_until
from tests.helpers import WORDS, drain, encoded, pdf_of, text_image

KEYS = {"all": "key-for-everything", "ocr-only": "key-for-ocr", "admin": "key-for-admin"}


# --- files the tests make ---------------------------------------------------------------


def handmade_pdf(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF from raw objects (1 is the catalog), with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, trailer, xref)
    return bytes(out)


CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
ONE_PAGE = [CATALOG, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>"]
# RC4 with a user password: these /O and /U values match no password, not even ""
ENCRYPTION = b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P -4 >>" % (b"11" * 32,
                                                                            b"22" * 32)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def line(text: str, left: float, top: float, width: float = 100, height: float = 30
         ) -> dict[str, Any]:
    box = [[left, top], [left + width, top], [left + width, top + height],
           [left, top + height]]
    return {"text": text, "confidence": 0.9, "box": box}


# --- reading order ----------------------------------------------------------------------


def test_rows_read_top_to_bottom_and_each_row_left_to_right() -> None:
    lines = [line("right", 300, 100), line("bottom", 10, 200), line("top", 10, 10),
             line("left", 10, 100)]
    rows = reading_order(lines)
    assert [[piece["text"] for piece in row] for row in rows] == [
        ["top"], ["left", "right"], ["bottom"]]
    assert rows_text(rows) == "top\nleft right\nbottom"


def test_lines_a_few_pixels_apart_vertically_share_a_row() -> None:
    rows = reading_order([line("value", 200, 108), line("label", 10, 100)])
    assert [[piece["text"] for piece in row] for row in rows] == [["label", "value"]]


def test_lines_whose_centres_are_more_than_half_a_line_apart_are_separate_rows() -> None:
    rows = reading_order([line("second", 10, 117), line("first", 200, 100)])
    assert [[piece["text"] for piece in row] for row in rows] == [["first"], ["second"]]


def test_a_slanted_box_is_placed_by_its_extent() -> None:
    slanted = {"text": "slanted", "confidence": 0.9,
               "box": [[400, 104], [532, 99], [533, 132], [401, 137]]}
    rows = reading_order([slanted, line("straight", 20, 100, height=33)])
    assert rows_text(rows) == "straight slanted"


def test_no_lines_make_no_rows_and_no_text() -> None:
    assert reading_order([]) == []
    assert rows_text([]) == ""


# --- the rapidocr backend's settings ----------------------------------------------------


def test_a_model_directory_must_hold_each_model_file_once(tmp_path: Path) -> None:
    (tmp_path / "my_det_a.onnx").write_bytes(b"")
    (tmp_path / "my_det_b.onnx").write_bytes(b"")
    backend = RapidOcrBackend({"model_path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"expected one \.onnx file with 'det' in its name, "
                                         r"found 2; name it with option det_model_path"):
        backend.load(lambda fraction, message: None)


def test_rapidocr_sees_transparency_as_white() -> None:
    """Black text on a transparent PNG is black on white, not black on black."""
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (0, 0, 2, 2))
    shown = _decode(encoded(image, "PNG"))
    assert (shown.mode, shown.getpixel((0, 0)), shown.getpixel((3, 1))) == (
        "RGB", (0, 0, 0), (255, 255, 255))


def test_rapidocr_turns_a_photo_upright_by_its_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    assert _decode(encoded(text_image(), "JPEG", exif=exif)).size == (180, 560)


def test_rapidocr_reads_black_text_on_a_transparent_png() -> None:
    image = Image.new("RGBA", (560, 180), (0, 0, 0, 0))
    image.putalpha(ImageOps.invert(text_image().convert("L")))  # black where the text is
    backend = RapidOcrBackend({"options": {}, "device": "cpu"})
    backend.load(lambda fraction, message: None)
    try:
        stream = backend.infer("ocr", {"image": encoded(image, "PNG")}, threading.Event())
        text = drain(stream)[1]["text"]
    finally:
        backend.unload()
    assert_reads_the_words(text)


def test_rapidocr_refuses_a_gpu_device() -> None:
    with pytest.raises(ValueError, match="rapidocr-onnxruntime runs on the CPU here"):
        RapidOcrBackend({"device": "cuda:0"})


# --- documents --------------------------------------------------------------------------


def test_a_pdf_is_known_by_its_header_and_anything_else_is_an_image() -> None:
    assert kind_of(b"%PDF-1.7\n...") == "pdf"
    assert kind_of(b"\n\n%PDF-1.4 after some junk") == "pdf"
    assert kind_of(encoded(text_image(), "PNG")) == "image"


@pytest.mark.parametrize("data", [b""])
def test_an_empty_file_is_a_bad_request_on_file(data: bytes) -> None:
    with pytest.raises(BadRequest, match="The file is empty") as caught:
        document_pages(data)
    assert caught.value.param == "file"


def test_each_pdf_page_becomes_a_png_at_the_dpi() -> None:
    pages = pdf_pages(pdf_of(text_image(), Image.new("RGB", (144, 72), "white")), 4, 144)
    assert [png_size(page) for page in pages] == [(1120, 360), (288, 144)]


def test_a_huge_pdf_page_is_rendered_within_the_pixel_limit() -> None:
    poster = handmade_pdf([CATALOG, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                           b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 14400 14400] >>"])
    (page,) = pdf_pages(poster, 1, 150, max_pixels=1_000_000)
    width, height = png_size(page)
    assert width == height and math.isclose(width * height, 1_000_000, rel_tol=0.01)


def test_a_pdf_with_too_many_pages_is_refused_before_rendering() -> None:
    blank = Image.new("RGB", (20, 20), "white")
    with pytest.raises(BadRequest, match=f"The PDF has {MAX_PAGES + 1} pages; at most "
                                         f"{MAX_PAGES} are read per request") as caught:
        document_pages(pdf_of(*[blank] * (MAX_PAGES + 1)))
    assert caught.value.param == "file"


@pytest.mark.parametrize(("data", "message"), [
    (handmade_pdf([*ONE_PAGE, ENCRYPTION], b"/Encrypt 4 0 R /ID [<%s> <%s>] " % (
        b"33" * 16, b"33" * 16)), "The PDF is encrypted with a password"),
    (b"%PDF-1.4\nnot really a PDF", "The file starts like a PDF but cannot be read"),
])
def test_an_unusable_pdf_is_a_bad_request_on_file(data: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        document_pages(data)
    assert caught.value.param == "file"


def test_a_png_jpeg_or_webp_image_passes_through_unchanged() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encoded(text_image(), fmt)
        assert document_pages(data) == [data]


def test_other_image_formats_become_png() -> None:
    for fmt in ("BMP", "GIF", "TIFF"):
        (page,) = document_pages(encoded(text_image(), fmt))
        assert png_size(page) == (560, 180)


def test_a_cmyk_tiff_becomes_an_rgb_png() -> None:
    (page,) = document_pages(encoded(text_image().convert("CMYK"), "TIFF"))
    with Image.open(io.BytesIO(page)) as image:
        assert image.mode == "RGB"


def test_an_exif_rotated_photo_is_turned_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turn 90 degrees clockwise to view
    (page,) = document_pages(encoded(text_image(), "JPEG", exif=exif))
    assert png_size(page) == (180, 560)


@pytest.mark.parametrize(("data", "message"), [
    (b"just some text", r"The file is neither a PDF nor an image \(PNG, JPEG, WebP"),
    (encoded(text_image(), "PNG")[:300], "The image is damaged or incomplete"),
    (encoded(text_image(), "PPM"), "PPM images are not accepted"),
])
def test_an_unusable_image_is_a_bad_request_on_file(data: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        document_pages(data)
    assert caught.value.param == "file"


def test_an_image_over_the_pixel_limit_is_refused_before_decoding() -> None:
    with pytest.raises(BadRequest, match="The image is 560 x 180 pixels; the limit is "
                                         "100000 pixels"):
        image_page(encoded(text_image(), "PNG"), max_pixels=100_000)


def test_the_page_and_pixel_limits_are_the_most_allowed() -> None:
    """A PDF of exactly ``max_pages`` pages and an image of exactly ``max_pixels`` pass."""
    blank = Image.new("RGB", (20, 20), "white")
    assert len(pdf_pages(pdf_of(blank, blank), 2, 72)) == 2
    data = encoded(text_image(), "PNG")
    assert image_page(data, max_pixels=560 * 180) == data


def test_document_pages_applies_the_limits_it_is_given() -> None:
    """``max_pages`` and ``max_pixels`` reach the PDF and the image paths."""
    blank = Image.new("RGB", (20, 20), "white")
    with pytest.raises(BadRequest, match="The PDF has 2 pages; at most 1 are read"):
        document_pages(pdf_of(blank, blank), max_pages=1)
    with pytest.raises(BadRequest, match="the limit is 100000 pixels"):
        document_pages(encoded(text_image(), "PNG"), max_pixels=100_000)
    (page,) = document_pages(pdf_of(text_image()), dpi=72, max_pixels=10_000)
    width, height = png_size(page)
    assert math.isclose(width * height, 10_000, rel_tol=0.05)  # not 560 x 180


def test_a_gif_with_a_transparent_colour_becomes_a_png_that_keeps_it() -> None:
    """Transparency survives the PNG a model gets (its backend shows it as white)."""
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 10, 10, 10])
    image.putpixel((1, 0), 1)
    (page,) = document_pages(encoded(image, "GIF", transparency=0))
    with Image.open(io.BytesIO(page)) as shown:
        assert shown.format == "PNG" and shown.mode == "RGBA"
        assert (shown.getpixel((0, 0))[3], shown.getpixel((1, 0))) == (0, (10, 10, 10, 255))


def test_a_jpeg_whose_exif_orientation_is_0_passes_through_unchanged() -> None:
    """Orientation 0 (not a valid value) means nothing to turn, like 1."""
    exif = Image.Exif()
    exif[0x0112] = 0
    data = encoded(text_image(), "JPEG", exif=exif)
    assert document_pages(data) == [data]


# --- the route: fake vision-language models and the real RapidOCR, one server ---------


def fake(kind: str, **options: Any) -> dict[str, Any]:
    return {"type": kind, "backend": "fake", "estimated_vram": "200MB",
            "options": {"load_time_s": 0.1, "footprint": "50MB", "tokens_per_s": 500,
                        **options}}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("transcribe")
    keys = tmp / "api_keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "all", "key": KEYS["all"], "models": ["*"]},
        {"name": "ocr-only", "key": KEYS["ocr-only"], "models": ["ocr"]},
        {"name": "admin", "key": KEYS["admin"], "admin": True}]}))
    models = {"reader": fake("vlm"), "slow-reader": fake("vlm", tokens_per_s=4),
              "chatty": fake("llm"),
              "ocr": {"type": "ocr", "backend": "rapidocr", "estimated_vram": "700MB",
                      "options": {"text_score": 0.5, "use_angle_cls": False}}}
    config = {"server": {"api_keys_file": str(keys)},
              "physical_models": models,
              "virtual_models": {name: {"physical": name} for name in models}}
    server = Server(config, tmp, admin_key=KEYS["admin"])
    yield server
    stop(server)


def stop(server: Server) -> None:
    """Stop ``server`` and see its own workers exit (another module server may run)."""
    pids = {m["pid"] for m in server.state()["models"] if m["pid"]}
    server.stop()
    wait_until(lambda: not [w for w in live_workers() if w.pid in pids], 10,
               "the server's workers to exit")


def transcribe(server: Server, data: bytes | None, key: str = "all",
               **fields: str) -> httpx.Response:
    # without a file, another part keeps the body multipart
    files = {"file": ("upload.bin", data, "application/octet-stream")} if data is not None \
        else {"note": ("note.txt", b"no file here", "text/plain")}
    return httpx.post(f"{server.url}/v1/transcribe", data=fields, files=files,
                      headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=60)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def test_a_vlm_reads_each_page_with_the_prompt(live: Server) -> None:
    reply = transcribe(live, pdf_of(text_image(), text_image(), text_image()),
                       model="reader", prompt="Copy the words.")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "transcription" and body["model"] == "reader"
    assert body["pages"] == [{"page": n, "text": "echo: Copy the words."} for n in (1, 2, 3)]
    assert body["text"] == "\n\n".join(["echo: Copy the words."] * 3)
    usage = body["usage"]
    assert usage["pages"] == 3 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_without_a_prompt_the_vlm_is_asked_to_transcribe(live: Server) -> None:
    reply = transcribe(live, encoded(text_image(), "PNG"), model="reader",
                       response_format="text")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.text == f"echo: {DEFAULT_PROMPT}"


@pytest.mark.parametrize(("data", "fields", "param", "message"), [
    (None, {"model": "reader"}, "file", "'file' is required"),
    (b"", {"model": "reader"}, "file", "The file is empty"),
    (b"plain words, not a picture", {"model": "reader"}, "file",
     "The file is neither a PDF nor an image"),
    (pdf_of(*[Image.new("RGB", (20, 20), "white")] * (MAX_PAGES + 1)), {"model": "reader"},
     "file", f"at most {MAX_PAGES} are read per request"),
    (b"x", {}, "model", "'model' is required."),
    (b"x", {"model": "chatty"}, "model",
     "'chatty' is a chat model (llm) and cannot read documents; use an ocr or vlm model."),
    (b"x", {"model": "reader", "response_format": "srt"}, "response_format",
     "'response_format' must be json or text."),
])
def test_a_bad_request_is_a_400_naming_the_field(
    live: Server, data: bytes | None, fields: dict[str, str], param: str, message: str,
) -> None:
    reply = transcribe(live, data, **fields)
    assert reply.status_code == 400, reply.text
    assert error_of(reply)["param"] == param
    assert message in error_of(reply)["message"]


def test_an_unknown_model_is_a_404(live: Server) -> None:
    reply = transcribe(live, encoded(text_image(), "PNG"), model="no-such-model")
    assert reply.status_code == 404
    assert error_of(reply)["code"] == "model_not_found"


def test_a_json_body_is_an_unsupported_media_type(live: Server) -> None:
    reply = httpx.post(f"{live.url}/v1/transcribe", json={"model": "reader"},
                       headers={"Authorization": f"Bearer {KEYS['all']}"})
    assert reply.status_code == 415


def test_the_form_s_media_type_is_read_in_any_case(live: Server) -> None:
    request = httpx.Request("POST", f"{live.url}/v1/transcribe", data={"model": "reader"},
                            files={"file": ("a.png", encoded(text_image(), "PNG"))},
                            headers={"Authorization": f"Bearer {KEYS['all']}"})
    kind = request.headers["Content-Type"]
    request.headers["Content-Type"] = kind.replace("multipart/form-data", "MULTIPART/Form-Data")
    with httpx.Client(timeout=60) as client:
        reply = client.send(request)
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == f"echo: {DEFAULT_PROMPT}"


def test_a_key_needs_to_be_sent_and_to_allow_the_model(live: Server) -> None:
    image = encoded(text_image(), "PNG")
    anonymous = httpx.post(f"{live.url}/v1/transcribe", data={"model": "reader"},
                           files={"file": ("a.png", image)})
    assert anonymous.status_code == 401
    refused = transcribe(live, image, key="ocr-only", model="reader")
    assert refused.status_code == 403
    assert error_of(refused)["message"] == \
        "The API key 'ocr-only' may not use the model 'reader'."


def test_a_client_that_leaves_stops_the_remaining_pages(live: Server) -> None:
    # Loaded first: the client's 2 s are for its first page. A cold load (a worker
    # started) took up to 0.8 s of them on a loaded 2-core machine, and a client that
    # leaves while its job still waits for the load starts no job at all.
    live.load("slow-reader")
    document = pdf_of(text_image(), text_image(), text_image())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/transcribe", data={"model": "slow-reader"},
                   files={"file": ("doc.pdf", document)},
                   headers={"Authorization": f"Bearer {KEYS['all']}"},
                   timeout=httpx.Timeout(10, read=2))
    # the handler returns as soon as the client is gone: a page takes ~10 s here
    wait_until(lambda: '"POST /v1/transcribe" 499' in live.logs(), 5,
               "the transcription to stop")
    wait_until(lambda: live.model("slow-reader")["in_flight"] == 0, 5, "the page to stop")
    model = live.model("slow-reader")
    assert model["jobs_cancelled"] == 1 and model["queue_depth"] == 0
    assert model["jobs_started"] == 1, model


# --- the route, with the real RapidOCR model --------------------------------------------


def assert_reads_the_words(text: str) -> None:
    found = text.lower().split()
    for expected in " ".join(WORDS).lower().split():
        assert expected in found, text


def post(server: Server, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/transcribe", data=fields,
                      files={"file": ("scan", data)}, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS['all']}"})


@pytest.mark.slow
def test_rapidocr_reads_a_drawn_image_line_by_line(live: Server) -> None:
    reply = post(live, encoded(text_image(), "PNG"), model="ocr")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert_reads_the_words(body["text"])
    assert body["text"].count("\n") == 1, body["text"]  # two rows
    assert body["pages"] == [{"page": 1, "text": body["text"]}]
    assert body["usage"] == {"pages": 1, "prompt_tokens": 0, "completion_tokens": 0,
                             "total_tokens": 0}


@pytest.mark.slow
def test_rapidocr_reads_a_one_page_pdf_as_text(live: Server) -> None:
    reply = post(live, pdf_of(text_image()), model="ocr", response_format="text")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    assert_reads_the_words(reply.text)


@pytest.mark.slow
def test_rapidocr_finds_no_text_on_a_blank_page(live: Server) -> None:
    reply = post(live, pdf_of(Image.new("RGB", (300, 200), "white")), model="ocr")
    assert reply.status_code == 200, reply.text
    assert reply.json()["pages"] == [{"page": 1, "text": ""}]

