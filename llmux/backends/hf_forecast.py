"""Time-series forecasting with TimesFM 2.5 through transformers: the ``forecast`` op.

Payload ``{"series": [[float | None, ...], ...], "horizon": int, "quantiles": [float]
| None}``; done ``{"point": [[float] * horizon per series], "quantiles": {"0.1":
[[...] per series], ...}, "finish_reason"}``.

What the model authors' own ``forecast()`` (google-research/timesfm) does, and so do we:
leading missing values are dropped, inner gaps are filled by linear interpolation and
trailing ones hold the last value; a series that is non-negative gets non-negative
forecasts (decided per series: transformers decides it per batch, so a series' result
would depend on its neighbours); crossing quantiles are made monotonic (the authors'
``fix_quantile_crossing`` flag; an option here, default on). Unlike the authors' code, a
series longer than the model's context is refused unless the model's option
``truncate`` is set (then its most recent points are used), and the horizon is at most
one output patch (``horizon_length``, 128): transformers' TimesFM does not decode
autoregressively.

TimesFM predicts fixed quantiles (``config.quantiles``, 0.1 ... 0.9); a request may ask
for any of them (``quantiles`` null: all of them, []: none) and is refused for any
other: mapping 0.25 to 0.2 or 0.3 would answer a question the client did not ask. The
point forecast is the model's median head (``decode_index``). Series are sorted by
length and run ``batch_size`` at a time, each batch padded only to its longest series
(rounded up to a patch): the forecast of a series does not depend on the padding or on
its neighbours.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import numpy as np
import torch
from transformers import AutoConfig, TimesFm2_5ModelForPrediction

from llmux.backends.base import InvalidInput, ProgressFn
from llmux.backends.hf_common import Checkpoint, LoadSettings, Stream, release

__all__ = ["Forecaster", "Limits", "fill_gaps", "fix_crossing", "padded_length",
           "quantile_keys"]

DEFAULT_BATCH: Final = 32
MODEL_TYPE: Final = "timesfm2_5"
TOLERANCE: Final = 1e-6  # a requested quantile this close to a predicted one is that one


@attrs.frozen(kw_only=True)
class Limits:
    """What one loaded TimesFM can do: context, horizon and the quantiles it predicts
    (``truncate``: a longer series keeps its most recent ``max_context`` points)."""

    max_context: int
    max_horizon: int
    patch_length: int
    quantiles: tuple[float, ...]
    truncate: bool = False


def quantile_keys(requested: Any, limits: Limits) -> dict[str, int]:
    """``{"0.1": 1, ...}``: each requested quantile's response key and its index in the
    model's output (index 0 is the mean); every predicted quantile when none is asked.

    Raises:
        InvalidInput: not a list of numbers, or a quantile the model does not predict.
    """
    predicted = {q: i for i, q in enumerate(limits.quantiles, start=1)}
    offered = ", ".join(f"{q:g}" for q in limits.quantiles)
    if requested is None:
        return {f"{q:g}": i for q, i in predicted.items()}
    if not isinstance(requested, list | tuple):
        raise InvalidInput(f"quantiles must be a list of numbers among {offered}")
    keys: dict[str, int] = {}
    for q in requested:
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q < 1:
            raise InvalidInput(f"quantiles must be numbers between 0 and 1 (exclusive), "
                               f"got {q!r}")
        match = next((p for p in predicted if abs(p - q) <= TOLERANCE), None)
        if match is None:
            raise InvalidInput(f"This model predicts the quantiles {offered} only; {q:g} "
                               "is not one of them.")
        keys[f"{match:g}"] = predicted[match]
    return keys


def fill_gaps(values: Sequence[Any], index: int) -> np.ndarray[Any, Any]:
    """The series as float64, missing values (None, NaN) handled as TimesFM's authors
    do: leading ones dropped, inner ones linearly interpolated, trailing ones held.

    Raises:
        InvalidInput: not a list of numbers, empty, all missing, or infinite values.
    """
    if not isinstance(values, list | tuple):
        raise InvalidInput(f"series[{index}] must be a list of numbers or nulls")
    if not values:
        raise InvalidInput(f"series[{index}] is empty: send at least one value")
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, int | float))
           for v in values):
        raise InvalidInput(f"series[{index}] must hold numbers or nulls only")
    try:
        array = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    except OverflowError:
        raise InvalidInput(f"series[{index}] holds a number too large for a float") from None
    if np.isinf(array).any():
        raise InvalidInput(f"series[{index}] holds an infinite value")
    missing = np.isnan(array)
    if missing.all():
        raise InvalidInput(f"series[{index}] has no values: every entry is missing")
    filled: np.ndarray[Any, Any] = array[int(np.argmax(~missing)):]
    missing = np.isnan(filled)
    if missing.any():
        known = np.flatnonzero(~missing)
        filled[missing] = np.interp(np.flatnonzero(missing), known, filled[known])
    return filled


def padded_length(longest: int, limits: Limits) -> int:
    """The context one batch is padded to: its longest series rounded up to a whole
    patch (TimesFM reads patches), at most the model's context."""
    patches = -(-longest // limits.patch_length)
    return min(patches * limits.patch_length, limits.max_context)


def fix_crossing(full: torch.Tensor, median: int) -> torch.Tensor:
    """Quantiles that never cross: below the median each is at most the next one up,
    above it at least the next one down (``full``: batch, horizon, 1 + quantiles)."""
    out = full.clone()
    for i in range(median - 1, 0, -1):
        out[..., i] = torch.minimum(out[..., i], out[..., i + 1])
    for i in range(median + 1, out.shape[-1]):
        out[..., i] = torch.maximum(out[..., i], out[..., i - 1])
    return out


class Forecaster:
    """A ``TimesFm2_5ModelForPrediction``; serves ``forecast``."""

    ops = frozenset({"forecast"})

    def __init__(self, checkpoint: Checkpoint, settings: LoadSettings,
                 options: Mapping[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self.batch_size = int(options.get("batch_size", DEFAULT_BATCH))
        if self.batch_size < 1:
            raise ValueError(f"option batch_size must be at least 1, got {self.batch_size}")
        self.truncate = bool(options.get("truncate", False))
        self.fix_quantile_crossing = bool(options.get("fix_quantile_crossing", True))
        self.model: Any = None
        self.limits: Limits | None = None

    def load(self, progress: ProgressFn) -> dict[str, Any]:
        """Raises ValueError for a checkpoint that is not TimesFM 2.5."""
        label = self.checkpoint.label
        progress(0.1, f"loading {label}")
        config = AutoConfig.from_pretrained(
            **self.checkpoint.kwargs(), trust_remote_code=self.settings.trust_remote_code)
        if config.model_type != MODEL_TYPE:
            raise ValueError(f"{label} is a {config.model_type!r} checkpoint; the forecast "
                             f"type loads TimesFM 2.5 ({MODEL_TYPE!r}) only")
        self.model = TimesFm2_5ModelForPrediction.from_pretrained(
            **self.checkpoint.kwargs(), config=config, **self.settings.model_kwargs())
        self.model.eval()
        patch = int(config.patch_length)
        self.limits = Limits(max_context=int(config.context_length) // patch * patch,
                             max_horizon=int(config.horizon_length), patch_length=patch,
                             quantiles=tuple(float(q) for q in config.quantiles),
                             truncate=self.truncate)
        progress(1.0, f"loaded {label}")
        return {"context_length": self.limits.max_context,
                "max_horizon": self.limits.max_horizon,
                "quantiles": list(self.limits.quantiles)}

    def warmup(self) -> None:
        self._forecast([np.linspace(0.0, 1.0, 8)], 1)

    def unload(self) -> None:
        self.model = None
        release(self.settings.on_cuda)

    def infer(self, op: str, payload: Mapping[str, Any], cancelled: threading.Event) -> Stream:
        """Forecast batch by batch, checking ``cancelled`` before each; a cancelled
        request returns ``finish_reason: cancelled`` and no forecasts (the batches run
        in length order, so the series done so far are not a prefix of the request)."""
        yield from ()  # nothing to stream: the result is the done data
        limits = self._limits()
        series, horizon, keys = self._checked(payload, limits)
        order = sorted(range(len(series)), key=lambda i: len(series[i]))
        rows: dict[int, np.ndarray[Any, Any]] = {}
        for start in range(0, len(order), self.batch_size):
            if cancelled.is_set():
                return {"point": [], "quantiles": {key: [] for key in keys},
                        "finish_reason": "cancelled"}
            batch = order[start:start + self.batch_size]
            full = self._forecast([series[i] for i in batch], horizon)
            for i, forecast in zip(batch, full, strict=True):
                if not np.isfinite(forecast).all():
                    raise InvalidInput(f"The forecast of series[{i}] is not finite: its "
                                       "values are too large for the model's arithmetic; "
                                       "rescale the series.")
                rows[i] = forecast
        done = range(len(series))
        median = int(self.model.config.decode_index)
        return {"point": [rows[i][:, median].tolist() for i in done],
                "quantiles": {key: [rows[i][:, q].tolist() for i in done]
                              for key, q in keys.items()},
                "finish_reason": "stop"}

    def _checked(self, payload: Mapping[str, Any], limits: Limits
                 ) -> tuple[list[np.ndarray[Any, Any]], int, dict[str, int]]:
        """The filled series, the horizon and the quantile keys of a valid request.

        Raises:
            InvalidInput: no series, a bad series, horizon or quantile.
        """
        horizon = payload.get("horizon")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or not (
                1 <= horizon <= limits.max_horizon):
            raise InvalidInput(f"horizon must be an integer from 1 to {limits.max_horizon} "
                               f"(this model's longest forecast), got {horizon!r}")
        keys = quantile_keys(payload.get("quantiles"), limits)
        raw = payload.get("series")
        if not isinstance(raw, list | tuple) or not raw:
            raise InvalidInput("series must be a non-empty list of series")
        series = [fill_gaps(values, i) for i, values in enumerate(raw)]
        for i, values in enumerate(series):
            if len(values) > limits.max_context:
                if not limits.truncate:
                    raise InvalidInput(
                        f"series[{i}] has {len(values)} values; this model reads at most "
                        f"{limits.max_context}: send the most recent {limits.max_context}.")
                series[i] = values[-limits.max_context:]
        return series, horizon, keys

    def _forecast(self, batch: Sequence[np.ndarray[Any, Any]], horizon: int
                  ) -> np.ndarray[Any, Any]:
        """``(len(batch), horizon, 1 + quantiles)`` float64: the mean, then each quantile."""
        limits = self._limits()
        model = self.model
        device, dtype = model.device, model.dtype
        context = padded_length(max(len(s) for s in batch), limits)
        values = [torch.tensor(s, dtype=dtype, device=device) for s in batch]
        with torch.inference_mode():
            # NOTE: truncate_negative=False: transformers clamps a whole batch by its
            # overall minimum; the authors clamp each series by its own, as below.
            output = model(past_values=values, forecast_context_len=context,
                           truncate_negative=False)
        full = output.full_predictions[:, :horizon, :].float()
        if self.fix_quantile_crossing:
            full = fix_crossing(full, int(model.config.decode_index))
        if model.config.infer_is_positive:
            positive = torch.tensor([bool((s >= 0).all()) for s in batch],
                                    device=full.device)
            full = torch.where(positive[:, None, None], full.clamp(min=0.0), full)
        result: np.ndarray[Any, Any] = full.cpu().numpy().astype(np.float64)
        return result

    def _limits(self) -> Limits:
        if self.limits is None or self.model is None:
            raise RuntimeError("no model loaded: call load() first")
        return self.limits
