"""Chat image parts: OpenAI ``image_url`` parts turned into the worker's image parts.

A client sends ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` (or
the URL as a plain string). The worker gets ``{"type": "image", "image": <bytes>}``:
the encoded file, checked here so that a bad image is a 400 before any model loads.

The URL is a ``data:`` URL (base64 or percent-encoded). An ``http(s)`` URL is fetched
only when ``server.allow_remote_images`` is true: a fetch made on a client's behalf can
reach hosts the client cannot (SSRF), so an operator must opt in. A fetch is bounded
by a timeout and by ``server.max_body_bytes``, and follows redirects to http(s) only.

The checks decode with Pillow, in a worker thread: the image must be of an allowed
format, at most ``MAX_IMAGE_PIXELS`` (a decompression bomb stops at its header), and
``verify()`` must pass. The server never decodes pixels beyond that. Pillow is imported
on the first check (PERF: its ~65 ms would otherwise delay the server's start).

The backends that do decode pixels turn them into what a viewer shows with
:func:`displayed_rgb`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio.to_thread

from llmux.config import Server
from llmux.errors import BadRequest

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["FORMATS", "MAX_IMAGE_PIXELS", "REMOTE_DISABLED", "check_image",
           "decode_data_url", "displayed_rgb", "fetch_image", "image_bytes", "image_url_of",
           "with_image_bytes"]

MAX_IMAGE_PIXELS: Final = 8192 * 8192
"""The most pixels an image may have (a 64-megapixel photo fits)."""

FORMATS: Final = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
"""Pillow formats accepted; others (EPS runs Ghostscript, ...) are refused unread."""

FETCH_TIMEOUT_S: Final = 15.0
READ_CHUNK: Final = 64 * 1024
REMOTE_DISABLED: Final = ("remote image URLs are disabled; send a data URL, or set "
                          "server.allow_remote_images")


def image_url_of(part: dict[str, Any]) -> str:
    """The URL of an ``image_url`` part (``{"url": ...}`` or the URL itself); the chat
    resource has checked that it is a string."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    return str(url)


