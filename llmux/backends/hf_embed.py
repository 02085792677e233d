"""Sentence embeddings through transformers: the ``embed`` op.

A sentence-transformers checkpoint says how its token vectors become one: modules.json
lists its modules (Transformer, Pooling, Normalize), 1_Pooling/config.json the pooling
(cls, mean, max, mean_sqrt_len, lasttoken; several are concatenated, as
sentence-transformers does), sentence_bert_config.json the ``max_seq_length`` it was
trained for. Without them: mean pooling over the attention mask, then L2 normalisation.
Inputs are embedded in batches of ``batch_size``, each truncated to the sequence limit
(the ``max_length`` option, else ``max_seq_length``, else the tokenizer's), never beyond
what the model's position embeddings take.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from transformers import AutoModel, AutoTokenizer

from llmux.backends.base import InvalidInput, ProgressFn
from llmux.backends.hf_common import Checkpoint, LoadSettings, Stream, release

__all__ = ["Recipe", "TextEmbedder", "model_capacity", "pool", "read_recipe"]

DEFAULT_BATCH: Final = 32


def _summed(hidden: Any, mask: Any) -> tuple[Any, Any]:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)


def _mean(hidden: Any, mask: Any) -> Any:
    summed, count = _summed(hidden, mask)
    return summed / count


def _mean_sqrt_len(hidden: Any, mask: Any) -> Any:
    summed, count = _summed(hidden, mask)
    return summed / count.sqrt()


def _max(hidden: Any, mask: Any) -> Any:
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), -1e9).max(dim=1).values


def _cls(hidden: Any, mask: Any) -> Any:
    return hidden[:, 0]


def _last_token(hidden: Any, mask: Any) -> Any:
    """The vector of each row's last kept token, whichever side the padding is on."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLINGS: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    # sentence-transformers' Pooling config keys, in the order it concatenates them
    "pooling_mode_cls_token": _cls,
    "pooling_mode_max_tokens": _max,
    "pooling_mode_mean_tokens": _mean,
    "pooling_mode_mean_sqrt_len_tokens": _mean_sqrt_len,
    "pooling_mode_lasttoken": _last_token,
}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a checkpoint's token vectors become a sentence's: ``poolings`` (keys of
    POOLINGS, concatenated), whether the result is L2-normalised, and the sequence
    length it was trained for (None: not said)."""

    poolings: tuple[str, ...] = ("pooling_mode_mean_tokens",)
    normalize: bool = True
    max_seq_length: int | None = None


def _json(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _poolings(config: Mapping[str, Any], where: Path) -> tuple[str, ...]:
    """Raises ValueError for a pooling llmux does not do, or none at all."""
    if config.get("pooling_mode_weightedmean_tokens"):
        raise ValueError(f"{where}: weighted-mean pooling is not supported")
    modes = tuple(key for key in POOLINGS if config.get(key))
    if not modes:
        raise ValueError(f"{where}: names no pooling mode")
    return modes


def read_recipe(directory: Path) -> Recipe:
    """The sentence-transformers recipe of the checkpoint in ``directory``; the
    default (mean, normalised) where it has none.

    Raises:
        ValueError: a module llmux cannot apply (Dense, ...) or an unknown pooling:
            its vectors would silently differ from the model's.
    """
    bert = directory / "sentence_bert_config.json"
    length = _json(bert).get("max_seq_length") if bert.is_file() else None
    max_seq_length = length if isinstance(length, int) and length > 0 else None
    modules = directory / "modules.json"
    if not modules.is_file():
        return Recipe(max_seq_length=max_seq_length)
    poolings, normalize = Recipe.poolings, False
    for module in json.loads(modules.read_text(encoding="utf-8")):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = directory / str(module.get("path", "")) / "config.json"
            poolings = _poolings(_json(config), config)
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise ValueError(f"{modules}: module {module.get('type')!r} is not supported; "
                             "llmux applies Transformer, Pooling and Normalize only")
    return Recipe(poolings=poolings, normalize=normalize, max_seq_length=max_seq_length)


def pool(hidden: Any, mask: Any, recipe: Recipe) -> Any:
    """One float32 vector per row of ``hidden`` (batch, tokens, dim), over the tokens
    ``mask`` (batch, tokens) keeps."""
    vectors = torch.cat([POOLINGS[key](hidden, mask) for key in recipe.poolings], dim=-1)
    vectors = vectors.float()
    return torch.nn.functional.normalize(vectors, p=2, dim=-1) if recipe.normalize else vectors


def model_capacity(model: Any) -> int | None:
    """How many tokens the encoder's position embeddings take (None: no limit known).

    NOTE: RoBERTa-style embeddings (RoBERTa, XLM-R, MPNet) number positions from
    ``padding_idx + 1``: 514 embeddings hold 512 tokens.
    """
    positions = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    if isinstance(positions, torch.nn.Embedding):
        offset = positions.padding_idx + 1 if positions.padding_idx is not None else 0
        return int(positions.num_embeddings) - offset
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


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
        self.recipe = Recipe()

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        label = self.checkpoint.label
        progress(0.1, f"loading {label}")
        self.recipe = read_recipe(self.checkpoint.directory)
        self.tokenizer = AutoTokenizer.from_pretrained(
            **self.checkpoint.kwargs(), trust_remote_code=self.settings.trust_remote_code)
        self.model = AutoModel.from_pretrained(
            **self.checkpoint.kwargs(), **self.settings.model_kwargs())
        self.model.eval()
        self.max_length = self._max_length()
        progress(1.0, f"loaded {label}")
        return {"embedding_dim": int(self.model.config.hidden_size),
                "context_length": self.max_length}

    def _max_length(self) -> int:
        """The option, else the recipe's, else the tokenizer's; within the model's."""
        wanted = (self.max_length_option or self.recipe.max_seq_length
                  or self.tokenizer.model_max_length)
        capacity = model_capacity(self.model)
        return min(int(wanted), capacity) if capacity else int(wanted)

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
        vectors = pool(hidden, encoded["attention_mask"], self.recipe)
        return vectors.cpu().tolist(), int(encoded["attention_mask"].sum())
