"""Copy parquet sources into a local folder: streamed, resumable, retried, verified.

Each source is streamed to `<name>.partial`. If a `.partial` from an earlier attempt or
run exists (and a sidecar `<name>.partial.json` shows it came from the same version of
the same source), the copy continues from its size: an HTTP `Range` request for
http(s):// (via requests), `seek` on the fsspec file otherwise. Connection drops, 5xx and
429 are retried with exponential backoff; 404/403 and friends fail at once with a
one-line error. A finished copy is checked (size, sha256 when the source publishes one, and by
default `PAR1` at both ends and a readable parquet footer; other kinds of file bring
their own check) before it is renamed to `<name>`, so a file under its final name is
always complete.

With `max_rows`, only the first row groups that hold max_rows rows (over all sources,
in order) are read, by range through fsspec, and written as a new, smaller parquet file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from urllib.parse import urlsplit
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import requests  # one streamed, resumable GET for http(s); fsspec would cut it into range reads

from configs.errors import TransientError, UserError
from configs.secrets import redact
from storage.artifacts import sha256_file
from storage.fs import (
    ATTEMPTS,
    BACKOFF_S,
    HTTP_TIMEOUT_S,
    MAX_RETRY_AFTER_S,
    SourceUnreachable,
    auth_headers,
    filesystem,
    protocol_of,
    retrying,
    source_failure,
    source_fingerprint,
)

CHUNK_BYTES = 8 << 20  # one ranged read per chunk from object stores; a dropped connection loses at most this
PARQUET_MAGIC = b"PAR1"

ProgressCallback = Callable[[int, int], None]
Check = Callable[[str, Path], dict[str, Any]]


class DownloadError(UserError):
    """A source that cannot be copied as given (missing, refused, not parquet); one line naming the URL and the fix."""


class DownloadFailed(TransientError):
    """A download that failed for a reason that may pass (the network, the server, a source that
    changed while it was read), after this module's own retries; running again resumes it."""


class _Transient(SourceUnreachable):
    """A failure worth retrying now (dropped connection, 5xx, 429, a partial file to throw away)."""


