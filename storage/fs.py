"""Where the data comes from: source URLs expanded into files, a cheap fingerprint of each,
and one reading of what a failure to reach a source means.

A source is a local path, or a `file://`, `memory://`, `https://`, `hf://`, `s3://` or
`gs://` URL, possibly a glob (except http(s), where `*` and `?` belong to the URL). Every
URL but http(s) goes through fsspec; the optional backends (s3fs, gcsfs) are checked up
front so a missing one gives a one-line `pip install` hint.

Credentials come from each backend's usual place: `HF_TOKEN` (and `HF_ENDPOINT` for a Hub
mirror) for `hf://` and for https URLs on the Hub, `AWS_*` or `~/.aws` for `s3://`,
`user:password@` inside an http(s) URL. They are used, and redacted from every message.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp  # fsspec's http backend: its errors are network errors
import requests
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from configs.errors import DiskFull, TransientError, UserError, disk_full_error

# protocol → the package that provides its fsspec filesystem
OPTIONAL_BACKENDS = {"hf": "huggingface_hub", "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
GLOB_CHARS = "*?["
HUGGING_FACE_ENDPOINT = "https://huggingface.co"
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
HTTP_TIMEOUT_S = (15, 60)  # connect, read
ATTEMPTS = 5
BACKOFF_S = 0.5  # the first retry waits this long, then twice as long each time
MAX_RETRY_AFTER_S = 60.0
# Network failures of clients that are neither OSErrors nor requests/aiohttp errors (botocore,
# urllib3, httpx as used by huggingface_hub), by class name so no backend has to be imported.
TRANSIENT_ERROR_NAMES = {
    "ResponseStreamingError", "IncompleteRead", "ProtocolError", "ReadTimeoutError", "ConnectTimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeout", "ConnectTimeout", "TransportError",
}


class SourceError(UserError):
    """A data source that cannot be used as given (missing, refused, unreadable); one line."""


class SourceUnreachable(TransientError):
    """A source that could not be reached right now (network, 5xx, rate limit); one line. A
    server's Retry-After, when it sent one, is kept for the next attempt."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


Result = TypeVar("Result")


