"""What ``llmux pull`` has to do, decided without touching the disk or the network.

The shell (:mod:`llmux.pull`) gathers the facts: the hub's file list with sizes and
etags, what already lies in each download directory, the free bytes of each filesystem.
This module turns them into one :class:`Row` per file: present, to download, too big for
the disk, or missing, and renders the summary. Pure, so every decision is a unit test.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import attrs

from llmux.config import PhysicalModel, Source
from llmux.config_report import format_bytes

__all__ = [
    "Listing",
    "LocalFile",
    "RemoteFile",
    "Row",
    "Status",
    "download_dir",
    "exit_code",
    "is_complete",
    "plan",
    "render_rows",
    "select_files",
]


class Status(enum.Enum):
    """A file's fate; only PRESENT and DOWNLOADED count as success."""

    PRESENT = "present"
    DOWNLOAD = "to download"
    DOWNLOADED = "downloaded"
    NO_SPACE = "too big for the disk"
    MISSING = "missing"


@attrs.frozen
class RemoteFile:
    """A file of the repo as the hub lists it; ``etag`` is its LFS sha256 or git blob id."""

    path: str
    size: int
    etag: str | None = None


@attrs.frozen
class LocalFile:
    """A file already in the download directory; ``etag`` is what huggingface_hub recorded
    when it downloaded it (None: not recorded, e.g. copied there by hand)."""

    size: int
    etag: str | None = None


@attrs.frozen(kw_only=True)
class Listing:
    """Everything known about one model before deciding: the shell fills it in."""

    model: str
    repo: str
    local_dir: str
    filesystem: str  # download directories with the same key share one free-space budget
    commit: str | None = None
    files: tuple[RemoteFile, ...] = ()
    absent: tuple[str, ...] = ()  # names or patterns in `source.files` the repo lacks
    local: Mapping[str, LocalFile] = attrs.field(factory=dict)
    error: str | None = None  # the repo could not be listed (gated, not found, offline)


@attrs.frozen(kw_only=True)
class Row:
    """One line of the summary, and for DOWNLOAD rows the job to run."""

    model: str
    repo: str
    file: str
    status: Status
    size: int | None = None
    detail: str = ""
    local_dir: str = ""
    commit: str | None = None


def download_dir(model: PhysicalModel, source: Source) -> str:
    """Where a model's files land: ``source.local_dir``, else ``model_path`` itself (a
    directory), or the folder holding it when ``model_path`` ends with one of the files
    (a name or a pattern: ``*Q4_K_M.gguf``)."""
    if source.local_dir is not None:
        return source.local_dir
    if model.model_path is None:
        raise ValueError(f"{model.id}: a source needs model_path or source.local_dir")
    path = model.model_path.rstrip("/")
    parts = path.split("/")
    for pattern in (name.strip("/") for name in source.files):
        depth = pattern.count("/") + 1  # "sub/Q.gguf": the file is two levels down
        if len(parts) > depth and fnmatch.fnmatchcase("/".join(parts[-depth:]), pattern):
            return "/".join(parts[:-depth]) or "/"
    return path


def select_files(source: Source, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The repo files a source asks for, and the ``files`` entries that match none."""
    names = list(names)
    wanted = source.files or ["*"]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in source.exclude)]
    unmatched = [p for p in source.files if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    return chosen, unmatched


def is_complete(remote: RemoteFile, local: LocalFile | None) -> bool:
    """Present and whole: the hub's size, and its etag when one was recorded locally."""
    if local is None or local.size != remote.size:
        return False
    return local.etag is None or remote.etag is None or local.etag == remote.etag


def _why(remote: RemoteFile, local: LocalFile | None) -> str:
    if local is None:
        return "new"
    if local.size != remote.size:
        return f"local copy has {format_bytes(local.size)} of {format_bytes(remote.size)}"
    return "changed upstream"


def plan(listings: Sequence[Listing], free_bytes: Mapping[str, int], *,
         reserve_bytes: int = 0) -> list[Row]:
    """One row per file. A model whose missing files do not all fit in what is left of its
    filesystem (free minus ``reserve_bytes``, minus earlier models' downloads) gets none
    of them downloaded: half a model is no use, and smaller models after it may still fit.
    """
    left = {fs: free - reserve_bytes for fs, free in free_bytes.items()}
    rows: list[Row] = []
    for listing in listings:
        if listing.error is not None:
            rows.append(_row(listing, "*", Status.MISSING, listing.error))
            continue
        fetch = [f for f in listing.files if not is_complete(f, listing.local.get(f.path))]
        need = sum(f.size for f in fetch)
        budget = left.get(listing.filesystem, 0)
        fits = need <= budget
        if fits:
            left[listing.filesystem] = budget - need
        for remote in listing.files:
            local = listing.local.get(remote.path)
            if remote not in fetch:
                status, detail = Status.PRESENT, ""
            elif fits:
                status, detail = Status.DOWNLOAD, _why(remote, local)
            else:
                status = Status.NO_SPACE
                detail = (f"{listing.model} needs {format_bytes(need)}, "
                          f"{format_bytes(max(budget, 0))} free for it")
            rows.append(_row(listing, remote.path, status, detail, remote.size))
        for name in listing.absent:
            rows.append(_row(listing, name, Status.MISSING, f"no such file in {listing.repo}"))
    return rows


def _row(listing: Listing, file: str, status: Status, detail: str,
         size: int | None = None) -> Row:
    return Row(model=listing.model, repo=listing.repo, file=file, status=status, size=size,
               detail=detail, local_dir=listing.local_dir, commit=listing.commit)


def exit_code(rows: Iterable[Row]) -> int:
    """0 when every file is on disk, else 1."""
    return 0 if all(r.status in (Status.PRESENT, Status.DOWNLOADED) for r in rows) else 1


def render_rows(rows: Sequence[Row]) -> str:
    """The summary table and a totals line, as the operator reads them."""
    headers = ("MODEL", "FILE", "SIZE", "STATUS", "DETAIL")
    cells = [(r.model, r.file, "-" if r.size is None else format_bytes(r.size),
              r.status.value, r.detail) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(headers, *cells, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in (headers, *cells)]
    counts = {s: sum(r.status is s for r in rows) for s in Status}
    totals = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    return "\n".join([*lines, "", f"{len(rows)} files: {totals or 'nothing to do'}"])