def decode_data_url(url: str, where: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` (or percent-encoded) URL. Pure.

    Raises:
        BadRequest: not a data URL, a media type that is not ``image/*``, bad base64.
    """
    header, comma, body = url.partition(",")
    if not header.startswith("data:") or not comma:
        raise BadRequest(f"'{where}' is not a data URL: expected "
                         "data:image/png;base64,<data>.", param=where)
    mime, *attributes = header[len("data:"):].split(";")
    mime = mime.strip().lower()
    if not mime.startswith("image/"):
        raise BadRequest(f"'{where}' has the media type {mime or 'text/plain'!r}; send an "
                         "image (image/png, image/jpeg, image/webp, ...).", param=where)
    if "base64" not in (a.strip().lower() for a in attributes):
        return urllib.parse.unquote_to_bytes(body)
    text = "".join(body.split())  # line breaks in long base64 are common
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"'{where}' holds invalid base64 data.", param=where) from exc


def check_image(data: bytes, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """The Pillow format name of ``data``, once it is known to be a sound image of an
    allowed format and size. Blocking: run it in a thread.

    Raises:
        BadRequest: empty, not an image Pillow reads, too many pixels, or corrupt.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRequest(f"'{where}' holds no image data.", param=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_openable()) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadRequest(f"'{where}' is {width}x{height} pixels; the limit is "
                                     f"{max_pixels} pixels. Send a smaller image.", param=where)
                image.verify()
                return str(image.format)
    except UnidentifiedImageError as exc:
        raise BadRequest(f"'{where}' is not an image llmux reads; send "
                         f"{', '.join(FORMATS)}.", param=where) from exc
    except Image.DecompressionBombError as exc:
        raise BadRequest(f"'{where}' has too many pixels; the limit is {max_pixels}.",
                         param=where) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # verify() raises SyntaxError too
        raise BadRequest(f"'{where}' is a damaged image: {exc}", param=where) from exc


def displayed_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A decoded Pillow ``image`` as the RGB picture a viewer shows: turned upright by
    its EXIF orientation, transparency over white, 16-bit grey scaled to 8 bits.

    NOTE: ``convert("RGB")`` alone drops the alpha channel, and transparent pixels
    are mostly stored black: black text on a transparent PNG became black on black.
    It also clips 16-bit grey at 255 (a scan turned white) and ignores the EXIF
    orientation a phone photo relies on.

    Raises:
        OSError, ValueError: the image's data or EXIF is damaged (from Pillow).
    """
    from PIL import Image, ImageOps

    upright = ImageOps.exif_transpose(image)
    if upright.mode.startswith("I;16"):
        upright = upright.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        upright = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return upright.convert("RGB")


@functools.cache
def _openable() -> list[str]:
    """The allowed formats this Pillow build can open (AVIF needs a recent one)."""
    from PIL import Image

    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def _scheme(url: str) -> str:
    """The URL's scheme (urlsplit gives it in lower case); "" when it has none. Pure.

    Raises:
        ValueError: the URL is malformed (``http://[example.com``: urlsplit refuses it).
    """
    return urllib.parse.urlsplit(url).scheme if ":" in url else ""


def _scheme_of(url: str, where: str) -> str:
    """:func:`_scheme` of a client's URL.

    Raises:
        BadRequest: the URL is malformed.
    """
    try:
        return _scheme(url)
    except ValueError as exc:
        raise BadRequest(f"'{where}' is not a valid URL: {exc}.", param=where) from exc


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another well-formed http(s) URL (urllib allows ftp
    too)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        try:
            scheme = _scheme(newurl)
        except ValueError:
            scheme = ""
        if scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a URL that is not http(s)",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_by(response: Any, deadline: float, timeout_s: float) -> bytes:
    """The next bytes of ``response`` that arrive before ``deadline`` (b"" at its end).

    NOTE: ``read(n)`` waits until n bytes came, and urllib's timeout bounds each socket
    read, not the body: a server trickling a byte a second held the thread for as long
    as it liked. ``read1`` returns what has arrived, and the socket (http.client keeps
    it private) waits no longer than the time left.

    Raises:
        TimeoutError: the deadline passed.
    """
    late = f"not read within {timeout_s:g} s"
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(late)
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(left)
    try:
        return bytes(response.read1(READ_CHUNK))
    except TimeoutError as exc:
        raise TimeoutError(late) from exc


def fetch_image(url: str, where: str, limit: int, timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
    """The body at an http(s) URL: at most ``limit`` bytes, within ``timeout_s`` in all.
    Blocking: run it in a thread.

    Raises:
        BadRequest: a malformed URL, another scheme, an HTTP error, no answer in time,
            too big a body.
    """
    if _scheme_of(url, where) not in ("http", "https"):
        raise BadRequest(f"'{where}' must be an http(s) URL.", param=where)
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_HttpRedirectsOnly)
    request = urllib.request.Request(url, headers={"User-Agent": "llmux", "Accept": "image/*"})
    data = bytearray()
    try:
        with opener.open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise BadRequest(f"The image at '{where}' has {length} bytes; the limit is "
                                 f"{limit}.", param=where)
            while chunk := _read_by(response, deadline, timeout_s):
                data += chunk
                if len(data) > limit:
                    raise BadRequest(f"The image at '{where}' is over the limit of {limit} "
                                     "bytes.", param=where)
    except urllib.error.HTTPError as exc:
        raise BadRequest(f"Fetching the image at '{where}' failed: HTTP {exc.code} "
                         f"{exc.reason}.", param=where) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BadRequest(f"Fetching the image at '{where}' failed: {reason}.",
                         param=where) from exc
    return bytes(data)


def image_bytes(url: str, where: str, *, allow_remote: bool, limit: int) -> bytes:
    """The checked image file a part's URL names. Blocking: run it in a thread.

    Raises:
        BadRequest: a malformed URL, a remote URL while they are disabled, another
            scheme, or any problem of :func:`decode_data_url`, :func:`fetch_image`,
            :func:`check_image`.
    """
    scheme = _scheme_of(url, where)
    if scheme == "data":
        data = decode_data_url(url, where)
    elif scheme in ("http", "https"):
        if not allow_remote:
            raise BadRequest(f"'{where}': {REMOTE_DISABLED}.", param=where)
        data = fetch_image(url, where, limit)
    else:
        raise BadRequest(f"'{where}' must be a data URL (data:image/png;base64,...) or an "
                         "http(s) URL.", param=where)
    check_image(data, where)
    return data


async def with_image_bytes(messages: Sequence[dict[str, Any]], server: Server
                           ) -> list[dict[str, Any]]:
    """``messages`` with every ``image_url`` part replaced by ``{"type": "image",
    "image": bytes}``; other parts and messages are kept as they are. Each image is
    read and checked in a worker thread (a cancelled request waits for the current
    one, which is bounded by the fetch timeout).

    Raises:
        BadRequest: naming the part (``messages[i].content[j].image_url``).
    """
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts: list[Any] = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                read = functools.partial(
                    image_bytes, image_url_of(part), f"messages[{i}].content[{j}].image_url",
                    allow_remote=server.allow_remote_images, limit=server.max_body_bytes)
                part = {"type": "image", "image": await anyio.to_thread.run_sync(read)}
            parts.append(part)
        out.append({**message, "content": parts})
    return out