def retrying(action: Callable[[], Result], attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> Result:
    """action(), run again with exponential backoff (or the server's Retry-After) while it
    raises SourceUnreachable; the last one is raised when the attempts are used up."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except SourceUnreachable as exc:
            if attempt == attempts:
                raise
            delay = exc.retry_after if exc.retry_after is not None else backoff_s * 2 ** (attempt - 1)
            time.sleep(min(delay, MAX_RETRY_AFTER_S))
    raise AssertionError("unreachable")


def protocol_of(url: str) -> str:
    """`https` for https://…, `file` for a plain path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def local_path(url: str) -> str:
    """The absolute local path behind a plain path or a file:// URL."""
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def hub_endpoint() -> str:
    """The Hugging Face Hub this process talks to: HF_ENDPOINT (a mirror, or a test Hub) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or HUGGING_FACE_ENDPOINT


def is_hugging_face(url: str) -> bool:
    protocol = protocol_of(url)
    return protocol == "hf" or (protocol in ("http", "https") and urlsplit(url).netloc == urlsplit(hub_endpoint()).netloc)


def auth_headers(url: str) -> dict[str, str]:
    """The headers that carry the user's credentials for an http(s) URL: HF_TOKEN for the Hub."""
    token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token and is_hugging_face(url) else {}


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """fsspec's filesystem and path for a URL, with a one-line error for what cannot be opened."""
    protocol = protocol_of(url)
    if protocol == "demo":
        raise SourceError(f"{url}: demo:// sources must be resolved first with storage.demo_corpus.resolve_demo_source")
    package = OPTIONAL_BACKENDS.get(protocol)
    if package and importlib.util.find_spec(package) is None:
        raise SourceError(f"reading {protocol}:// sources needs {package}: pip install {package}")
    options: dict[str, Any] = {}
    if protocol == "hf":  # read now, not when huggingface_hub was imported
        options = {"endpoint": hub_endpoint(), "token": os.environ.get("HF_TOKEN") or None}
    elif protocol in ("http", "https") and (headers := auth_headers(url)):
        options = {"headers": headers}
    try:
        return url_to_fs(url, **options)
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
    fs.invalidate_cache()  # list what is there now, not what an earlier listing in this process saw
    try:
        matches = sorted(path for path, info in fs.glob(pattern, detail=True).items() if info.get("type") == "file")
    except Exception as exc:
        raise source_failure(source, exc) from None
    if not matches:
        raise SourceError(f"no file matches {source}; check the pattern in data.source")
    if protocol == "file":
        return [f"file://{path}" if "://" in source else path for path in matches]
    return [fs.unstrip_protocol(path) for path in matches]


def source_fingerprint(url: str) -> dict[str, Any]:
    """url, size, and etag (remote) or mtime_ns (local), without reading any content.

    Used as a cache key: a changed file gets a new fingerprint. Sources that publish a
    content hash (hf:// LFS files, and Hub resolve URLs through their X-Linked-Etag) also
    give `sha256`, which the download checks.
    """
    protocol = protocol_of(url)
    if protocol == "file":
        try:
            stat = os.stat(local_path(url))
        except FileNotFoundError:
            raise SourceError(f"source not found: {url} — check data.source") from None
        if not os.path.isfile(local_path(url)):
            raise SourceError(f"source {url} is not a file — check data.source (use a glob such as DIR/*.parquet)")
        return {"url": url, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if protocol in ("http", "https"):
        return _http_fingerprint(url)
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except Exception as exc:
        raise source_failure(url, exc) from None
    if info.get("type") == "directory":
        raise SourceError(f"source {url} is a folder — check data.source (use a glob such as DIR/*.parquet)")
    fingerprint = {"url": url, "size": info.get("size"), "etag": _etag(info)}
    lfs = info.get("lfs") or {}
    if lfs.get("sha256"):
        fingerprint["sha256"] = lfs["sha256"]
    return fingerprint


def _http_fingerprint(url: str) -> dict[str, Any]:
    """One HEAD, redirects followed (a GET whose body is not read, where HEAD is refused). The
    Hub answers a file's resolve URL with a redirect whose X-Linked-Size and X-Linked-Etag
    (the LFS sha256) describe the file itself."""
    headers = {"Accept-Encoding": "identity", **auth_headers(url)}
    try:
        response = requests.head(url, headers=headers, allow_redirects=True, timeout=HTTP_TIMEOUT_S)
        if response.status_code in (403, 405, 501):  # servers (and pre-signed GET URLs) that refuse HEAD: ask with GET
            with requests.get(url, headers=headers, allow_redirects=True, timeout=HTTP_TIMEOUT_S, stream=True) as response:
                pass  # the headers are enough; the body is never read
    except requests.RequestException as exc:
        raise source_failure(url, exc) from None
    if response.status_code >= 400:
        raise source_failure(url, requests.HTTPError(response.reason, response=response))
    linked = {name: hop.headers[name] for hop in response.history for name in ("X-Linked-Size", "X-Linked-Etag")
              if name in hop.headers}
    size = linked.get("X-Linked-Size") or response.headers.get("Content-Length")
    etag = linked.get("X-Linked-Etag") or response.headers.get("ETag") or response.headers.get("Last-Modified")
    fingerprint = {"url": url, "size": int(size) if size else None, "etag": etag}
    digest = (linked.get("X-Linked-Etag") or "").strip('"')
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        fingerprint["sha256"] = digest
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


# ---------------------------------------------------------------------------------------
# What a failure means
# ---------------------------------------------------------------------------------------


def source_failure(url: str, error: BaseException) -> BaseException:
    """The one-line error for a failure to list, stat or read `url`: the user's to fix
    (missing, refused, unreadable) or one that may pass (network, 5xx, rate limit). An error
    it does not recognise is returned as it is: a bug keeps its traceback."""
    if isinstance(error, (UserError, TransientError)):
        return error
    if (full := disk_full_error(error)) is not None:
        return DiskFull(f"no space left on the device holding {full.filename or 'the store'} while copying {url}; "
                        "free some space (or point storage.root elsewhere), then run again: the copy resumes")
    status = http_status(error)
    detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if status in (401, 403):
        return SourceError(_refused(url, status, detail))
    if status == 404 or _in_chain(error, FileNotFoundError) or type(error).__name__ == "RemoteEntryNotFoundError":
        return SourceError(f"source not found: {url} — check data.source")
    if _in_chain(error, PermissionError):
        return SourceError(f"{url}: permission denied — check data.source and your credentials")
    if status is not None:
        if is_transient_status(status):
            return SourceUnreachable(f"{url}: HTTP {status} ({detail}); the server may recover — run again later")
        return SourceError(f"{url}: HTTP {status} ({detail}) — check data.source")
    if is_network_error(error):
        return SourceUnreachable(f"cannot reach {url} ({detail}) — check the network, then run again")
    return error


def _refused(url: str, status: int, detail: str) -> str:
    if not is_hugging_face(url):
        return (f"{url}: HTTP {status} ({detail}): the server refuses access (the source is private or needs "
                "credentials) — check data.source and your credentials")
    if os.environ.get("HF_TOKEN"):
        fix = "the token in HF_TOKEN has no access to it: use a token of an account that accepted its terms"
    else:
        fix = "set HF_TOKEN to a token that can read it"
    return (f"{url}: the Hugging Face Hub refused access (HTTP {status}); the dataset is gated or private — {fix} "
            "(https://huggingface.co/settings/tokens)")


def is_transient_status(status: int) -> bool:
    return status in TRANSIENT_STATUS or status >= 500


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind an error of any client (requests, aiohttp, httpx, botocore), or None."""
    for seen in _chain(error):
        response = getattr(seen, "response", None)
        if isinstance(response, dict):  # botocore's ClientError: S3's 503 SlowDown, 403 AccessDenied
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        else:
            status = getattr(seen, "status", None) or getattr(seen, "status_code", None) or getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def is_network_error(error: BaseException) -> bool:
    """A dropped connection or a timeout, raised directly or as the cause of a backend's own error."""
    for seen in _chain(error):
        if isinstance(seen, (ConnectionError, TimeoutError, socket.gaierror, aiohttp.ClientError, requests.RequestException)):
            return True
        if any(kind.__name__ in TRANSIENT_ERROR_NAMES for kind in type(seen).__mro__):
            return True
    return False


def _chain(error: BaseException, limit: int = 6) -> list[BaseException]:
    """The error and the errors it was raised from or during."""
    found: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(found) < limit:
        found.append(seen)
        seen = seen.__cause__ or seen.__context__
    return found


def _in_chain(error: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(seen, kind) for seen in _chain(error))
