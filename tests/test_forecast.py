"""``POST /v1/forecast``: a tiny randomly initialised TimesFM 2.5 (built here from a
config, nothing downloaded) through a live server; the server's body checks and the
backend's gap filling as units."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import TimesFm2_5Config, TimesFm2_5ModelForPrediction

from llmux.backends.base import InvalidInput
from llmux.backends.hf_forecast import fill_gaps, fix_crossing
from llmux.backends.transformers_backend import TransformersBackend
from llmux.errors import BadRequest
from llmux.http.forecast import (
    MAX_HORIZON,
    MAX_QUANTILES,
    parse_horizon,
    parse_quantiles,
    parse_series,
)
from tests.conftest import Server, fake_model, live_workers, wait_until
from tests.helpers import drain

CONTEXT = 512  # the tiny model's context
HORIZON = 16  # the tiny model's longest forecast
ALL_QUANTILES = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]


@pytest.fixture(scope="module", autouse=True)
def _hub_offline(hub_offline: None) -> None:
    """Every test here runs with the hub offline (conftest.hub_offline)."""


@pytest.fixture(scope="module")
def tiny_timesfm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer TimesFM 2.5 with the real quantiles and patch
    size, a 512-point context and a 16-step horizon."""
    path = tmp_path_factory.mktemp("tiny-timesfm")
    config = TimesFm2_5Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=32, head_dim=8,
        num_attention_heads=4, num_key_value_heads=4, context_length=CONTEXT,
        horizon_length=HORIZON, output_quantile_len=32, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    TimesFm2_5ModelForPrediction(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_timesfm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = {
        "devices": {"cpu": {"capacity": "4GB"}},
        "physical_models": {
            "timesfm": {"type": "forecast", "backend": "transformers",
                        "model_path": str(tiny_timesfm), "estimated_vram": "1GB",
                        "options": {"batch_size": 2}},
            "embedder": fake_model(embedding_dim=16) | {"type": "embedding"},
        },
        "virtual_models": {"forecaster": {"physical": "timesfm"},
                           "embed": {"physical": "embedder"}},
    }
    server = Server(config, tmp_path_factory.mktemp("forecast"))
    yield server
    server.stop()
    wait_until(lambda: not live_workers(), 10, "workers to exit")


def forecast(server: Server, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/forecast", json={"model": "forecaster", **body},
                      timeout=120)


def raw_forecast(server: Server, text: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/forecast", content=text.encode(), timeout=120,
                      headers={"Content-Type": "application/json"})


def error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


# -- end to end ------------------------------------------------------------------------


def test_each_series_gets_horizon_points_and_the_requested_quantiles(server: Server) -> None:
    series = [[1.0, 2.0, 3.0, 2.0, 1.0] * 20, [5.0, None, 7.0], list(range(300))]
    response = forecast(server, series=series, horizon=5, quantiles=[0.1, 0.5, 0.9])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert (body["object"], body["model"], body["horizon"]) == ("forecast", "forecaster", 5)
    assert isinstance(body["created"], int)
    assert [f["index"] for f in body["forecasts"]] == [0, 1, 2]
    for item in body["forecasts"]:
        assert len(item["point"]) == 5
        assert list(item["quantiles"]) == ["0.1", "0.5", "0.9"]
        assert all(len(values) == 5 for values in item["quantiles"].values())
        assert item["point"] == item["quantiles"]["0.5"]  # the median head is the point
        low, mid, high = (item["quantiles"][k] for k in ("0.1", "0.5", "0.9"))
        assert all(a <= b <= c for a, b, c in zip(low, mid, high, strict=True))
    assert body["usage"] == {"series": 3, "points_in": 403, "points_out": 15}


def test_a_flat_list_is_one_series_and_gets_every_quantile_by_default(server: Server) -> None:
    response = forecast(server, series=[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0],
                        horizon=HORIZON)
    assert response.status_code == 200, response.text
    [item] = response.json()["forecasts"]
    assert len(item["point"]) == HORIZON
    assert list(item["quantiles"]) == ALL_QUANTILES


def test_a_series_is_forecast_alike_alone_and_among_others(server: Server) -> None:
    """batch_size 2: the five series run in three batches, sorted by length."""
    target = [math.sin(i / 3) * 10 + 20 for i in range(70)]
    others = [[float(i % 7) for i in range(n)] for n in (5, 200, 33, 1)]
    alone = forecast(server, series=[target], horizon=8).json()["forecasts"][0]
    mixed = forecast(server, series=[others[0], others[1], target, others[2], others[3]],
                     horizon=8).json()["forecasts"]
    assert [f["index"] for f in mixed] == [0, 1, 2, 3, 4]
    assert mixed[2]["point"] == pytest.approx(alone["point"], rel=1e-4, abs=1e-4)


def test_a_non_negative_series_gets_no_negative_forecast(server: Server) -> None:
    response = forecast(server, series=[[0.0, 0.0, 5.0, 0.0, 0.0, 4.0, 0.0]], horizon=HORIZON)
    item = response.json()["forecasts"][0]
    assert min(item["point"]) >= 0
    assert all(min(values) >= 0 for values in item["quantiles"].values())


def test_nan_literals_count_as_missing_values(server: Server) -> None:
    response = raw_forecast(
        server, '{"model": "forecaster", "series": [[NaN, 1, NaN, 3, null]], "horizon": 2}')
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["points_in"] == 5


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"series": [[1, [2]]]}, "series[0][1]", "'series[0][1]' must be a number or null"),
    ({"series": [1, [2]]}, "series[0]", "'series[0]' must be a list of numbers"),
    ({"series": [[1], ["2"]]}, "series[1][0]", "'series[1][0]' must be a number or null"),
    ({"series": [[1], [True]]}, "series[1][0]", "must be a number or null, got true"),
    ({"series": []}, "series", "'series' must be a non-empty list"),
    ({"series": "1,2,3"}, "series", "'series' must be a non-empty list"),
    ({"series": [[1, 2], []]}, "series[1]", "'series[1]' is empty"),
    ({"series": [[1], [None, None]]}, "series[1]", "'series[1]' has no values"),
    ({"series": [None]}, "series", "'series' has no values"),
    ({"series": [[1]] * 1025}, "series", "at most 1024 series, got 1025"),
    ({"horizon": None}, "horizon", "'horizon' is required."),
    ({"horizon": 0}, "horizon", "'horizon' must be between 1 and 16384, got 0."),
    ({"horizon": "5"}, "horizon", "'horizon' must be an integer"),
    ({"quantiles": [0.5, 1.0]}, "quantiles[1]", "between 0 and 1 (exclusive), got 1.0"),
    ({"quantiles": [0]}, "quantiles[0]", "between 0 and 1 (exclusive), got 0"),
    ({"quantiles": 0.5}, "quantiles", "'quantiles' must be an array"),
])
def test_a_malformed_body_is_a_400_naming_the_field(server: Server, body: dict[str, Any],
                                                    param: str, message: str) -> None:
    response = forecast(server, **{"series": [[1.0, 2.0]], "horizon": 3, **body})
    assert response.status_code == 400, response.text
    assert error(response)["param"] == param
    assert message in error(response)["message"]


