"""A loopback stand-in for the Hugging Face Hub's HTTP API, for tests that use the real `HfFileSystem`.

`LoopbackHub` runs two stdlib HTTP/1.1 servers on 127.0.0.1 in daemon threads: the Hub itself
(`hub.endpoint`, pass it as `HfFileSystem(endpoint=...)` or `HF_ENDPOINT`) and a CDN on another port.
As on the real Hub, a file's `/resolve/` URL answers 302 to the CDN, which is another origin, so
clients drop the `Authorization` header on the way and `get_hf_file_metadata` stops at the 302.

Emulated, with the Hub's JSON fields, headers and `X-Error-Code`s:
  GET  /api/{models|datasets|spaces}/{ns}/{name}[/revision/{rev}]     repo info (`blobs=true` too)
  GET  /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand=     one page, no `Link` paging
  POST /api/{type}s/{repo}/paths-info/{rev}                            form fields `paths`, `expand`
  GET|HEAD /[datasets/|spaces/]{repo}/resolve/{rev}/{path}             302 to the CDN (LFS) or the bytes
  GET|HEAD {cdn}/cdn-lfs/{sha256}                                      bytes, one `Range` (206/416)
Revisions are `main` and the repo's current commit id. Gated repos want a bearer token from their set.

Left out: writes and commits, history and other refs, private repos (`RepoNotFound` for outsiders),
Xet (no `xetHash` is ever sent), paging, multi-range requests, compression, and rate limits.

Fault injection, keyed by a path in the repo or a sha256, consumed one request at a time:
  hub.fail[key] = [500, 503]   the next GETs of the file's resolve URL answer these statuses
  hub.drop_after[key] = 100    the next response carrying the bytes stops after 100 body bytes and
                               closes the connection (a list gives one cut per request)
  hub.ignore_range = True      the CDN answers every `Range` with 200 and the whole file
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
TYPED_PREFIXES = ("datasets", "spaces")  # URL prefixes of non-model repos; models have none


@dataclass
class HubFile:
    """A file in a repo; LFS files are described by their pointer, as in git."""

    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:
        """The git blob id: of the pointer for an LFS file, of the content otherwise."""
        blob = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


@dataclass
class HubRepo:
    """A repo at its single commit, on the `main` branch."""

    files: dict[str, HubFile] = field(default_factory=dict)
    tokens: set[str] | None = None  # None: public
    gate_files_only: bool = False

    @property
    def sha(self) -> str:
        """The commit id, derived from the content so that it changes with every added file."""
        return hashlib.sha1("".join(f"{p}:{f.oid}\n" for p, f in sorted(self.files.items())).encode()).hexdigest()

    @property
    def folders(self) -> set[str]:
        return {path.rsplit("/", n)[0] for path in self.files for n in range(1, path.count("/") + 1)}


@dataclass(frozen=True)
class LoggedRequest:
    """One answered request, logged before its body is sent."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    query: str
    range: str | None
    status: int
    bytes_sent: int  # body bytes written (fewer than Content-Length after a drop)
    auth: bool  # an Authorization header was sent


