"""``POST /v1/forecast``: time-series forecasts (TimesFM), point and quantiles.

The body is checked here, before any model is loaded, so a malformed series is a 400
that names its index (``series[2][5]``) at once. What only the model knows (its
context, its longest horizon, the quantiles it predicts) the worker checks: also a 400.
``NaN`` (which Python's JSON parser accepts as a literal) means missing, like null;
``Infinity`` is refused.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Final

import falcon.asgi

from llmux.errors import BadRequest
from llmux.http.body import field
from llmux.http.jobs import run_whole
from llmux.http.target import json_request
from llmux.runtime import Runtime

MAX_SERIES: Final = 1024
MAX_POINTS: Final = 1_000_000  # about 18 MB as msgpack floats: well within a worker frame
MAX_HORIZON: Final = 16384  # a sanity bound; each model refuses beyond its own limit
MAX_QUANTILES: Final = 99
FORECAST: Final = frozenset({"forecast"})

Series = list[list[float | None]]


def _shown(value: Any) -> str:
    return json.dumps(value)[:80]


def _point(value: Any, where: str) -> float | None:
    """One entry of a series: a finite float, or None for null and NaN.

    Raises:
        BadRequest: anything else, with ``where`` as ``param``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{where}' must be a number or null, got {_shown(value)}.",
                         param=where)
    try:
        number = float(value)
    except OverflowError:
        raise BadRequest(f"'{where}' is too large for a float.", param=where) from None
    if math.isnan(number):
        return None
    if math.isinf(number):
        raise BadRequest(f"'{where}' must be a finite number or null.", param=where)
    return number


def parse_series(value: Any, *, max_series: int = MAX_SERIES,
                 max_points: int = MAX_POINTS) -> Series:
    """``series``: a list of flat lists of numbers or nulls, or one flat list (one
    series); each series has at least one number.

    Raises:
        BadRequest: with the index at fault as ``param`` (``series[1][4]``).
    """
    if not isinstance(value, list) or not value:
        raise BadRequest("'series' must be a non-empty list of numbers, or a list of such "
                         "lists (one per series).", param="series")
    nested = any(isinstance(item, list) for item in value)
    rows: list[Any] = value if nested else [value]
    if len(rows) > max_series:
        raise BadRequest(f"'series' holds at most {max_series} series, got {len(rows)}.",
                         param="series")
    total = sum(len(row) for row in rows if isinstance(row, list))
    if total > max_points:
        raise BadRequest(f"'series' holds at most {max_points} values in all, got {total}.",
                         param="series")
    series: Series = []
    for i, row in enumerate(rows):
        name = f"series[{i}]" if nested else "series"
        if not isinstance(row, list):
            raise BadRequest(f"'{name}' must be a list of numbers like the other series, "
                             f"got {_shown(row)}.", param=name)
        if not row:
            raise BadRequest(f"'{name}' is empty: send at least one value.", param=name)
        points = [_point(v, f"{name}[{j}]") for j, v in enumerate(row)]
        if all(p is None for p in points):
            raise BadRequest(f"'{name}' has no values: every entry is null.", param=name)
        series.append(points)
    return series


def parse_quantiles(body: dict[str, Any]) -> list[float] | None:
    """``quantiles``: numbers strictly between 0 and 1; None when absent (the model's
    own quantiles are returned then)."""
    value = field(body, "quantiles", list)
    if value is None:
        return None
    if len(value) > MAX_QUANTILES:
        raise BadRequest(f"'quantiles' holds at most {MAX_QUANTILES} numbers.",
                         param="quantiles")
    for i, q in enumerate(value):
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q < 1:
            raise BadRequest(f"'quantiles[{i}]' must be a number between 0 and 1 "
                             f"(exclusive), got {_shown(q)}.", param=f"quantiles[{i}]")
    return [float(q) for q in value]


def parse_horizon(body: dict[str, Any]) -> int:
    horizon = field(body, "horizon", int, required=True)
    assert horizon is not None
    if not 1 <= horizon <= MAX_HORIZON:
        raise BadRequest(f"'horizon' must be between 1 and {MAX_HORIZON}, got {horizon}.",
                         param="horizon")
    return horizon


def render(name: str, series: Series, horizon: int, final: dict[str, Any],
           created: int) -> dict[str, Any]:
    """The response body from the worker's done data (one row per series)."""
    points: list[list[float]] = final.get("point", [])
    quantiles: dict[str, list[list[float]]] = final.get("quantiles", {})
    return {
        "object": "forecast", "model": name, "created": created, "horizon": horizon,
        "forecasts": [{"index": i, "point": point,
                       "quantiles": {key: rows[i] for key, rows in quantiles.items()}}
                      for i, point in enumerate(points)],
        "usage": {"series": len(series), "points_in": sum(len(s) for s in series),
                  "points_out": len(points) * horizon},
    }


class Forecast:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body, name, _, physical = await json_request(req, self.runtime, FORECAST,
                                                     "cannot forecast time series")
        series = parse_series(body.get("series"))
        horizon = parse_horizon(body)
        quantiles = parse_quantiles(body)
        ticket = self.runtime.submit(physical.id, "forecast", {
            "series": series, "horizon": horizon, "quantiles": quantiles})
        _, final = await run_whole(req, ticket)
        resp.media = render(name, series, horizon, final, int(time.time()))
