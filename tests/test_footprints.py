"""FootprintStore: measured footprints survive a restart through footprints.json, and
a file that cannot be read is ignored (planning falls back to the estimates)."""

from __future__ import annotations

import json
from pathlib import Path

from llmux.actors.footprints import FootprintStore


def test_a_footprint_is_remembered_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "footprints.json"  # its directory does not exist yet
    FootprintStore(path).put("qwen", "cuda:0", 9_000_000_000)
    again = FootprintStore(path)
    assert again.get("qwen", "cuda:0") == 9_000_000_000
    assert again.get("qwen", "cpu") is None


def test_footprints_read_back_are_whole_bytes(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    path.write_text(json.dumps({"qwen@cuda:0": 9e9}))
    footprint = FootprintStore(path).get("qwen", "cuda:0")
    assert footprint == 9_000_000_000 and isinstance(footprint, int)


def test_an_unreadable_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    for text in ("{not json", "[1, 2]", '{"qwen@cuda:0": "lots"}'):
        path.write_text(text)
        assert FootprintStore(path).get("qwen", "cuda:0") is None
