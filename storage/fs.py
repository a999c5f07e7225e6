"""Where the data comes from: source URLs expanded into files, and a cheap fingerprint of each.

A source is a local path, or a `file://`, `memory://`, `https://`, `hf://`, `s3://` or
`gs://` URL, possibly a glob (except https, where `*` and `?` belong to the URL). Every
URL goes through fsspec; the optional backends (huggingface_hub, s3fs, gcsfs) are
checked up front so a missing one gives a one-line `pip install` hint.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

# protocol → the package that provides its fsspec filesystem
OPTIONAL_BACKENDS = {"hf": "huggingface_hub", "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
GLOB_CHARS = "*?["


class SourceError(ValueError):
    """A data source that cannot be found or read; the message is one line."""


def protocol_of(url: str) -> str:
    """`https` for https://…, `file` for a plain path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def local_path(url: str) -> str:
    """The absolute local path behind a plain path or a file:// URL."""
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """fsspec's filesystem and path for a URL, with a one-line error for what cannot be opened."""
    protocol = protocol_of(url)
    if protocol == "demo":
        raise SourceError(f"{url}: demo:// sources must be resolved first with storage.demo_corpus.resolve_demo_source")
    package = OPTIONAL_BACKENDS.get(protocol)
    if package and importlib.util.find_spec(package) is None:
        raise SourceError(f"reading {protocol}:// sources needs {package}: pip install {package}")
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise SourceError(
            f"cannot open {url} ({exc}); use a local path or a file://, https://, hf://, s3://, gs:// or memory:// URL"
        ) from None


def expand_sources(sources: list[str]) -> list[str]:
    """Expand globs into a sorted, de-duplicated list of file URLs (local paths made absolute)."""
    urls: list[str] = []
    for source in sources:
        for url in _expand_one(source.strip()):
            if url not in urls:
                urls.append(url)
    return urls


def _expand_one(source: str) -> list[str]:
    protocol = protocol_of(source)
    is_glob = any(char in source for char in GLOB_CHARS) and protocol not in ("http", "https")
    if not is_glob:
        if protocol == "file" and "://" not in source:
            return [local_path(source)]
        filesystem(source)  # a missing backend is reported now, not at download time
        return [source]
    fs, pattern = filesystem(source)
    matches = sorted(path for path, info in fs.glob(pattern, detail=True).items() if info.get("type") == "file")
    if not matches:
        raise SourceError(f"no file matches {source}; check the pattern in data.source")
    if protocol == "file":
        return [f"file://{path}" if "://" in source else path for path in matches]
    return [fs.unstrip_protocol(path) for path in matches]


def source_fingerprint(url: str) -> dict[str, Any]:
    """url, size, and etag (remote) or mtime_ns (local), without reading any content.

    Used as a cache key: a changed file gets a new fingerprint. Remote sources that
    publish a content hash (hf:// LFS files) also give `sha256`.
    """
    not_found = SourceError(f"source not found: {url} — check data.source")
    if protocol_of(url) == "file":
        try:
            stat = os.stat(local_path(url))
        except FileNotFoundError:
            raise not_found from None
        if not os.path.isfile(local_path(url)):
            raise SourceError(f"source {url} is not a file — check data.source (use a glob such as DIR/*.parquet)")
        return {"url": url, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise not_found from None
    except OSError as exc:
        raise SourceError(f"cannot reach {url} ({exc}) — check data.source and the network") from None
    if info.get("type") == "directory":
        raise SourceError(f"source {url} is a folder — check data.source (use a glob such as DIR/*.parquet)")
    fingerprint = {"url": url, "size": info.get("size"), "etag": _etag(info)}
    lfs = info.get("lfs") or {}
    if lfs.get("sha256"):
        fingerprint["sha256"] = lfs["sha256"]
    return fingerprint


def _etag(info: dict[str, Any]) -> str | None:
    """The best version marker a filesystem reports: an ETag or content hash, else a modification time."""
    lfs = info.get("lfs") or {}
    for key in ("ETag", "etag", "md5Hash", "blob_id"):
        if info.get(key):
            return str(info[key])
    if lfs.get("sha256"):
        return lfs["sha256"]
    for key in ("LastModified", "Last-Modified", "mtime", "updated", "created"):
        if info.get(key):
            return str(info[key])
    return None
