"""RapidOCR (PP-OCR detection + recognition on onnxruntime) for the ``ocr`` op.

The PP-OCRv4 models ship inside the ``rapidocr-onnxruntime`` package, so ``model_path``
may be left out. Set, it is a directory holding the three ONNX files; each is the one
``.onnx`` there whose name contains ``det``, ``cls`` or ``rec``, unless an option names
it. Options, all optional:

    text_score            lowest recognition confidence kept, 0..1 (default 0.5)
    box_thresh            lowest detection box score, 0..1 (default 0.5)
    unclip_ratio          how far detected boxes are grown (default 1.6)
    use_cls               classify and turn upside-down lines (default true);
                          ``use_angle_cls`` is PaddleOCR's name for the same switch
    intra_op_num_threads  onnxruntime threads per operator (0, the default: one per core)
    inter_op_num_threads  onnxruntime threads across operators (0: onnxruntime's default)
    max_side_len          longer images are scaled down to this many pixels (default 2000)
    det_limit_side_len    the detector's working resolution (default 736)
    det_model_path, cls_model_path, rec_model_path, rec_keys_path
                          files (``pkg:`` paths too; relative ones inside ``model_path``)

NOTE: rapidocr-onnxruntime runs on the CPU here (this onnxruntime has no CUDA build);
a ``cuda:N`` device is refused at load rather than silently served on the CPU.

``ocr``: payload ``{"image": bytes}`` (any format Pillow reads) -> done ``{"text",
"lines": [{"text", "confidence", "box": [[x, y] x4]}]}``, lines in reading order.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy
from PIL import Image, UnidentifiedImageError

from llmux.backends.base import Backend, InvalidInput, ProgressFn, Stream, parse_device
from llmux.backends.paths import PREFIX, resolve_model_path
from llmux.imaging import displayed_rgb

__all__ = ["RapidOcrBackend", "reading_order", "rows_text"]

_THREADS: Final = ("intra_op_num_threads", "inter_op_num_threads")
_FILES: Final = {"det_model_path": "det", "cls_model_path": "cls", "rec_model_path": "rec",
                 "rec_keys_path": None}
ROW_OVERLAP: Final = 0.5  # centres closer than half a line's height share a row
WARMUP_SIZE: Final = (64, 32)


# --- reading order (pure) ---------------------------------------------------------------


def _span(line: Mapping[str, Any]) -> tuple[float, float, float]:
    """(vertical centre, height, left edge) of a line's box."""
    xs = [float(p[0]) for p in line["box"]]
    ys = [float(p[1]) for p in line["box"]]
    return (min(ys) + max(ys)) / 2, max(ys) - min(ys), min(xs)