def local_names(urls: list[str]) -> list[str]:
    """File names for the sources: their basenames, or as many trailing path parts as make
    them unique (FineWeb repeats 000_00000.parquet in every dump folder). Only the URLs'
    paths are used: a host (or the password before it) never becomes part of a name."""
    parts = [(urlsplit(url).path if "://" in url else url).rstrip("/").split("/") for url in urls]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["_".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise DownloadError("the same source is listed twice in data.source; list each file once")


def download_sources(
    urls: list[str],
    dest_dir: Path,
    max_rows: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    fingerprints: list[dict[str, Any]] | None = None,
    check: Check | None = None,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
    chunk_bytes: int = CHUNK_BYTES,
) -> list[dict[str, Any]]:
    """Copy each source to dest_dir and return one manifest entry per file written.

    progress(done, total) counts bytes for whole-file copies and rows when max_rows is
    set. With max_rows, sources after the one that reaches max_rows are not read.
    Pass a dest_dir that survives a failed run to resume its `.partial` files next time,
    and the sources' fingerprints when they were just taken (the version was made from
    them: the copy is checked against exactly those). `check(url, path)` decides whether a
    finished copy is what it should be (default: a readable parquet file) and returns the
    fields it adds to the entry; it raises a UserError otherwise.
    """
    check = check or check_parquet
    if not urls:
        raise DownloadError("no sources to download; check data.source")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if fingerprints is None:
        fingerprints = [source_fingerprint(url) for url in urls]  # fails fast on a missing source
    names = local_names(urls)
    entries = []
    if max_rows is None:
        total = sum(f["size"] or 0 for f in fingerprints)
        done = 0

        def on_bytes(count: int) -> None:
            nonlocal done
            done += count
            if progress:
                progress(done, total)

        for name, fingerprint in zip(names, fingerprints):
            entries.append(_download_whole(fingerprint, dest_dir / name, on_bytes, check, attempts, backoff_s, chunk_bytes))
    else:
        remaining = max_rows
        for name, fingerprint in zip(names, fingerprints):
            if remaining <= 0:
                break
            entry = _retrying(
                fingerprint["url"], attempts, backoff_s,
                lambda: _copy_first_row_groups(fingerprint, dest_dir / name, remaining),
            )
            remaining -= entry["rows"]
            entries.append(entry)
            if progress:
                progress(max_rows - max(remaining, 0), max_rows)
    return entries


# ---------------------------------------------------------------------------------------
# Whole files
# ---------------------------------------------------------------------------------------


def _download_whole(
    fingerprint: dict[str, Any], target: Path, on_bytes: Callable[[int], None], check: Check, attempts: int,
    backoff_s: float, chunk_bytes: int,
) -> dict[str, Any]:
    url = fingerprint["url"]
    partial = target.with_name(target.name + ".partial")
    sidecar = target.with_name(target.name + ".partial.json")
    origin = redact({key: fingerprint.get(key) for key in ("url", "size", "etag", "mtime_ns")})  # written to disk
    if partial.exists() and _read_json(sidecar) != origin:  # left by another source or version: useless
        partial.unlink()
    sidecar.write_text(json.dumps(origin))
    if partial.exists():
        on_bytes(partial.stat().st_size)

    fetch = _fetch_http if protocol_of(url) in ("http", "https") else _fetch_fsspec
    _retrying(url, attempts, backoff_s, lambda: fetch(fingerprint, partial, chunk_bytes, on_bytes))

    try:
        size = partial.stat().st_size
        if fingerprint["size"] is not None and size != fingerprint["size"]:
            raise DownloadFailed(f"{url}: got {size} bytes but the source has {fingerprint['size']}; run the download again")
        sha256 = sha256_file(partial)
        if fingerprint.get("sha256") and sha256 != fingerprint["sha256"]:
            raise DownloadFailed(f"{url}: sha256 {sha256} differs from the published {fingerprint['sha256']}; run the download again")
        details = check(url, partial)
    except (UserError, DownloadFailed):
        partial.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    sidecar.unlink(missing_ok=True)
    return {
        "url": url,
        "file": target.name,
        "bytes": size,
        "sha256": sha256,
        "etag": fingerprint.get("etag"),
        **details,
    }


def _fetch_http(fingerprint: dict[str, Any], partial: Path, chunk_bytes: int, on_bytes: Callable[[int], None]) -> None:
    """Stream the rest of an http(s) file into partial with one ranged GET. `If-Range` asks for
    the rest only if the file is still the one fingerprinted; a server that sends the whole
    file instead (it changed, or ignores ranges) is started over from byte 0, never spliced."""
    url, size, etag = fingerprint["url"], fingerprint["size"], fingerprint.get("etag")
    offset = partial.stat().st_size if partial.exists() else 0
    if size is not None and offset == size:
        return
    headers = {"Accept-Encoding": "identity", **auth_headers(url)}  # the bytes on the server, not a re-compressed stream
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if etag and not etag.startswith("W/"):
            headers["If-Range"] = etag
    try:
        with requests.get(url, headers=headers, stream=True, timeout=HTTP_TIMEOUT_S) as response:
            if response.status_code == 416:  # the partial is longer than the source: it was another file
                partial.unlink()
                raise _Transient(f"{url}: the partial download does not match the source; starting over")
            _check_status(url, response)
            served = response.headers.get("ETag")
            if etag and served and not response.history and served != etag:  # (a redirect's target has its own ETags)
                partial.unlink(missing_ok=True)
                raise DownloadFailed(f"{url} changed since it was fingerprinted (ETag {etag} → {served}); "
                                     "run again: the new version is downloaded whole")
            if offset and response.status_code == 200:  # the whole file, not the rest: start over
                offset = 0
            with open(partial, "r+b" if offset else "wb") as out:
                out.seek(offset)
                out.truncate()
                for chunk in response.iter_content(chunk_bytes):
                    out.write(chunk)
                    on_bytes(len(chunk))
    except Exception as exc:  # a dropped connection is retried; a full disk is said in one line
        raise _classify(url, exc) from None
    got = partial.stat().st_size
    if size is not None and got < size:
        raise _Transient(f"{url}: connection closed after {got} of {size} bytes")


def _fetch_fsspec(fingerprint: dict[str, Any], partial: Path, chunk_bytes: int, on_bytes: Callable[[int], None]) -> None:
    """Copy the rest of a file from any fsspec filesystem, continuing at the partial's size."""
    url, size = fingerprint["url"], fingerprint["size"]
    offset = partial.stat().st_size if partial.exists() else 0
    if size is not None and offset >= size:
        if offset > size:
            partial.unlink()
            raise _Transient(f"{url}: the partial download is longer than the source; starting over")
        return
    fs, path = filesystem(url)
    try:  # no read-ahead cache: each read is one range request, so what reached the partial is all that was fetched
        with fs.open(path, "rb", cache_type="none") as source, open(partial, "ab") as out:
            source.seek(offset)
            while chunk := source.read(chunk_bytes):
                out.write(chunk)
                on_bytes(len(chunk))
    except Exception as exc:
        raise _classify(url, exc) from None


# ---------------------------------------------------------------------------------------
# The first row groups only (max_rows)
# ---------------------------------------------------------------------------------------


def _copy_first_row_groups(fingerprint: dict[str, Any], target: Path, max_rows: int) -> dict[str, Any]:
    """Read the footer and the first row groups that hold max_rows rows by range; write them as parquet."""
    url = fingerprint["url"]
    partial = target.with_name(target.name + ".partial")
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb", cache_type="none") as source:  # every read is one exact range request
            try:
                parquet = pq.ParquetFile(source)
            except pa.ArrowInvalid as exc:
                raise _not_parquet(url, str(exc)) from None
            rows = row_groups = 0
            with pq.ParquetWriter(partial, parquet.schema_arrow, compression="zstd") as writer:
                while rows < max_rows and row_groups < parquet.num_row_groups:
                    table = parquet.read_row_group(row_groups)
                    writer.write_table(table, row_group_size=max(table.num_rows, 1))
                    rows += table.num_rows
                    row_groups += 1
    except DownloadError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise _classify(url, exc) from None
    _check_parquet_magic(url, partial)
    os.replace(partial, target)
    return {
        "url": url,
        "file": target.name,
        "bytes": target.stat().st_size,
        "sha256": sha256_file(target),
        "etag": fingerprint.get("etag"),
        "row_groups": row_groups,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------
# Errors, retries and checks
# ---------------------------------------------------------------------------------------


def _retrying(url: str, attempts: int, backoff_s: float, action: Callable[[], Any]) -> Any:
    """action() with storage.fs's retries; when they run out, a DownloadFailed that says a rerun resumes."""
    try:
        return retrying(action, attempts, backoff_s)
    except SourceUnreachable as exc:
        raise DownloadFailed(
            f"{url}: still failing after {attempts} attempts ({exc}); run again later — a .partial download is resumed"
        ) from None


def _check_status(url: str, response: requests.Response) -> None:
    if response.status_code < 400:
        return
    failure = source_failure(url, requests.HTTPError(response.reason, response=response))
    if isinstance(failure, SourceUnreachable):
        raise _Transient(str(failure), _retry_after(response.headers.get("Retry-After")))
    raise DownloadError(str(failure))


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), MAX_RETRY_AFTER_S) if value else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def _classify(url: str, exc: BaseException) -> BaseException:
    """A backend's exception as _Transient (retry now) or DownloadError (give up), by storage.fs's
    reading; one it does not recognise (a bug) as it is."""
    failure = source_failure(url, exc)
    if isinstance(failure, SourceUnreachable):
        return _Transient(str(failure), failure.retry_after)
    if isinstance(failure, UserError):
        return DownloadError(str(failure))
    return failure


def _not_parquet(url: str, detail: str) -> DownloadError:
    return DownloadError(
        f"{url} is not a complete parquet file ({detail}); point data.source at FineWeb-style .parquet files "
        "or re-upload the source if it was cut short"
    )


def check_parquet(url: str, path: Path) -> dict[str, Any]:
    """A complete parquet file (PAR1 at both ends, a readable footer): its row groups and rows."""
    _check_parquet_magic(url, path)
    metadata = _read_footer(url, path)
    return {"row_groups": metadata.num_row_groups, "rows": metadata.num_rows}


def _check_parquet_magic(url: str, path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(size - 4, 0))
        tail = handle.read(4)
    if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise _not_parquet(url, "no PAR1 magic at both ends")


def _read_footer(url: str, path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise _not_parquet(url, str(exc).splitlines()[0]) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
