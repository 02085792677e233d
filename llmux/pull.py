"""``llmux pull``: download the model files a config names from the Hugging Face Hub.

The shell around :mod:`llmux.pull_plan`: it asks the hub which files each source names
(sizes and etags), looks at the download directories and the free space of their
disks, lets the planner decide, then fetches with ``huggingface_hub.hf_hub_download``
into the directory (its ``local_dir`` mode records each file's etag, which is how a
second run knows a file is complete without downloading it again). A connection that
drops mid-file is resumed by huggingface_hub with an HTTP range request (five tries
per stall). Gated repos use the token from ``HF_TOKEN`` or the Hugging Face cache.

NOTE: huggingface_hub 2.4 downloads into a per-process temporary file and deletes it
when the process stops, so a run that is killed restarts the file it was fetching; the
files it had finished are kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import attrs
import httpx2
from huggingface_hub import HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import tqdm as _hf_tqdm

from llmux.config import Config, PhysicalModel, Source
from llmux.pull_plan import (
    Listing,
    LocalFile,
    RemoteFile,
    Row,
    Status,
    download_dir,
    exit_code,
    plan,
    render_rows,
    select_files,
)

__all__ = ["PullError", "access_problem", "pull"]

_METADATA_DIR = Path(".cache") / "huggingface" / "download"
# huggingface_hub's bar (it honours HF_HUB_DISABLE_PROGRESS_BARS); untyped: tqdm has no stubs.
_Bar: Any = _hf_tqdm


class PullError(Exception):
    """The command line names something the config cannot pull."""


def pull(config: Config, names: Sequence[str], *, reserve_bytes: int = 0,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Fetch what is missing for ``names`` (physical or virtual models; none: every model
    with a source) and print the summary; 0 when every file is on disk afterwards.

    Raises:
        PullError: a name is unknown or its model has no ``source``.
    """
    models = _chosen(config, names)
    if not models:
        print("llmux pull: no physical model in the config has a source: nothing to do",
              file=err)
        return 0
    # NOTE: httpx2 logs every request at INFO, between the progress bars; warnings (a
    # resumed download) still show.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    api = HfApi()
    listings = [_listing(api, model, source) for model, source in models]
    free = dict(_filesystem(listing.local_dir) for listing in listings)
    rows = plan(listings, free, reserve_bytes=reserve_bytes)
    for row in rows:
        if row.status is Status.MISSING and row.file == "*":
            print(f"llmux pull: {row.model}: {row.detail}", file=err)
    no_space = sorted({r.detail for r in rows if r.status is Status.NO_SPACE})
    for detail in no_space:
        print(f"llmux pull: not enough disk space, not downloading: {detail}", file=err)
    rows = _download(rows, err)
    print(render_rows(rows), file=out)
    return exit_code(rows)


def _chosen(config: Config, names: Sequence[str]) -> list[tuple[PhysicalModel, Source]]:
    """The models to pull, in config order; a virtual model name means its physical one."""
    if not names:
        return [(m, m.source) for m in config.physical_models.values() if m.source is not None]
    picked: list[str] = []
    for name in names:
        virtual = config.virtual_models.get(name)
        model_id = virtual.physical if virtual is not None else name
        model = config.physical_models.get(model_id)
        if model is None:
            raise PullError(f"unknown model {name!r} (physical models: "
                            f"{', '.join(config.physical_models) or 'none'})")
        if model.source is None:
            raise PullError(f"{model_id} has no source: in the config: nothing to download")
        if model_id not in picked:
            picked.append(model_id)
    return [(m, m.source) for i, m in config.physical_models.items()
            if i in picked and m.source is not None]


def _listing(api: HfApi, model: PhysicalModel, source: Source) -> Listing:
    """Ask the hub what the source names and look at what is already on disk."""
    local_dir = download_dir(model, source)
    listing = Listing(model=model.id, repo=source.repo, local_dir=local_dir,
                      filesystem=_filesystem(local_dir)[0])
    try:
        info = api.model_info(source.repo, revision=source.revision, files_metadata=True)
    except HfHubHTTPError as exc:
        return attrs.evolve(listing, error=access_problem(exc, source.repo, source.revision))
    except (httpx2.HTTPError, OSError) as exc:  # offline, DNS, refused, timed out
        why = f"cannot reach {constants.ENDPOINT}: {_first_line(exc)}"
        return attrs.evolve(listing, error=why)
    remote = {
        s.rfilename: RemoteFile(
            path=s.rfilename,
            size=(s.lfs.size if s.lfs is not None else s.size) or 0,
            etag=s.lfs.sha256 if s.lfs is not None else s.blob_id,
        )
        for s in info.siblings or []
    }
    chosen, absent = select_files(source, remote)
    return attrs.evolve(listing, commit=info.sha, files=tuple(remote[n] for n in chosen),
                        absent=tuple(absent),
                        local={name: found for name in chosen
                               if (found := _local_file(local_dir, name)) is not None})


