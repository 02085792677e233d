"""The pure helpers the benchmarks' figures rest on (bench/common.py); the benchmarks
themselves run only under ``make bench``."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _common() -> ModuleType:
    path = Path(__file__).parent.parent / "bench" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    os.environ.pop(module.MARK, None)  # the benchmarks' process mark: not for tests
    return module


common = _common()


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert common.percentile(values, 0) == 1.0
    assert common.percentile(values, 50) == 2.5
    assert common.percentile(values, 100) == 4.0
    assert common.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_sse_events_skip_comments_and_stop_at_done() -> None:
    lines = [": loading 40%", "", 'data: {"a": 1}', "event: x", 'data:{"b": 2}',
             "data: [DONE]", 'data: {"c": 3}']
    assert list(common.sse_events(iter(lines))) == [{"a": 1}, {"b": 2}]


def test_decode_rate_leaves_the_first_token_out() -> None:
    streamed = common.Streamed(first_token_s=0.5, last_token_s=1.5, completion_tokens=101,
                               prompt_tokens=10, text="")
    assert streamed.decode_rate() == pytest.approx(100.0)
    single = common.Streamed(first_token_s=0.5, last_token_s=0.5, completion_tokens=1,
                             prompt_tokens=10, text="")
    assert single.decode_rate() == 0.0