@pytest.mark.parametrize(("text", "param"), [
    ('{"model": "forecaster", "series": [[1, Infinity]], "horizon": 1}', "series[0][1]"),
    ('{"model": "forecaster", "series": [NaN, NaN], "horizon": 1}', "series"),
])
def test_infinity_and_all_nan_series_are_refused(server: Server, text: str,
                                                 param: str) -> None:
    response = raw_forecast(server, text)
    assert response.status_code == 400, response.text
    assert error(response)["param"] == param


@pytest.mark.parametrize(("body", "message"), [
    ({"series": [[1.0] * (CONTEXT + 1)]},
     f"series[0] has {CONTEXT + 1} values; this model reads at most {CONTEXT}"),
    ({"horizon": HORIZON + 1},
     f"horizon must be an integer from 1 to {HORIZON} (this model's longest forecast)"),
    ({"quantiles": [0.1, 0.25]},
     "This model predicts the quantiles 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 only; "
     "0.25 is not one of them."),
])
def test_what_the_model_cannot_do_is_a_400_from_the_worker(server: Server,
                                                           body: dict[str, Any],
                                                           message: str) -> None:
    response = forecast(server, **{"series": [[1.0, 2.0]], "horizon": 3, **body})
    assert response.status_code == 400, response.text
    assert message in error(response)["message"]


