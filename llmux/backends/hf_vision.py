"""Vision-language models through transformers: the ``chat`` op with image parts (and
``complete``, text only), for an ``AutoModelForImageTextToText`` of the Qwen-VL family
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) or another whose processor takes an image processor,
a tokenizer and a chat template.

Generation is the causal LM's (hf_causal): the same streaming loop in a thread, stop
strings, cancellation, sampling and token budget; only the inputs differ. The chat
template (the processor's) writes one image placeholder per image part, and the
processor expands each into the model's image tokens, so ``prompt_tokens`` counts them.

The processor is assembled here from its parts rather than by ``AutoProcessor``, which
also loads a video processor, and transformers' video processors need torchvision
(not installed with llmux). ``AutoImageProcessor`` uses its torchvision backend when
torchvision is installed and falls back to the PIL one (``Qwen2VLImageProcessorPil``)
otherwise; both give the same inputs.

Options (besides the llm ones: context_length, max_new_tokens, chat_template):

    min_pixels, max_pixels  the image area the processor resizes each image into
                       (default: the checkpoint's); fewer pixels, fewer image tokens
"""

from __future__ import annotations

import inspect
import io
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from llmux.backends.base import InvalidInput, ProgressFn
from llmux.backends.hf_causal import CausalLM
from llmux.backends.hf_common import Checkpoint, LoadSettings
from llmux.chat.render import template_kwargs
from llmux.chat.tagged import open_thought_closed
from llmux.chat.templates import vision_messages
from llmux.imaging import displayed_rgb

__all__ = ["PIXEL_OPTIONS", "VisionLM", "image_only", "open_image", "processor_class"]

PIXEL_OPTIONS: Final = ("min_pixels", "max_pixels")


def open_image(data: bytes) -> Image.Image:
    """An image part's file as the RGB picture a viewer shows (``displayed_rgb``).

    Raises:
        InvalidInput: Pillow cannot decode it.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return displayed_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"An image could not be decoded: {exc}") from exc


def processor_class(model_type: str) -> type:
    """The transformers processor class of a model type (``qwen2_vl`` ->
    ``Qwen2VLProcessor``), without its video processor.

    Raises:
        ValueError: transformers names no processor for it, or one that takes no images.
    """
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or "image_processor" not in inspect.signature(cls.__init__).parameters:
        raise ValueError(f"transformers has no image processor class for {model_type!r} "
                         "models; the vlm kind serves image-text-to-text models such as "
                         "Qwen2-VL, Qwen2.5-VL and Qwen3-VL")
    return image_only(cls)


def image_only(cls: type) -> type:
    """``cls`` built without a video processor.

    NOTE: a processor's sub-processors are the parameters of its ``__init__``, and
    ``ProcessorMixin`` insists on an instance of each (a video processor cannot even be
    looked up without torchvision). The subclass's ``__init__`` names no video
    processor, so there is none to insist on; ``__call__`` only touches it for videos.
    """
    if "video_processor" not in inspect.signature(cls).parameters:
        return cls
    base: Any = cls

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                     video_processor=None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__,
                                       "__doc__": f"{cls.__name__} for images only."})


def checkpoint_template(directory: Path) -> str | None:
    """The processor's chat template saved beside the weights, if any
    (``chat_template.jinja``, or ``chat_template.json`` as older checkpoints have it)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = directory / "chat_template.json"
    if legacy.is_file():
        template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


class VisionLM(CausalLM):
    """A processor and an ``AutoModelForImageTextToText``; serves ``chat`` (text and
    image parts) and ``complete``."""

    ops = frozenset({"chat", "complete", "template"})

    def __init__(self, checkpoint: Checkpoint, settings: LoadSettings,
                 options: Mapping[str, Any]) -> None:
        super().__init__(checkpoint, settings, options)
        self.pixel_limits = {key: options[key] for key in PIXEL_OPTIONS  # checked with
                             if options.get(key) is not None}  # the config (options.py)
        self.processor: Any = None
        self.template: str | None = None

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        label = self.checkpoint.label
        trust = {"trust_remote_code": self.settings.trust_remote_code}
        progress(0.05, f"loading the processor of {label}")
        tokenizer = AutoTokenizer.from_pretrained(**self.checkpoint.kwargs(), **trust)
        images = AutoImageProcessor.from_pretrained(**self.checkpoint.kwargs(), **trust,
                                                    **self.pixel_limits)
        progress(0.3, f"loading the weights of {label}")
        self.model = AutoModelForImageTextToText.from_pretrained(
            **self.checkpoint.kwargs(), **self.settings.model_kwargs())
        self.model.eval()
        self.template = (str(self.chat_template) if self.chat_template else
                         checkpoint_template(self.checkpoint.directory)
                         or getattr(tokenizer, "chat_template", None))
        self.processor = processor_class(self.model.config.model_type)(
            image_processor=images, tokenizer=tokenizer, chat_template=self.template)
        self.tokenizer = tokenizer
        self.context_length = self._context_length()
        progress(1.0, f"loaded {label}")
        return {"context_length": self.context_length}

    def warmup(self) -> None:
        """One token of an answer about a small grey image: READY means the vision
        tower ran too (text only for a checkpoint without a chat template)."""
        if not self.template:
            super().warmup()
            return
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(png, format="PNG")
        message = {"role": "user", "content": [{"type": "image", "image": png.getvalue()},
                                               {"type": "text", "text": "Describe."}]}
        payload = {"messages": [message], "max_tokens": 1}
        for _ in self._stream(self._chat_inputs(payload)[1], payload, threading.Event()):
            pass

    def unload(self) -> None:
        self.processor = None
        super().unload()

    def _template_source(self) -> str:
        return self.template or ""

    def _chat_inputs(self, payload: Mapping[str, Any], prefill: str = "", *,
                     close_thought: bool = False) -> tuple[str, Any]:
        """The prompt text (``prefill`` starts the answer; ``close_thought``: a think
        block the template leaves open is closed) and the processor's inputs: token ids
        with each image's tokens, and the pixels.

        Raises:
            InvalidInput: no messages, no chat template, an image that cannot be
                decoded or prepared (too extreme an aspect ratio, ...).
        """
        messages, images = vision_messages(payload.get("messages") or [],
                                           template=self.template or "")
        if not messages:
            raise InvalidInput("messages is empty: send at least one message.")
        if not self.template:
            raise InvalidInput("This model has no chat template; use the completions endpoint "
                               "with a prompt instead.")
        tools = payload.get("tools")
        prompt = str(self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tools=list(tools) if tools else None,
            add_generation_prompt=True, tokenize=False, **template_kwargs(payload)))
        prompt = (open_thought_closed(prompt) if close_thought else prompt) + prefill
        pictures = [open_image(data) for data in images]
        try:
            return prompt, self.processor(text=[prompt], images=pictures or None,
                                          return_tensors="pt", add_special_tokens=False)
        except ValueError as exc:
            raise InvalidInput(f"The images could not be prepared for this model: {exc}"
                               ) from exc

    def _model_inputs(self, inputs: Any) -> dict[str, Any]:
        """Everything the processor made but BERT-style token types, on the model's
        device; pixels in the model's dtype."""
        out = {}
        for key, value in inputs.items():
            if key == "token_type_ids" or not isinstance(value, torch.Tensor):
                continue
            value = value.to(self.model.device)
            out[key] = value.to(self.model.dtype) if value.is_floating_point() else value
        return out
