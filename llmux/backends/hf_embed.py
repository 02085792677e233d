"""Sentence embeddings through transformers: the ``embed`` op.

Mean pooling over the attention mask, then L2 normalisation (the sentence-transformers
recipe of all-MiniLM, e5, bge-style encoders used as mean-pooled). Inputs are embedded
in batches of ``batch_size``, each truncated to ``max_length`` tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final

import torch
from transformers import AutoModel, AutoTokenizer

from llmux.backends.base import InvalidInput, ProgressFn
from llmux.backends.hf_common import Checkpoint, LoadSettings, Stream, release

__all__ = ["TextEmbedder", "mean_pool"]

DEFAULT_BATCH: Final = 32


def mean_pool(hidden: Any, mask: Any) -> Any:
    """The L2-normalised mean of ``hidden`` (batch, tokens, dim) over the tokens
    ``mask`` (batch, tokens) keeps."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    mean = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean.float(), p=2, dim=-1)


class TextEmbedder:
    """A tokenizer and an ``AutoModel`` encoder; serves ``embed``."""

    ops = frozenset({"embed"})

    def __init__(self, checkpoint: Checkpoint, settings: LoadSettings,
                 options: Mapping[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self.max_length_option = options.get("max_length")
        self.batch_size = int(options.get("batch_size", DEFAULT_BATCH))
        if self.batch_size < 1:
            raise ValueError(f"option batch_size must be at least 1, got {self.batch_size}")
        self.tokenizer: Any = None
        self.model: Any = None
        self.max_length = 0

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        label = self.checkpoint.label
        progress(0.1, f"loading {label}")
        self.tokenizer = AutoTokenizer.from_pretrained(
            **self.checkpoint.kwargs(), trust_remote_code=self.settings.trust_remote_code)
        self.model = AutoModel.from_pretrained(
            **self.checkpoint.kwargs(), **self.settings.model_kwargs())
        self.model.eval()
        limits = [int(self.tokenizer.model_max_length)]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        if self.max_length_option:
            limits.append(int(self.max_length_option))
        self.max_length = min(limits)
        progress(1.0, f"loaded {label}")
        return {"embedding_dim": int(self.model.config.hidden_size),
                "context_length": self.max_length}

    def warmup(self) -> None:
        self._embed(["warmup"])

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
        release(self.settings.on_cuda)

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event) -> Stream:
        yield from ()  # nothing to stream: the result is the done data
        raw = payload.get("input", [])
        texts = [raw] if isinstance(raw, str) else list(raw)
        if not texts:
            raise InvalidInput("input is empty: send at least one string to embed.")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInput("input must be a string or a list of strings")
        vectors: list[list[float]] = []
        tokens = 0
        for start in range(0, len(texts), self.batch_size):
            if cancelled.is_set():
                return {"embeddings": vectors, "finish_reason": "cancelled",
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
            batch, used = self._embed(texts[start:start + self.batch_size])
            vectors += batch
            tokens += used
        return {"embeddings": vectors,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """The vectors of ``texts`` and how many tokens they took."""
        encoded = self.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        encoded = encoded.to(self.model.device)
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
        vectors = mean_pool(hidden, encoded["attention_mask"])
        return vectors.cpu().tolist(), int(encoded["attention_mask"].sum())