def test_leading_nulls_do_not_count_against_the_context(server: Server) -> None:
    series = [None] * 10 + [1.0] * CONTEXT
    assert forecast(server, series=[series], horizon=1).status_code == 200


def test_a_model_of_another_type_is_a_400(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/forecast", timeout=30,
                          json={"model": "embed", "series": [1.0], "horizon": 1})
    assert response.status_code == 400
    assert error(response) == {
        "message": "'embed' is an embedding model and cannot forecast time series.",
        "type": "invalid_request_error", "param": "model", "code": None}


def test_an_unknown_model_is_a_404(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/forecast", timeout=30,
                          json={"model": "nope", "series": [1.0], "horizon": 1})
    assert response.status_code == 404
    assert error(response)["code"] == "model_not_found"


# -- the server's checks -----------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
point = st.one_of(st.none(), finite, st.integers(-(2**53), 2**53))
one_series = st.lists(point, min_size=1, max_size=20).filter(
    lambda s: any(v is not None for v in s))


@given(st.lists(one_series, min_size=1, max_size=8))
def test_lists_of_number_lists_pass_unchanged_as_floats(series: list[list[Any]]) -> None:
    parsed = parse_series(series)
    assert parsed == [[None if v is None else float(v) for v in s] for s in series]
    assert all(v is None or type(v) is float for s in parsed for v in s)


@given(one_series)
def test_a_flat_list_is_one_series(series: list[Any]) -> None:
    assert parse_series(series) == [[None if v is None else float(v) for v in series]]


@given(st.lists(one_series, min_size=1, max_size=5), st.data())
def test_nesting_below_a_series_names_the_index(series: list[list[Any]],
                                                data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(series) - 1))
    j = data.draw(st.integers(0, len(series[i])))
    series[i].insert(j, data.draw(st.one_of(st.lists(finite, max_size=2), st.text(),
                                            st.booleans(), st.dictionaries(st.text(), finite))))
    with pytest.raises(BadRequest) as caught:
        parse_series(series)
    assert caught.value.param == f"series[{i}][{j}]"


@given(st.lists(point, min_size=1, max_size=20))
def test_nan_is_null(series: list[Any]) -> None:
    with_nan = [math.nan if v is None else v for v in series] + [1.0]
    assert parse_series(with_nan) == parse_series([*series, 1.0])


def test_the_count_and_total_limits_are_checked_before_the_values() -> None:
    with pytest.raises(BadRequest, match="at most 2 series, got 3"):
        parse_series([[1], [2], [3]], max_series=2)
    with pytest.raises(BadRequest, match="at most 4 values in all, got 5"):
        parse_series([[1, 2], [3, 4, "x"]], max_points=4)
    assert parse_series([[1, 2], [3, 4]], max_series=2, max_points=4) == [[1, 2], [3, 4]]


def test_an_integer_too_large_for_a_float_is_refused_naming_it() -> None:
    """JSON integers have no bound; one beyond a float's range is a 400, not a 500."""
    with pytest.raises(BadRequest, match=r"'series\[1\]' is too large for a float") as caught:
        parse_series([1, 10**400])
    assert caught.value.param == "series[1]"