def _local_file(local_dir: str, name: str) -> LocalFile | None:
    """The file as it lies on disk, with the etag huggingface_hub recorded for it.

    NOTE: the record (``.cache/huggingface/download/<name>.metadata``: commit, etag,
    time) counts only if the file was not modified after it, as huggingface_hub's own
    reader decides; its reader is not used because it creates directories.
    """
    path = Path(local_dir, name)
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    etag = None
    try:
        lines = Path(local_dir, _METADATA_DIR, f"{name}.metadata").read_text().splitlines()
        if len(lines) >= 3 and stat.st_mtime - 1 <= float(lines[2]):
            etag = lines[1].strip() or None
    except (OSError, ValueError):
        pass
    return LocalFile(size=stat.st_size, etag=etag)


def _filesystem(local_dir: str) -> tuple[str, int]:
    """(a key shared by directories on one filesystem, its free bytes), read at the
    nearest existing ancestor because the directory may not exist yet."""
    path = Path(local_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(os.stat(path).st_dev), shutil.disk_usage(path).free


def access_problem(exc: HfHubHTTPError, repo: str, revision: str = "main") -> str:
    """What an operator should do about a hub error, naming the repo; never the token."""
    page = f"{constants.ENDPOINT}/{repo}"
    status = exc.response.status_code if exc.response is not None else None
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"no such file in {repo}"
    token = get_token() is not None
    if isinstance(exc, GatedRepoError) or status == 403:
        if not token:
            return (f"{repo} is gated and no Hugging Face token is set: accept its license "
                    f"at {page}, then set HF_TOKEN (or run `hf auth login`)")
        return (f"{repo} is gated and your token has no access: accept its license at "
                f"{page} with the account of the token in HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError) or status == 401:
        # NOTE: the hub answers 401 alike for private and for misspelled repos
        hint = "your token cannot read it" if token else "set HF_TOKEN if it is yours"
        return f"{repo}: no such repository on {constants.ENDPOINT}, or a private one ({hint})"
    return f"{repo}: the hub answered {status}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _download(rows: list[Row], err: TextIO) -> list[Row]:
    """Run the DOWNLOAD rows one file at a time, with a bar per file and one overall."""
    if not any(r.status is Status.DOWNLOAD for r in rows):
        return rows
    total = sum(r.size or 0 for r in rows if r.status is Status.DOWNLOAD)
    refused: dict[str, str] = {}  # repo -> why: no point asking again for its next file
    done: list[Row] = []
    with _Bar(total=total, unit="B", unit_scale=True, desc="total", position=0,
              disable=None, file=err) as overall:
        for row in rows:
            if row.status is not Status.DOWNLOAD:
                done.append(row)
                continue
            if row.repo in refused:
                done.append(attrs.evolve(row, status=Status.MISSING, detail=refused[row.repo]))
                continue
            try:
                hf_hub_download(row.repo, row.file, revision=row.commit,
                                local_dir=row.local_dir,
                                tqdm_class=cast(Any, _file_bar(overall, row.file, err)))
            except HfHubHTTPError as exc:
                why = access_problem(exc, row.repo)
                status = exc.response.status_code if exc.response is not None else None
                if status in (401, 403) or isinstance(exc, RepositoryNotFoundError):
                    refused[row.repo] = why
                print(f"llmux pull: {row.model}: {why}", file=err)
                done.append(attrs.evolve(row, status=Status.MISSING, detail=why))
            except (httpx2.HTTPError, OSError, ValueError) as exc:
                # network gone for good, disk full, size check failed after the download
                why = _first_line(exc)
                print(f"llmux pull: {row.model}: {row.file}: {why}", file=err)
                done.append(attrs.evolve(row, status=Status.MISSING, detail=why))
            else:
                done.append(attrs.evolve(row, status=Status.DOWNLOADED, detail=""))
    return done


def _file_bar(overall: Any, label: str, err: TextIO) -> type:
    """A class for huggingface_hub's ``tqdm_class``: one bar per file, labelled with the
    file's name (huggingface_hub would show its URL), that also advances the overall bar.

    NOTE: it has the interface of snapshot_download's aggregating bar (``update`` for
    bytes written, ``update_transfer`` for bytes received): a Xet download then draws
    one bar instead of two, and written bytes are counted once.
    """

    class FileBar:
        def __init__(self, *_: Any, total: int | None = None, initial: int = 0,
                     **__: Any) -> None:
            self._bar = _Bar(total=total, initial=initial, desc=label, unit="B",
                             unit_scale=True, position=1, leave=False, disable=None, file=err)
            overall.update(initial)

        def update(self, n: int | float | None = 1) -> None:
            self._bar.update(n)
            overall.update(n)

        def update_transfer(self, n: int | float | None = 1) -> None:
            pass  # network bytes: the written bytes above are what the bars show

        def set_postfix_str(self, postfix: str, refresh: bool = False) -> None:
            self._bar.set_postfix_str(postfix, refresh=refresh)

        def set_transfer_postfix_str(self, postfix: str, refresh: bool = False) -> None:
            pass

        def close(self) -> None:
            self._bar.close()

        def __enter__(self) -> FileBar:
            return self

        def __exit__(self, *_: object) -> None:
            self.close()

    return FileBar