class HubError(Exception):
    """An error response: status, `X-Error-Code` (None for a bare status) and message."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Server(ThreadingHTTPServer):
    block_on_close = False  # stop() closes the keep-alive connections itself

    def __init__(self, hub: LoopbackHub, role: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.role = hub, role


class LoopbackHub:
    """Repos, fault tables and the request log behind the two loopback servers."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.fail: dict[str, int | list[int]] = {}
        self.drop_after: dict[str, int | list[int]] = {}
        self.ignore_range = False
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._servers: dict[str, _Server] = {}
        self._connections: set[socket.socket] = set()

    # -- content ----------------------------------------------------------------------------
    def add_file(self, repo_type: str, repo_id: str, path: str, data: bytes, lfs: bool = True) -> HubFile:
        """Add (or replace) a file; `repo_type` is "dataset(s)", "model(s)" or "space(s)"."""
        file = HubFile(data, lfs)
        self.repo(repo_type, repo_id, create=True).files[path.strip("/")] = file
        return file

    def gate(self, repo_type: str, repo_id: str, tokens: set[str], files_only: bool = False) -> None:
        """Only these bearer tokens get in: none → 401 GatedRepo, another → 403 GatedRepo.

        By default every endpoint of the repo is gated; with `files_only`, as on the real Hub for a
        gated repo, repo info and listings stay public and only `/resolve/` is gated.
        """
        repo = self.repo(repo_type, repo_id, create=True)
        repo.tokens, repo.gate_files_only = set(tokens), files_only

    def repo(self, repo_type: str, repo_id: str, create: bool = False) -> HubRepo:
        """The repo, created if asked, else a `RepoNotFound` error when missing."""
        key = (repo_type.rstrip("s") + "s", repo_id)
        if create:
            return self.repos.setdefault(key, HubRepo())
        if key not in self.repos:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return self.repos[key]

    # -- servers ----------------------------------------------------------------------------
    def start(self) -> Self:
        for role in ("hub", "cdn"):
            server = self._servers[role] = _Server(self, role)
            threading.Thread(target=server.serve_forever, name=f"loopback-{role}", daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers['hub'].server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers['cdn'].server_address[1]}"

    def url(self, repo_type: str, repo_id: str, path: str, revision: str = "main") -> str:
        """The file's resolve URL, as `hf_hub_url` builds it."""
        prefix = "" if repo_type.rstrip("s") == "model" else repo_type.rstrip("s") + "s/"
        return f"{self.endpoint}/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    # -- faults and log ---------------------------------------------------------------------
    def take_fault(self, table: dict, keys: list[str]) -> int | None:
        """Pop the next injected value for the first key present in `table`."""
        with self._lock:
            for key in keys:
                if key in table:
                    values = table.pop(key)
                    if isinstance(values, list) and len(values) > 1:
                        table[key] = values[1:]
                    return values[0] if isinstance(values, list) else values
        return None

    def blobs(self, sha256: str) -> list[tuple[str, HubFile]]:
        """The (path, file) pairs, in any repo, whose content has this sha256."""
        return [(path, f) for repo in self.repos.values() for path, f in repo.files.items() if f.sha256 == sha256]

    def gets(self, fragment: str = "") -> list[LoggedRequest]:
        """The logged GETs whose path contains `fragment`."""
        return [r for r in self.log if r.method == "GET" and fragment in r.path]

    def bytes_sent(self, fragment: str = "") -> int:
        """Body bytes sent by responses to requests whose path contains `fragment`."""
        return sum(r.bytes_sent for r in self.log if fragment in r.path)

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.hub = self.server.hub
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args) -> None:  # the request log replaces stderr lines
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_GET

    def _dispatch(self) -> None:
        self.url = urlsplit(self.path)
        parts = [unquote(part) for part in self.url.path.split("/")[1:]]
        self.query = parse_qs(self.url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if self.server.role == "cdn":
                self._cdn(parts)
            elif parts[0] == "api":
                self._api(parts[1:])
            else:
                self._resolve(parts)
        except HubError as error:
            body = json.dumps({"error": error.message}).encode()
            headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": error.message}
            self._reply(error.status, body, {**headers, **({"X-Error-Code": error.code} if error.code else {})})

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               cut_after: int | None = None) -> None:
        """Send a response, logged before its body so that the log is complete once the client has it."""
        sent = b"" if self.command == "HEAD" else body[:cut_after]
        record = LoggedRequest(self.server.role, self.command, self.url.path, self.url.query,
                               self.headers.get("Range"), status, len(sent), "Authorization" in self.headers)
        with self.hub._lock:
            self.hub.log.append(record)
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(sent)
        if cut_after is not None:
            self.close_connection = True

    # -- Hub --------------------------------------------------------------------------------
    def _check_access(self, repo: HubRepo, repo_type: str, repo_id: str, for_file: bool) -> None:
        if repo.tokens is None or (repo.gate_files_only and not for_file):
            return
        auth, kind = self.headers.get("Authorization", ""), repo_type.rstrip("s")
        if not auth.startswith("Bearer "):
            raise HubError(401, "GatedRepo", f"Access to {kind} {repo_id} is restricted. You must have access to it "
                           "and be authenticated to access it. Please log in.")
        if auth.removeprefix("Bearer ") not in repo.tokens:
            raise HubError(403, "GatedRepo", f"Access to {kind} {repo_id} is restricted and you are not in the "
                           f"authorized list. Visit https://huggingface.co/{repo_id} to ask for access.")

    def _revision(self, repo: HubRepo, revision: str) -> None:
        if revision not in ("main", repo.sha):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _api(self, parts: list[str]) -> None:
        if len(parts) < 3 or parts[0] not in ("models", "datasets", "spaces"):
            raise HubError(404, None, "Sorry, we can't find the page you are looking for.")
        repo_type, repo_id, rest = parts[0], "/".join(parts[1:3]), parts[3:]
        repo = self.hub.repo(repo_type, repo_id)
        self._check_access(repo, repo_type, repo_id, for_file=False)
        if rest[:1] in ([], ["revision"]) and self.command == "GET":
            self._revision(repo, "/".join(rest[1:]) or "main")
            return self._json(self._repo_info(repo, repo_id))
        if rest[:1] == ["tree"] and len(rest) >= 2 and self.command == "GET":
            self._revision(repo, rest[1])
            recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
            expand = self.query.get("expand", ["false"])[0].lower() == "true"
            return self._json(self._tree(repo, "/".join(rest[2:]).strip("/"), recursive, expand))
        if rest[:1] == ["paths-info"] and len(rest) == 2 and self.command == "POST":
            self._revision(repo, rest[1])
            form = parse_qs(self.body.decode())
            expand = form.get("expand", ["false"])[0].lower() == "true"
            paths = [p.strip("/") for p in form.get("paths", [])]
            return self._json([self._entry(repo, p, expand) for p in paths if p in repo.files or p in repo.folders])
        raise HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _json(self, value) -> None:
        self._reply(200, json.dumps(value).encode(), {"Content-Type": "application/json; charset=utf-8"})

    def _repo_info(self, repo: HubRepo, repo_id: str) -> dict:
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": path} for path in sorted(repo.files)]
        if blobs:
            for sibling in siblings:
                f = repo.files[sibling["rfilename"]]
                sibling.update(size=len(f.data), blobId=f.oid)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
        return {"_id": repo.sha[:24], "id": repo_id, "author": repo_id.split("/")[0], "sha": repo.sha,
                "lastModified": LAST_MODIFIED, "createdAt": LAST_MODIFIED, "private": False,
                "gated": "manual" if repo.tokens is not None else False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(len(f.data) for f in repo.files.values())}

    def _entry(self, repo: HubRepo, path: str, expand: bool) -> dict:
        if path in repo.files:
            f = repo.files[path]
            entry = {"type": "file", "oid": f.oid, "size": len(f.data), "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
            if expand:
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                               "pickleImportScan": None}
        else:
            oid = hashlib.sha1(f"{repo.sha}:{path}".encode()).hexdigest()
            entry = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = {"id": repo.sha, "title": "Upload folder using huggingface_hub", "date": LAST_MODIFIED}
        return entry

    def _tree(self, repo: HubRepo, folder: str, recursive: bool, expand: bool) -> list[dict]:
        if folder and folder not in repo.folders:  # a missing path, or a file: the Hub lists folders only
            raise HubError(404, "EntryNotFound", f"{folder} does not exist")
        prefix = folder + "/" if folder else ""
        below = [p for p in sorted(repo.folders) + sorted(repo.files) if p.startswith(prefix)]
        return [self._entry(repo, p, expand) for p in below if recursive or "/" not in p[len(prefix):]]

    def _resolve(self, parts: list[str]) -> None:
        repo_type = parts[0] if parts[0] in TYPED_PREFIXES else "models"
        parts = parts[1:] if parts[0] in TYPED_PREFIXES else parts
        if len(parts) < 5 or parts[2] != "resolve" or self.command == "POST":
            raise HubError(404, None, "Sorry, we can't find the page you are looking for.")
        repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.hub.repo(repo_type, repo_id)
        self._check_access(repo, repo_type, repo_id, for_file=True)
        self._revision(repo, revision)
        if path not in repo.files:
            raise HubError(404, "EntryNotFound", "Entry not found")
        f = repo.files[path]
        status = self.hub.take_fault(self.hub.fail, [path, f.sha256]) if self.command == "GET" else None
        if status is not None:
            raise HubError(status, None, "Internal Error - We're working hard to fix this as soon as possible!")
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{f.oid}"'}
        if not f.lfs:
            return self._send_bytes(f, [path, f.sha256], headers)
        location = f"{self.hub.cdn_endpoint}/cdn-lfs/{f.sha256}"
        self._reply(302, b"", {**headers, "Location": location, "X-Linked-Etag": f'"{f.sha256}"',
                               "X-Linked-Size": str(len(f.data))})

    # -- CDN --------------------------------------------------------------------------------
    def _cdn(self, parts: list[str]) -> None:
        blobs = self.hub.blobs(parts[1]) if len(parts) == 2 and parts[0] == "cdn-lfs" else []
        if not blobs or self.command == "POST":
            raise HubError(404, None, "Not Found")
        f = blobs[0][1]
        headers = {"ETag": f'"{f.sha256}"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}
        self._send_bytes(f, [f.sha256, *(path for path, _ in blobs)], headers)

    def _send_bytes(self, f: HubFile, fault_keys: list[str], headers: dict[str, str]) -> None:
        """The file's bytes, honouring one `bytes=` range (206, or 416 past the end)."""
        size, status, body = len(f.data), 200, f.data
        headers = {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and any(match.groups()) and not (self.hub.ignore_range and self.server.role == "cdn"):
            first, last = match.groups()
            start = size - int(last) if not first else int(first)
            end = size - 1 if not first or not last else min(int(last), size - 1)
            if start >= size or start > end:
                return self._reply(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
            status, body = 206, f.data[max(start, 0):end + 1]
            headers["Content-Range"] = f"bytes {max(start, 0)}-{end}/{size}"
        cut_after = self.hub.take_fault(self.hub.drop_after, fault_keys) if self.command == "GET" else None
        self._reply(status, body, headers, cut_after=cut_after)