def test_the_horizon_and_quantile_limits_are_the_most_allowed() -> None:
    """``MAX_HORIZON`` and ``MAX_QUANTILES`` themselves pass; one more is refused."""
    assert parse_horizon({"horizon": MAX_HORIZON}) == MAX_HORIZON
    with pytest.raises(BadRequest, match=f"between 1 and {MAX_HORIZON}, got {MAX_HORIZON + 1}"):
        parse_horizon({"horizon": MAX_HORIZON + 1})
    quantiles = [i / (MAX_QUANTILES + 1) for i in range(1, MAX_QUANTILES + 1)]
    assert parse_quantiles({"quantiles": quantiles}) == quantiles
    with pytest.raises(BadRequest, match=f"at most {MAX_QUANTILES} numbers"):
        parse_quantiles({"quantiles": [*quantiles, 0.5]})


def test_the_json_parser_reads_nan_and_infinity_literals() -> None:
    """Why the server maps NaN to null and refuses Infinity: the body parser takes both."""
    assert math.isnan(json.loads("NaN")) and json.loads("-Infinity") == -math.inf
    with pytest.raises(BadRequest, match="'series\\[1\\]' must be a finite number"):
        parse_series([1.0, math.inf])


# -- the backend's gap filling -------------------------------------------------------------


def test_gaps_are_filled_as_timesfm_does() -> None:
    """Leading gaps dropped, inner ones interpolated, trailing ones hold the last value."""
    filled = fill_gaps([None, math.nan, 1.0, None, None, 4.0, None], 0)
    assert filled.tolist() == [1.0, 2.0, 3.0, 4.0, 4.0]


@pytest.mark.parametrize(("values", "message"), [
    ([], "series[3] is empty"),
    ([None, math.nan], "series[3] has no values"),
    ([1.0, math.inf], "series[3] holds an infinite value"),
    ([1.0, "2"], "series[3] must hold numbers or nulls only"),
])
def test_unusable_series_are_invalid_input(values: list[Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        fill_gaps(values, 3)


def test_crossing_quantiles_are_made_monotonic_around_the_median() -> None:
    # mean, then quantiles 0.1 .. 0.9 with the median (0.5) at index 5
    full = torch.tensor([[[9.0, 5.0, 1.0, 3.0, 2.0, 4.0, 3.0, 8.0, 6.0, 7.0]]])
    fixed = fix_crossing(full, 5)[0, 0].tolist()
    assert fixed == [9.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0, 8.0]


# -- the backend in-process: options and cancellation --------------------------------------


class CancelledAfter(threading.Event):
    """An event that reads as set from its ``calls``-th check on."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        return self.calls < 0


def loaded(path: Path, **options: Any) -> TransformersBackend:
    backend = TransformersBackend({"model_id": "timesfm", "type": "forecast",
                                   "backend": "transformers", "model_path": str(path),
                                   "options": options, "device": "cpu"})
    assert backend.load(lambda fraction, message: None) == {
        "context_length": CONTEXT, "max_horizon": HORIZON,
        "quantiles": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
    backend.warmup()
    return backend


def test_truncate_keeps_the_most_recent_points(tiny_timesfm: Path) -> None:
    backend = loaded(tiny_timesfm, truncate=True)
    recent = [float(i % 9) for i in range(CONTEXT)]
    payload = {"series": [[1000.0] * 50 + recent, recent], "horizon": 4, "quantiles": []}
    final = drain(backend.infer("forecast", payload, threading.Event()))[1]
    assert final["point"][0] == pytest.approx(final["point"][1], rel=1e-5)
    assert final["quantiles"] == {}


def test_a_cancelled_request_stops_between_batches(tiny_timesfm: Path) -> None:
    backend = loaded(tiny_timesfm, batch_size=1)
    payload = {"series": [[1.0, 2.0]] * 3, "horizon": 2, "quantiles": [0.5]}
    assert drain(backend.infer("forecast", payload, CancelledAfter(2)))[1] == {
        "point": [], "quantiles": {"0.5": []}, "finish_reason": "cancelled"}


def test_values_too_large_for_float32_are_invalid_input(tiny_timesfm: Path) -> None:
    backend = loaded(tiny_timesfm)
    payload = {"series": [[1.0, 2.0], [1e300, 2e300, 1e300]], "horizon": 2}
    with pytest.raises(InvalidInput, match=re.escape("The forecast of series[1] is not fini")):
        drain(backend.infer("forecast", payload, threading.Event()))
