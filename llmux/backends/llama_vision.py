"""A llama.cpp vision projector (``mmproj``) beside a loaded ``llama_cpp.Llama``:
images go into the model's context through libmtmd, and generation then continues
with llama-cpp-python's own loop.

    projector = Projector(llm, Path("mmproj.gguf"), use_gpu=False)
    tokens = projector.evaluate(f"User: {MARKER} What is this?\\nAssistant:", [png])
    for token in llm.generate(tokens, ...): ...   # or llm.create_completion(tokens, ...)

``evaluate`` clears the context and fills it as llama-cpp-python's
``Llava15ChatHandler`` does: libmtmd splits the prompt at each ``MARKER`` into text
chunks (``llm.eval``) and image chunks (encoded by the projector and decoded into the
context by ``mtmd_helper_eval_chunk_single``). Images are decoded with Pillow, not
libmtmd's stb_image, so WebP and the other formats Pillow reads work too.

Why ``llm.generate(tokens)`` continues without evaluating anything again: it compares
``tokens`` with ``llm.input_ids[:llm.n_tokens]`` and, when they are equal and the
last decode produced the logits (``_requires_eval`` false), samples at once. So the
returned list is exactly ``input_ids[:n_tokens]``, and the prompt must end with text:
its last chunk goes through ``llm.eval``, which computes the last logits and clears
``_requires_eval`` (libmtmd decodes image embeddings without logits).

Image positions have no token; we write ``IMAGE_TOKEN`` (-1) there instead of leaving
whatever id an earlier request left in ``input_ids``. No tokenizer yields -1, so a
later text-only request's prefix match stops at the first image position and
``generate`` drops the cache from there (``kv_cache_seq_rm``) and evaluates its own
tokens: it reuses the text before the first image, never an image's cache. With stale
ids instead, a text request laid out like an earlier one could match through the image
positions and read the image's keys and values as if they were its text.

The caller's contract:
- call ``evaluate`` for every request with images (it resets; a token list from an
  earlier ``evaluate`` must not be passed to ``generate`` after another request, as
  its -1s would match another image's positions);
- pass the returned list unchanged (appending tokens is fine);
- never detokenize it (``echo``, ``logprobs``): -1 is not a token; its length is the
  prompt's size in context positions, which is what usage should count.
"""

from __future__ import annotations

import collections
import ctypes
import io
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import llama_cpp  # type: ignore[import-untyped,unused-ignore]
from llama_cpp import mtmd_cpp  # type: ignore[import-untyped,unused-ignore]
from PIL import Image

from llmux.backends.base import InvalidInput
from llmux.imaging import displayed_rgb

__all__ = ["IMAGE_TOKEN", "MARKER", "Projector", "bos_prefix", "decode_image"]

MARKER: Final[str] = mtmd_cpp.mtmd_default_marker().decode()
"""Where an image goes in the prompt text: ``<__media__>``."""

IMAGE_TOKEN: Final = -1
"""What an image's positions hold in the token list ``evaluate`` returns."""

_GGML_LOG_ERROR: Final = 4
_GGML_LOG_CONT: Final = 5
# NOTE: ggml's current numbering (NONE, DEBUG, INFO, WARN, ERROR, CONT); the comment in
# llama-cpp-python 0.3.36's _logger.py still shows an older one.


# -- libmtmd's log ------------------------------------------------------------------------


class _MtmdLog:
    """Keeps libmtmd's recent errors (to name why a load failed) and prints its
    messages to stderr only when the Llama is verbose, as llama-cpp-python does."""

    def __init__(self) -> None:
        self.verbose = False
        self.errors: collections.deque[str] = collections.deque(maxlen=8)
        self._last_level = 0

    def __call__(self, level: int, text: bytes, user_data: Any) -> None:
        message = text.decode("utf-8", errors="replace")
        level = self._last_level if level == _GGML_LOG_CONT else level
        self._last_level = level
        if level == _GGML_LOG_ERROR:
            self.errors.append(message.strip())
        if self.verbose:
            print(message, end="", flush=True, file=sys.stderr)


_LOG: Final = _MtmdLog()
_LOG_CALLBACK: Final = llama_cpp.llama_log_callback(_LOG)  # kept alive: C holds it
mtmd_cpp.mtmd_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
mtmd_cpp.mtmd_helper_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


# -- images (pure) -------------------------------------------------------------------------


def decode_image(data: bytes, index: int = 0) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an encoded image; transparency over white, EXIF
    orientation applied. ``index`` (0-based) only names the image in errors.

    Raises:
        InvalidInput: not an image Pillow can read, or too large (a decompression bomb).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                rgb = displayed_rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"Image {index + 1} is too large to decode: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for broken files
        raise InvalidInput(f"Image {index + 1} cannot be decoded ({len(data)} bytes): "
                           f"{exc}. Send a PNG, JPEG, WebP or GIF file.") from exc
    return rgb.width, rgb.height, rgb.tobytes()


