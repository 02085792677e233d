"""Measured footprints, remembered across restarts in the state directory.

A measured footprint replaces the config's estimate in the ledger; the next start
plans with it from the first load. The arbiter keeps here the most a model's worker
was measured at in its last residency that served requests, so a reload reserves what
the model grew to in use, not only what its load measures.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class FootprintStore:
    """``{"<model>@<device>": bytes}`` in ``footprints.json``; None path = memory only."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._data: dict[str, int] = {}
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text())
                self._data = {str(k): int(v) for k, v in loaded.items()}
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("ignoring unreadable footprint file %s: %s", path, exc)

    def get(self, model: str, device: str) -> int | None:
        return self._data.get(f"{model}@{device}")

    def put(self, model: str, device: str, nbytes: int) -> None:
        self._data[f"{model}@{device}"] = nbytes
        if self._path is None:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._data, indent=1, sort_keys=True))
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("could not persist footprints to %s: %s", self._path, exc)
