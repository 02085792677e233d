"""``POST /v1/transcribe``: the text of an image or a PDF, page by page.

An ``ocr`` model reads each page with op "ocr"; a ``vlm`` model is asked, with op
"chat", to transcribe each page image. Pages are rendered (or the image checked) in a
thread before any model is asked, so a bad file is a 400 without a load. Pages go to
the model one after another; a client that leaves stops the page under way and no
later page is started.
"""

from __future__ import annotations

from typing import Any, Final

import anyio
import anyio.to_thread
import falcon
import falcon.asgi

from llmux.chat.virtual import apply_virtual
from llmux.config import PhysicalModel, VirtualModel
from llmux.documents import document_pages
from llmux.errors import BadRequest, LlmuxError, PayloadTooLarge, UnsupportedMediaType
from llmux.http.body import media_type
from llmux.http.chat import usage_of
from llmux.http.disconnect import on_disconnect
from llmux.http.jobs import run_whole
from llmux.http.target import resolve_for
from llmux.http.transcriptions import read_multipart, text_field
from llmux.runtime import Runtime

READERS: Final = frozenset({"ocr", "vlm"})
RESPONSE_FORMATS: Final = ("json", "text")
DEFAULT_PROMPT: Final = (
    "Transcribe all the text in this image exactly as it is written, in reading order. "
    "Keep the line breaks, write tables as Markdown tables, and reply with the text only, "
    "without any comment.")
PAGE_BREAK: Final = "\n\n"
CLIENT_CLOSED: Final = 499  # nginx's "client closed request": nobody reads the answer


def page_job(virtual: VirtualModel, physical: PhysicalModel, page: bytes,
             prompt: str | None) -> tuple[str, dict[str, Any]]:
    """The op and payload that read one page image with ``physical``."""
    if physical.type == "ocr":
        return "ocr", {"image": page}
    message = {"role": "user", "content": [{"type": "image", "image": page},
                                           {"type": "text", "text": prompt or DEFAULT_PROMPT}]}
    return "chat", apply_virtual(virtual, [message], {"temperature": 0})


def page_text(op: str, pieces: list[dict[str, Any]], final: dict[str, Any]) -> str:
    """A page's text from its job's reply: the OCR text, or the chat reply's text."""
    if op == "ocr":
        return str(final.get("text") or "")
    return "".join(str(p.get("text") or "") for p in pieces).strip()


def transcription(name: str, texts: list[str], usages: list[dict[str, int]]
                  ) -> dict[str, Any]:
    """The JSON reply; ``usage`` adds up the pages' tokens (zero for OCR models)."""
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    return {
        "object": "transcription",
        "model": name,
        "text": PAGE_BREAK.join(texts),
        "pages": [{"page": n, "text": text} for n, text in enumerate(texts, start=1)],
        "usage": {"pages": len(texts), "prompt_tokens": prompt,
                  "completion_tokens": completion, "total_tokens": prompt + completion},
    }


class Transcribe:
    """``POST /v1/transcribe`` (any valid key; the model allowlist applies)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if media_type(req) != "multipart/form-data":
            raise UnsupportedMediaType("Send the document as multipart/form-data with a "
                                       "'file' part (an image or a PDF) and 'model'.")
        limit = self.runtime.config.server.max_upload_bytes
        data, fields = await read_multipart(req, limit, advice="Send a smaller file or split "
                                                                "the document.")
        name = text_field(fields, "model")
        if name is None:
            raise BadRequest("'model' is required.", param="model")
        virtual, physical = resolve_for(req, self.runtime, name, READERS,
                                        "cannot read documents; use an ocr or vlm model")
        fmt = text_field(fields, "response_format") or "json"
        if fmt not in RESPONSE_FORMATS:
            raise BadRequest("'response_format' must be json or text.", param="response_format")
        prompt = text_field(fields, "prompt")
        if data is None:
            raise BadRequest("'file' is required: the image or PDF to transcribe.",
                             param="file")
        if len(data) > limit:
            raise PayloadTooLarge(f"The file is over the limit of {limit} bytes.")
        gone = anyio.Event()  # NOTE: registered before rendering, which can take a while
        on_disconnect(req.scope, gone.set)
        pages = await anyio.to_thread.run_sync(document_pages, data)
        read = await self._read(req, gone, virtual, physical, pages, prompt)
        if read is None:
            resp.status = CLIENT_CLOSED
            return
        texts, usages = read
        reply = transcription(name, texts, usages)
        if fmt == "json":
            resp.media = reply
        else:
            resp.content_type = falcon.MEDIA_TEXT
            resp.text = reply["text"]

    async def _read(self, req: falcon.asgi.Request, gone: anyio.Event, virtual: VirtualModel,
                    physical: PhysicalModel, pages: list[bytes], prompt: str | None
                    ) -> tuple[list[str], list[dict[str, int]]] | None:
        """Each page's text and token usage, one page at a time; None once the client
        has left (``gone``: the page under way is cancelled, no later one is started).

        Raises:
            LlmuxError: a page's job failed while the client was still there.
        """
        texts: list[str] = []
        usages: list[dict[str, int]] = []
        for page in pages:
            if gone.is_set():
                return None
            op, payload = page_job(virtual, physical, page, prompt)
            try:
                pieces, final = await run_whole(req, self.runtime.submit(physical.id, op,
                                                                         payload))
            except LlmuxError:
                if gone.is_set():
                    return None
                raise
            texts.append(page_text(op, pieces, final))
            usages.append(usage_of(final))
        return None if gone.is_set() else (texts, usages)