# -- the projector -------------------------------------------------------------------------


def bos_prefix(llm: Any, first: int | None) -> list[int]:
    """``[BOS]`` if the vocabulary wants one and the prompt, whose first token is
    ``first``, does not start with it already (templates often write ``bos_token``
    themselves); else ``[]``."""
    bos = int(llm.token_bos())
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    wanted = bos >= 0 and llama_cpp.llama_vocab_get_add_bos(vocab)
    return [bos] if wanted and first != bos else []


class Projector:
    """A loaded ``mmproj`` for ``llm``'s text model. One request at a time, on the
    thread that uses ``llm``; ``close()`` it before ``llm.close()`` (it is also
    registered to close with ``llm``)."""

    def __init__(self, llm: Any, path: Path, *, use_gpu: bool,
                 n_threads: int | None = None) -> None:
        """Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: libmtmd could not load it (not a projector GGUF, or made for
                a text model of another embedding width), or it has no vision
                encoder; the message names the file and libmtmd's reason.
        """
        self._llm = llm
        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such mmproj file")
        with path.open("rb") as file:
            if file.read(4) != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file, so not an mmproj")
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = n_threads or llm.n_threads
        _LOG.verbose = bool(llm.verbose)
        _LOG.errors.clear()
        self._ctx: Any = mtmd_cpp.mtmd_init_from_file(str(path).encode(), llm.model, params)
        if not self._ctx:
            reason = " ".join(_LOG.errors) or "a broken or unsupported GGUF"
            raise ValueError(f"{path}: llama.cpp could not load this mmproj ({reason})")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            self.close()
            raise ValueError(f"{path}: this mmproj has no vision encoder (audio only?)")
        # NOTE: freed before the model on llm.close(): its stack unwinds last-in first.
        llm._stack.callback(self.close)

    def close(self) -> None:
        """Free the projector; idempotent."""
        if self._ctx:
            mtmd_cpp.mtmd_free(self._ctx)
            self._ctx = None

    @property
    def context_size(self) -> int:
        """Tokens the context holds: llama.cpp may round n_ctx up, but
        llama-cpp-python's token buffer has the size asked for."""
        return min(int(self._llm.n_ctx()), len(self._llm.input_ids))

    def image_tokens(self, image: bytes) -> int:
        """Context positions ``image`` takes (decodes and preprocesses it; does not
        run the encoder). Raises InvalidInput as ``evaluate``."""
        chunks = _Chunks(self._live(), MARKER, [image])
        try:
            return chunks.image_tokens
        finally:
            chunks.free()

    def evaluate(self, prompt_text: str, images: Sequence[bytes]) -> list[int]:
        """Clear the context, evaluate ``prompt_text`` with ``images`` in place of its
        ``MARKER``s (in order), and return the prompt's token list (``IMAGE_TOKEN`` at
        image positions) for ``llm.generate``/``create_completion`` to continue from.

        A BOS is added if the vocabulary wants one and the text does not start with it.
        A request refused before evaluation leaves the context as it was; a failure
        during evaluation leaves it empty, never half-filled.

        Raises:
            InvalidInput: an image cannot be decoded; markers and images differ in
                number; the prompt ends with an image; the prompt does not fit in the
                context (sizes named).
            RuntimeError: libmtmd failed to encode or decode (a fault).
        """
        count = prompt_text.count(MARKER)
        if count != len(images):
            raise InvalidInput(f"The prompt has {count} image marker(s) but "
                               f"{len(images)} image(s) came with it; each image needs "
                               "exactly one marker.")
        chunks = _Chunks(self._live(), prompt_text, images)
        try:
            if not chunks.ends_with_text():
                # NOTE: libmtmd decodes image embeddings without logits, so nothing
                # could be sampled after them; chat templates always end with text.
                raise InvalidInput("The prompt ends with an image; put some text after "
                                   "it (the model continues from text).")
            bos = bos_prefix(self._llm, chunks.first_token())
            total = chunks.n_tokens + len(bos)
            context = self.context_size
            if total == 0:
                raise InvalidInput("The prompt is empty.")
            if total >= context:
                raise InvalidInput.context_exceeded(
                    total, context, f"{chunks.image_tokens} of its tokens are for "
                    f"{len(images)} image(s): send fewer or smaller images, or a shorter "
                    "prompt.")
            return self._fill(chunks, bos)
        finally:
            chunks.free()

    # -- internals -------------------------------------------------------------------

    def _live(self) -> Any:
        if not self._ctx:
            raise RuntimeError(f"{self.path}: the projector is closed")
        return self._ctx

    def _fill(self, chunks: _Chunks, bos: list[int]) -> list[int]:
        llm = self._llm
        self._clear()
        try:
            if bos:
                llm.eval(bos)
            for chunk in chunks:
                if _is_text(chunk):
                    llm.eval(_text_tokens(chunk))
                else:
                    self._eval_media(chunk)
            tokens: list[int] = llm.input_ids[:llm.n_tokens].tolist()
        except BaseException:
            self._clear()
            raise
        return tokens

    def _eval_media(self, chunk: Any) -> None:
        """Encode an image chunk and decode it into the context after what is there."""
        llm = self._llm
        start = llm.n_tokens
        end = llama_cpp.llama_pos(0)
        status = mtmd_cpp.mtmd_helper_eval_chunk_single(
            self._ctx, llm.ctx, chunk, llama_cpp.llama_pos(start), llama_cpp.llama_seq_id(0),
            llm.n_batch, False, ctypes.byref(end))
        if status != 0:
            raise RuntimeError(f"{self.path}: libmtmd failed to evaluate an image "
                               f"(status {status}): {' '.join(_LOG.errors)}")
        llm.input_ids[start:end.value] = IMAGE_TOKEN
        llm.n_tokens = end.value

    def _clear(self) -> None:
        """Forget every position: llama-cpp-python's count and llama.cpp's KV cache."""
        self._llm.reset()
        memory = llama_cpp.llama_get_memory(self._llm.ctx)
        if memory:
            llama_cpp.llama_memory_clear(memory, True)