def reading_order(lines: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Lines grouped into rows, top to bottom, each row left to right.

    A line joins the row above it when its vertical centre is within ``ROW_OVERLAP``
    of the smaller of the two heights from the row's centre, so words a detector split
    on one baseline (a label and its value, table cells) read as one row even when
    their boxes are a few pixels apart vertically.
    """
    spans = sorted(((_span(line), line) for line in lines), key=lambda item: item[0][0])
    rows: list[list[tuple[tuple[float, float, float], Mapping[str, Any]]]] = []
    for span, line in spans:
        if rows:
            row = rows[-1]
            centre = sum(s[0] for s, _ in row) / len(row)
            height = sum(s[1] for s, _ in row) / len(row)
            if abs(span[0] - centre) <= ROW_OVERLAP * max(1.0, min(height, span[1])):
                row.append((span, line))
                continue
        rows.append([(span, line)])
    return [[line for _, line in sorted(row, key=lambda item: item[0][2])] for row in rows]


def rows_text(rows: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    """One text line per row, the row's pieces separated by a space."""
    return "\n".join(" ".join(str(line["text"]) for line in row) for row in rows)


# --- options ----------------------------------------------------------------------------


def _settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """RapidOCR's keyword arguments from the config's options (checked with the config:
    options.py)."""
    settings: dict[str, Any] = {}
    for key, value in options.items():
        if key in _THREADS:
            settings[key] = value or -1  # RapidOCR's "onnxruntime decides"
        elif key == "use_angle_cls":
            settings["use_cls"] = value
        else:
            settings[key] = value
    return settings


def _model_files(model_path: Any, settings: dict[str, Any]) -> dict[str, str]:
    """Absolute paths for the file options, found in ``model_path`` where not named.

    Raises:
        FileNotFoundError: a named file is missing.
        ValueError: ``model_path`` is not a directory, or holds no single file of a kind.
    """
    directory = resolve_model_path(str(model_path)) if model_path else None
    if directory is not None and not directory.is_dir():
        raise ValueError(f"{model_path}: {directory} is not a directory; the rapidocr backend "
                         "takes a directory of det/cls/rec .onnx files (or no model_path)")
    files: dict[str, str] = {}
    for key, kind in _FILES.items():
        value = settings.get(key)
        if value is not None:
            if directory is not None and not value.startswith(PREFIX) and \
                    not Path(value).is_absolute():
                value = str(directory / value)
            files[key] = str(resolve_model_path(value))
        elif directory is not None and kind is not None:
            found = sorted(p for p in directory.glob("*.onnx") if kind in p.name.lower())
            if len(found) != 1:
                raise ValueError(f"{model_path}: expected one .onnx file with {kind!r} in its "
                                 f"name, found {len(found)}; name it with option {key}")
            files[key] = str(found[0])
    return files


# --- the backend ------------------------------------------------------------------------


class RapidOcrBackend(Backend):
    """One RapidOCR engine; each request reads one image."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        device = str(spec.get("device") or "cpu")
        if parse_device(device)[0] != "cpu":
            raise ValueError(f"device {device}: rapidocr-onnxruntime runs on the CPU here; "
                             "place this model on device cpu")
        self.settings = _settings(self.options)
        self._call = {"text_score": self.settings.pop("text_score", 0.5),
                      "box_thresh": self.settings.pop("box_thresh", 0.5),
                      "unclip_ratio": self.settings.pop("unclip_ratio", 1.6)}
        self._engine: Any = None

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        """Open the three ONNX sessions.

        Raises:
            FileNotFoundError, ValueError: a model file is missing or ambiguous.
            ImportError: rapidocr-onnxruntime is not installed in this interpreter.
        """
        # NOTE: imported here, not at the top, so the pure reading-order code above can
        # be used (and tested) without loading onnxruntime and OpenCV.
        from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped]

        files = _model_files(self.spec.get("model_path"), self.settings)
        progress(0.2, "opening the PP-OCR detection, classification and recognition models")
        self._engine = RapidOCR(**{**self.settings, **files})
        progress(1.0, "loaded")
        return {}

    def warmup(self) -> None:
        """One tiny blank image through detection (which finds nothing)."""
        self._read(Image.new("RGB", WARMUP_SIZE, "white"))

    def unload(self) -> None:
        self._engine = None

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event
              ) -> Stream:
        if op != "ocr":
            raise InvalidInput(f"this OCR model cannot do {op!r}; it only reads images (ocr)")
        image = _decode(payload.get("image"))
        return self._ocr(image, cancelled)

    def _ocr(self, image: Image.Image, cancelled: threading.Event) -> Stream:
        yield from ()  # nothing to stream: the result is the done data
        if cancelled.is_set():
            return {"text": "", "lines": [], "finish_reason": "cancelled"}
        rows = reading_order(self._read(image))
        return {"text": rows_text(rows), "lines": [line for row in rows for line in row]}

    def _read(self, image: Image.Image) -> list[dict[str, Any]]:
        """The recognised lines, in the detector's order."""
        if self._engine is None:
            raise RuntimeError("the rapidocr engine is not loaded")
        # NOTE: RapidOCR takes an array as OpenCV's BGR; Pillow gives RGB.
        pixels = numpy.ascontiguousarray(numpy.asarray(image.convert("RGB"))[:, :, ::-1])
        found, _ = self._engine(pixels, **self._call)
        return [{"text": str(text), "confidence": float(score),
                 "box": [[float(x), float(y)] for x, y in box]}
                for box, text, score in found or () if str(text).strip()]


def _decode(data: Any) -> Image.Image:
    """The image of ``data`` as a viewer shows it (``displayed_rgb``): upright,
    transparency over white.

    Raises:
        InvalidInput: no bytes, or bytes Pillow cannot decode.
    """
    if not isinstance(data, bytes | bytearray) or not data:
        raise InvalidInput("The request has no image: send the image file's bytes.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return displayed_rgb(image)
    except UnidentifiedImageError as exc:
        raise InvalidInput("The image cannot be read: its bytes are not an image format "
                           "Pillow knows (PNG, JPEG, WebP, TIFF, ...).") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"The image is too large: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise InvalidInput(f"The image is damaged or incomplete: {exc}") from exc
