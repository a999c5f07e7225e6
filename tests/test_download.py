"""Sources and downloads against real files, fsspec's memory filesystem and a loopback HTTP
server that supports Range, drops connections and fails on demand; plus the demo corpus."""

import base64
import hashlib
import importlib.util
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.demo_corpus import DEMO_URL, FILE_NAME, DemoCorpusError, build_demo_corpus, resolve_demo_source
from storage.download import DownloadError, DownloadFailed, download_sources, local_names
from storage.fs import SourceError, expand_sources, source_fingerprint

ROWS, ROW_GROUP = 2000, 200


@pytest.fixture(scope="module")
def parquet_bytes(tmp_path_factory) -> bytes:
    """~1 MB of incompressible text in 10 row groups, so range reads are easy to measure."""
    texts = [os.urandom(250).hex() for _ in range(ROWS)]
    path = tmp_path_factory.mktemp("src") / "sample.parquet"
    pq.write_table(pa.table({"text": texts, "id": [str(i) for i in range(ROWS)]}), path, row_group_size=ROW_GROUP)
    return path.read_bytes()


@pytest.fixture
def source(tmp_path, parquet_bytes) -> Path:
    path = tmp_path / "src" / "sample.parquet"
    path.parent.mkdir()
    path.write_bytes(parquet_bytes)
    return path