def _is_text(chunk: Any) -> bool:
    return bool(mtmd_cpp.mtmd_input_chunk_get_type(chunk)
                == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT)


def _text_tokens(chunk: Any) -> list[int]:
    size = ctypes.c_size_t()
    pointer = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(size))
    return [int(pointer[i]) for i in range(size.value)] if pointer else []


class _Chunks:
    """libmtmd's tokenization of a prompt with its images; ``free()`` releases the
    chunks and the bitmaps (kept as long as the chunks, as llama-cpp-python does)."""

    def __init__(self, ctx: Any, text: str, images: Sequence[bytes]) -> None:
        self._chunks: Any = None
        self._bitmaps: list[Any] = []
        try:
            for index, image in enumerate(images):
                width, height, rgb = decode_image(image, index)
                buffer = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
                bitmap = mtmd_cpp.mtmd_bitmap_init(width, height, buffer)
                if not bitmap:
                    raise RuntimeError("libmtmd could not allocate an image bitmap")
                self._bitmaps.append(bitmap)
            self._chunks = mtmd_cpp.mtmd_input_chunks_init()
            if not self._chunks:
                raise RuntimeError("libmtmd could not allocate input chunks")
            encoded = text.encode()
            inputs = mtmd_cpp.mtmd_input_text(text=encoded, text_len=len(encoded),
                                              add_special=False, parse_special=True)
            count = len(self._bitmaps)
            array = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, count))(*self._bitmaps)
            status = mtmd_cpp.mtmd_tokenize(ctx, self._chunks, ctypes.byref(inputs),
                                            array, count)
            if status == 1:
                raise InvalidInput(f"The prompt's image markers ({text.count(MARKER)}) "
                                   f"and images ({count}) differ in number.")
            if status != 0:
                raise InvalidInput(f"The image(s) could not be prepared for this model's "
                                   f"projector (libmtmd status {status}).")
        except BaseException:
            self.free()
            raise

    def free(self) -> None:
        """Idempotent."""
        if self._chunks:
            mtmd_cpp.mtmd_input_chunks_free(self._chunks)
            self._chunks = None
        while self._bitmaps:
            mtmd_cpp.mtmd_bitmap_free(self._bitmaps.pop())

    def __len__(self) -> int:
        return int(mtmd_cpp.mtmd_input_chunks_size(self._chunks))

    def __iter__(self) -> Any:
        for index in range(len(self)):
            yield mtmd_cpp.mtmd_input_chunks_get(self._chunks, index)

    @property
    def n_tokens(self) -> int:
        """Context positions of the whole prompt (the larger of cells and positions:
        M-RoPE models give an image fewer positions than embeddings)."""
        return max(int(mtmd_cpp.mtmd_helper_get_n_tokens(self._chunks)),
                   int(mtmd_cpp.mtmd_helper_get_n_pos(self._chunks)))

    @property
    def image_tokens(self) -> int:
        return sum(int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)) for chunk in self
                   if not _is_text(chunk))

    def first_token(self) -> int | None:
        """The prompt's first token if it starts with text, else None."""
        for chunk in self:
            tokens = _text_tokens(chunk) if _is_text(chunk) else []
            return tokens[0] if tokens else None
        return None

    def ends_with_text(self) -> bool:
        """Whether the last chunk is text (an empty prompt counts as text)."""
        size = len(self)
        return size == 0 or _is_text(mtmd_cpp.mtmd_input_chunks_get(self._chunks, size - 1))
