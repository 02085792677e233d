"""Uploaded documents to page images: a PDF rendered page by page, or one checked image.

Runs in the server (Pillow and pypdfium2 are server dependencies), always in a thread:
rendering and decoding block. Both are imported on first use, not at the server's start
(PERF: together ~100 ms). Everything a model gets from here has been decoded once,
so a broken, encrypted, oversized or unknown file is a 400 naming ``file`` before any
model is loaded.
"""

from __future__ import annotations

import io
import math
import threading
from typing import TYPE_CHECKING, Final, Literal

from llmux.errors import BadRequest

if TYPE_CHECKING:
    import pypdfium2  # type: ignore[import-untyped]
    from PIL import Image

__all__ = ["DPI", "IMAGE_FORMATS", "MAX_PAGES", "MAX_PIXELS", "document_pages", "image_page",
           "kind_of", "pdf_pages"]

MAX_PAGES: Final = 32
DPI: Final = 150.0  # enough for OCR of body text; an A4 page is 1240 x 1754 pixels
MAX_PIXELS: Final = 40_000_000  # an A4 scan at 600 dpi is 35 MP; more is a bomb
IMAGE_FORMATS: Final = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
PASS_THROUGH: Final = frozenset({"PNG", "JPEG", "WEBP"})  # what every model runtime reads
PDF_MAGIC: Final = b"%PDF-"
MAGIC_WINDOW: Final = 1024  # PDF readers accept the header anywhere in the first 1 KiB
POINTS_PER_INCH: Final = 72.0
_ORIENTATION: Final = 0x0112

# NOTE: PDFium is not thread-safe, not even across documents: every call into it from
# the server's thread pool holds this lock.
_PDFIUM = threading.Lock()


def _bad(message: str) -> BadRequest:
    return BadRequest(message, param="file")


def kind_of(data: bytes) -> Literal["pdf", "image"]:
    """What the upload is, by its bytes (clients send any name and content type).

    Raises:
        BadRequest: the file is empty.
    """
    if not data:
        raise _bad("The file is empty: send an image (PNG, JPEG, WebP, ...) or a PDF.")
    return "pdf" if PDF_MAGIC in data[:MAGIC_WINDOW] else "image"


def document_pages(data: bytes, *, max_pages: int = MAX_PAGES, dpi: float = DPI,
                   max_pixels: int = MAX_PIXELS) -> list[bytes]:
    """The pages of an upload as encoded images: a PDF's pages as PNG, an image as
    itself (re-encoded as PNG where a model might not read its format).

    Raises:
        BadRequest: empty, unreadable, encrypted, too many pages or too many pixels.
    """
    if kind_of(data) == "pdf":
        return pdf_pages(data, max_pages, dpi, max_pixels)
    return [image_page(data, max_pixels)]


def pdf_pages(data: bytes, max_pages: int, dpi: float,
              max_pixels: int = MAX_PIXELS) -> list[bytes]:
    """Each page of the PDF rendered at ``dpi`` as PNG (scaled down to ``max_pixels``).

    Raises:
        BadRequest: not a readable PDF, encrypted, no pages or more than ``max_pages``.
    """
    import pypdfium2

    with _PDFIUM:
        try:
            pdf = pypdfium2.PdfDocument(data)
        except pypdfium2.PdfiumError as exc:
            if getattr(exc, "err_code", None) == pypdfium2.raw.FPDF_ERR_PASSWORD:
                raise _bad("The PDF is encrypted with a password; send it decrypted.") from exc
            raise _bad("The file starts like a PDF but cannot be read: "
                       f"{str(exc).rstrip('.')}.") from exc
        try:
            count = len(pdf)
            if count == 0:  # NOTE: PDFium refuses most such files when opening them
                raise _bad("The PDF has no pages.")
            if count > max_pages:
                raise _bad(f"The PDF has {count} pages; at most {max_pages} are read per "
                           "request. Split it and send the parts.")
            return [_render(pdf[i], dpi, max_pixels) for i in range(count)]
        finally:
            pdf.close()


def _render(page: pypdfium2.PdfPage, dpi: float, max_pixels: int) -> bytes:
    import pypdfium2

    try:
        width, height = page.get_size()
        scale = dpi / POINTS_PER_INCH
        if width * height * scale * scale > max_pixels:
            scale = math.sqrt(max_pixels / (width * height))
        image = page.render(scale=scale).to_pil()
    except pypdfium2.PdfiumError as exc:
        raise _bad(f"A page of the PDF cannot be rendered: {str(exc).rstrip('.')}.") from exc
    finally:
        page.close()
    return _png(image)


def image_page(data: bytes, max_pixels: int = MAX_PIXELS) -> bytes:
    """``data`` checked to be a whole image of an allowed format and size; returned as
    is, or as PNG when its format is not PNG/JPEG/WebP or EXIF says to turn it.

    Raises:
        BadRequest: not an image, a format not in ``IMAGE_FORMATS``, damaged, or more
            than ``max_pixels``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    kinds = "PNG, JPEG, WebP, GIF, BMP or TIFF"
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise _bad(f"The file is neither a PDF nor an image ({kinds}).") from exc
    except Image.DecompressionBombError as exc:
        raise _bad(f"The image has too many pixels; the limit is {max_pixels}.") from exc
    if image.format not in IMAGE_FORMATS:
        raise _bad(f"{image.format} images are not accepted; send {kinds}, or a PDF.")
    width, height = image.size
    if width * height > max_pixels:
        raise _bad(f"The image is {width} x {height} pixels; the limit is {max_pixels} "
                   "pixels. Scale it down.")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise _bad(f"The image is damaged or incomplete ({exc}).") from exc
    turned = image.getexif().get(_ORIENTATION, 1) not in (0, 1)
    if image.format in PASS_THROUGH and not turned:
        return data
    return _png(ImageOps.exif_transpose(image))


def _png(image: Image.Image) -> bytes:
    """PNG bytes; modes PNG cannot hold (CMYK, 16-bit, palettes with alpha) become RGB(A)."""
    if image.mode not in ("1", "L", "RGB", "RGBA"):
        alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)  # PERF: these bytes live for one request
    return out.getvalue()