class Server(ThreadingHTTPServer):
    """Serves `files` with HEAD, GET and Range; logs (method, path, Range, bytes sent).

    `drop_after`: path → bytes to send before cutting the connection, once.
    `fail`: path → list of HTTP statuses to answer GETs with, one per request, before serving.
    `basic_auth`: "user:password" that every request must carry, else 401.
    `ignore_range`: answer every GET with 200 and the whole file, as some servers do.
    `stall_after`: path → (bytes, seconds): send that many bytes, go silent that long and hang up, once.
    `replace_after_cut`: path → new content, put in place once a drop_after cut has happened.
    An `If-Range` that no longer matches the file's ETag gets the whole file, as HTTP says.
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.fail: dict[str, list[int]] = {}
        self.basic_auth: str | None = None
        self.ignore_range = False
        self.stall_after: dict[str, tuple[int, float]] = {}
        self.replace_after_cut: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None, int]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        server: Server = self.server
        if server.basic_auth and self.headers.get("Authorization") != "Basic " + base64.b64encode(server.basic_auth.encode()).decode():
            server.log.append((self.command, self.path, self.headers.get("Range"), 0))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = server.files.get(self.path)
        failures = server.fail.get(self.path) if body else None
        if data is None or failures:
            status = failures.pop(0) if failures else 404
            server.log.append((self.command, self.path, self.headers.get("Range"), 0))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(data) - 1
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if server.ignore_range or self.headers.get("If-Range", etag) != etag:
            match = None
        if match:
            start = int(match[1])
            end = min(int(match[2]), end) if match[2] else end
        payload = data[start : end + 1]
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.end_headers()
        if not body:
            server.log.append((self.command, self.path, None, 0))
            return
        cut = server.drop_after.pop(self.path, None)
        sent = payload if cut is None else payload[:cut]
        if self.path in server.stall_after:  # send the start, go silent, then hang up: the client must time out
            before, seconds = server.stall_after.pop(self.path)
            server.log.append((self.command, self.path, self.headers.get("Range"), before))
            self.wfile.write(sent[:before])
            self.wfile.flush()
            time.sleep(seconds)
            self.close_connection = True
            return
        # logged before the bytes go out: a client that has read them all may look at the log at once
        server.log.append((self.command, self.path, self.headers.get("Range"), len(sent)))
        self.wfile.write(sent)
        self.wfile.flush()
        if cut is not None:
            if self.path in server.replace_after_cut:
                server.files[self.path] = server.replace_after_cut.pop(self.path)
            self.close_connection = True
            self.connection.shutdown(2)


@pytest.fixture
def server(parquet_bytes):
    http = Server()
    http.files["/data/sample.parquet"] = parquet_bytes
    thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield http
    http.shutdown()
    http.server_close()


def _check_entry(entry: dict, dest: Path, data: bytes):
    assert (dest / entry["file"]).read_bytes() == data
    assert entry["bytes"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert (entry["rows"], entry["row_groups"]) == (ROWS, ROWS // ROW_GROUP)
    assert sorted(p.name for p in dest.iterdir()) == [entry["file"]]  # no .partial or sidecar left


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


def test_expand_sources_globs_local_file_and_memory(source):
    folder = source.parent
    (folder / "other.parquet").write_bytes(b"x")
    assert expand_sources([str(folder / "*.parquet")]) == [str(folder / "other.parquet"), str(source)]
    assert expand_sources([f"file://{folder}/s*.parquet"]) == [f"file://{source}"]
    memory = fsspec.filesystem("memory")
    memory.pipe("/expand/a.parquet", b"1")
    memory.pipe("/expand/b.parquet", b"2")
    assert expand_sources(["memory://expand/*.parquet"]) == ["memory:///expand/a.parquet", "memory:///expand/b.parquet"]
    url = "https://example.org/file.parquet?download=true"
    assert expand_sources([url, url]) == [url]  # no glob for https, duplicates dropped


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(SourceError, match=re.escape(f"no file matches {tmp_path}/*.parquet")):
        expand_sources([f"{tmp_path}/*.parquet"])


@pytest.mark.parametrize("url, package", [("hf://datasets/HuggingFaceFW/fineweb/data/*.parquet", "huggingface_hub"), ("s3://bucket/x.parquet", "s3fs")])
def test_missing_optional_backend_says_what_to_install(url, package, monkeypatch):
    installed = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == package else installed(name, *args))
    with pytest.raises(SourceError, match=f"pip install {package}"):
        expand_sources([url])


def test_fingerprint_is_cheap_and_changes_with_the_file(source, server):
    local = source_fingerprint(str(source))
    assert local["size"] == source.stat().st_size and local["mtime_ns"] == source.stat().st_mtime_ns
    remote = source_fingerprint(server.url("/data/sample.parquet"))
    assert remote["size"] == len(server.files["/data/sample.parquet"]) and remote["etag"]
    assert all(method == "HEAD" for method, *_ in server.log)  # no content read
    with pytest.raises(SourceError, match=re.escape(f"source not found: {source}.missing — check data.source")):
        source_fingerprint(f"{source}.missing")


def test_local_names_disambiguate_fineweb_style_paths():
    urls = ["hf://datasets/f/data/CC-MAIN-2013-20/000_00000.parquet", "hf://datasets/f/data/CC-MAIN-2013-48/000_00000.parquet"]
    assert local_names(urls) == ["CC-MAIN-2013-20_000_00000.parquet", "CC-MAIN-2013-48_000_00000.parquet"]
    assert local_names(["/a/x.parquet", "https://h/y.parquet?download=1"]) == ["x.parquet", "y.parquet"]


# ---------------------------------------------------------------------------------------
# Whole-file downloads
# ---------------------------------------------------------------------------------------


def test_local_file_and_memory_sources_are_copied_and_verified(source, tmp_path, parquet_bytes):
    memory = fsspec.filesystem("memory")
    memory.pipe("/dl/sample.parquet", parquet_bytes)
    for i, url in enumerate([str(source), f"file://{source}", "memory://dl/sample.parquet"]):
        dest = tmp_path / f"dest{i}"
        seen = []
        [entry] = download_sources([url], dest, progress=lambda done, total: seen.append((done, total)), chunk_bytes=256 << 10)
        _check_entry(entry, dest, parquet_bytes)
        assert entry["url"] == url and seen[-1] == (len(parquet_bytes), len(parquet_bytes))


def test_https_download_is_byte_identical(server, tmp_path, parquet_bytes):
    [entry] = download_sources([server.url("/data/sample.parquet")], tmp_path / "dest")
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    assert entry["etag"]


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path, parquet_bytes):
    server.drop_after["/data/sample.parquet"] = 300_000
    [entry] = download_sources([server.url("/data/sample.parquet")], tmp_path / "dest", backoff_s=0.01, chunk_bytes=16 << 10)
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    gets = [(rng, sent) for method, _, rng, sent in server.log if method == "GET"]
    assert gets[0] == (None, 300_000)
    resumed_at = int(gets[1][0].removeprefix("bytes=").removesuffix("-"))
    assert 300_000 - (16 << 10) < resumed_at <= 300_000  # where the partial file ended (whole chunks), not zero
    assert sum(sent for _, sent in gets) < len(parquet_bytes) + (16 << 10)


def test_a_server_that_ignores_range_gets_a_clean_restart_not_a_splice(server, tmp_path, parquet_bytes):
    server.drop_after["/data/sample.parquet"] = 300_000
    server.ignore_range = True
    [entry] = download_sources([server.url("/data/sample.parquet")], tmp_path / "dest", backoff_s=0.01, chunk_bytes=16 << 10)
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    gets = [(rng, sent) for method, _, rng, sent in server.log if method == "GET"]
    assert gets[1][0] is not None and gets[1][1] == len(parquet_bytes)  # asked for the rest, got (and kept) the whole file


def test_a_source_that_changes_between_attempts_is_started_over_not_spliced(server, tmp_path, parquet_bytes):
    url = server.url("/data/sample.parquet")
    rewritten = pa.BufferOutputStream()
    pq.write_table(pq.read_table(pa.BufferReader(parquet_bytes)).slice(0, ROWS - 1), rewritten, row_group_size=ROW_GROUP)
    changed = rewritten.getvalue().to_pybytes()  # a new version of the file: one row fewer
    server.drop_after["/data/sample.parquet"] = 300_000
    server.replace_after_cut["/data/sample.parquet"] = changed  # replaced while the first attempt was cut
    with pytest.raises(DownloadFailed, match="changed since it was fingerprinted"):
        download_sources([url], tmp_path / "dest", backoff_s=0.01, chunk_bytes=16 << 10)
    assert [rng for method, _, rng, _ in server.log if method == "GET"][1] is not None  # it asked to resume, If-Range
    assert not list((tmp_path / "dest").glob("*.partial"))  # the bytes of the old file are not kept to splice onto
    [entry] = download_sources([url], tmp_path / "dest")  # the next run fingerprints the new file and gets it whole
    assert (tmp_path / "dest" / entry["file"]).read_bytes() == changed


def test_a_stalled_connection_times_out_and_resumes_by_range(server, tmp_path, parquet_bytes, monkeypatch):
    monkeypatch.setattr("storage.download.HTTP_TIMEOUT_S", (2, 0.5))
    server.stall_after["/data/sample.parquet"] = (200_000, 3.0)
    [entry] = download_sources([server.url("/data/sample.parquet")], tmp_path / "dest", backoff_s=0.01, chunk_bytes=16 << 10)
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    gets = [rng for method, _, rng, _ in server.log if method == "GET"]
    resumed_at = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 200_000 - (16 << 10) < resumed_at <= 200_000


def test_partial_left_by_a_failed_run_is_resumed_by_the_next(server, tmp_path, parquet_bytes):
    server.drop_after["/data/sample.parquet"] = 100_000
    url = server.url("/data/sample.parquet")
    with pytest.raises(DownloadFailed, match="still failing after 1 attempts"):
        download_sources([url], tmp_path / "dest", attempts=1, chunk_bytes=16 << 10)
    kept = (tmp_path / "dest" / "sample.parquet.partial").stat().st_size
    assert 100_000 - (16 << 10) < kept <= 100_000
    assert not (tmp_path / "dest" / "sample.parquet").exists()
    [entry] = download_sources([url], tmp_path / "dest")
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    assert [rng for method, _, rng, _ in server.log if method == "GET"] == [None, f"bytes={kept}-"]


def test_server_errors_and_rate_limits_are_retried(server, tmp_path, parquet_bytes):
    server.fail["/data/sample.parquet"] = [503, 429]
    [entry] = download_sources([server.url("/data/sample.parquet")], tmp_path / "dest", backoff_s=0.01)
    _check_entry(entry, tmp_path / "dest", parquet_bytes)


def test_not_found_and_forbidden_fail_at_once_naming_the_url(server, tmp_path):
    missing = server.url("/data/missing.parquet")
    with pytest.raises(SourceError, match=re.escape(f"source not found: {missing}")):
        download_sources([missing], tmp_path / "dest")
    server.fail["/data/sample.parquet"] = [403]
    url = server.url("/data/sample.parquet")
    with pytest.raises(DownloadError, match=re.escape(f"{url}: HTTP 403")):
        download_sources([url], tmp_path / "dest", backoff_s=0.01)
    assert sum(method == "GET" and path == "/data/sample.parquet" for method, path, *_ in server.log) == 1  # not retried


@pytest.mark.parametrize("content", [b"<html>not parquet</html>" * 100, "truncated"])
def test_non_parquet_or_truncated_source_leaves_nothing_behind(tmp_path, parquet_bytes, content):
    path = tmp_path / "bad.parquet"
    path.write_bytes(parquet_bytes[: len(parquet_bytes) // 2] if content == "truncated" else content)
    with pytest.raises(DownloadError) as error:
        download_sources([str(path)], tmp_path / "dest")
    assert f"{path} is not a complete parquet file" in str(error.value) and "\n" not in str(error.value)
    assert list((tmp_path / "dest").iterdir()) == []


# ---------------------------------------------------------------------------------------
# max_rows: only the first row groups, read by range
# ---------------------------------------------------------------------------------------


def test_max_rows_reads_only_the_first_row_groups_over_https(server, tmp_path, parquet_bytes):
    [entry] = download_sources([server.url("/data/sample.parquet")], tmp_path / "dest", max_rows=350)
    assert (entry["rows"], entry["row_groups"]) == (400, 2)
    fetched = sum(sent for method, _, _, sent in server.log if method == "GET")
    assert fetched < len(parquet_bytes) / 3, f"fetched {fetched} of {len(parquet_bytes)} bytes"
    copy = pq.read_table(tmp_path / "dest" / entry["file"])
    assert copy.equals(pq.read_table(pa.BufferReader(parquet_bytes)).slice(0, 400))
    assert entry["sha256"] == hashlib.sha256((tmp_path / "dest" / entry["file"]).read_bytes()).hexdigest()


def test_max_rows_spans_sources_in_order_and_stops(source, tmp_path):
    second = source.with_name("second.parquet")
    second.write_bytes(source.read_bytes())
    fsspec.filesystem("memory").pipe("/never/read.parquet", b"not even parquet: never opened")
    entries = download_sources([str(source), str(second), "memory://never/read.parquet"], tmp_path / "dest", max_rows=ROWS + 1)
    assert [(e["file"], e["rows"]) for e in entries] == [("sample.parquet", ROWS), ("second.parquet", ROW_GROUP)]


def test_max_rows_on_a_non_parquet_source_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("just text " * 100)
    with pytest.raises(DownloadError, match="is not a complete parquet file"):
        download_sources([str(path)], tmp_path / "dest", max_rows=10)
    assert list((tmp_path / "dest").iterdir()) == []


# ---------------------------------------------------------------------------------------
# The demo corpus
# ---------------------------------------------------------------------------------------


def test_demo_corpus_is_fineweb_shaped_labelled_and_stable(tmp_path):
    url = resolve_demo_source(DEMO_URL, tmp_path)
    path = tmp_path / "demo-corpus" / FILE_NAME
    assert url == path.as_uri()
    mtime = path.stat().st_mtime_ns
    assert build_demo_corpus(tmp_path / "demo-corpus") == path and path.stat().st_mtime_ns == mtime  # not rewritten

    parquet = pq.ParquetFile(path)
    assert parquet.schema_arrow.names == ["text", "id", "dump", "url", "date", "file_path", "language", "language_score"]
    assert b"DEMO CORPUS" in parquet.schema_arrow.metadata[b"fineweb_pretrain.note"]
    table = parquet.read()
    assert 1_000_000 < sum(len(t) for t in table["text"].to_pylist()) < 3_000_000
    assert set(table["dump"].to_pylist()) == {"demo-python-docs"} and set(table["language"].to_pylist()) == {"en"}
    assert all(u.startswith("https://docs.python.org/") for u in table["url"].to_pylist())
    assert parquet.num_row_groups > 1  # so max_rows has row groups to choose from
    [entry] = download_sources([url], tmp_path / "dest", max_rows=10)
    assert entry["rows"] < table.num_rows


def test_other_urls_pass_through_and_unknown_demo_names_fail(tmp_path):
    assert resolve_demo_source("https://x/y.parquet", tmp_path) == "https://x/y.parquet"
    with pytest.raises(DemoCorpusError, match="demo://python-docs"):
        resolve_demo_source("demo://wikipedia", tmp_path)
