"""s3:// sources through the real s3fs client against a real S3 protocol server on loopback
(moto's S3 service, started by the test): globs, fingerprints with ETags, whole-file downloads,
a dropped connection resumed by range, max_rows range reads, and missing keys.

A thin WSGI layer in front of moto logs (method, path, Range, bytes sent) and can cut a
response short, as the loopback HTTP server of test_download.py does for https://.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from storage.download import download_sources
from storage.fs import SourceError, expand_sources, source_fingerprint
from tests.test_download import ROW_GROUP, ROWS, _check_entry, parquet_bytes  # noqa: F401 - parquet_bytes is a fixture

BUCKET = "fineweb"
KEY = "data/CC-MAIN-2013-20/000_00000.parquet"


class LoggedS3:
    """moto's S3 app behind a log of every request and an optional cut of one GET body."""

    def __init__(self) -> None:
        self.app = DomainDispatcherApplication(create_backend_app)
        self.log: list[tuple[str, str, str | None, int]] = []
        self.cut: dict[str, tuple[int, int]] = {}  # object path → (which GET of it, bytes to send before dropping)

    def __call__(self, environ, start_response) -> Iterator[bytes]:
        method, path, ranged = environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("HTTP_RANGE")
        body = b"".join(self.app(environ, start_response))
        cut = None
        if method == "GET" and path in self.cut and self.cut[path][0] == len(self.gets(path)):
            cut = self.cut.pop(path)[1]
        sent = body if cut is None else body[:cut]
        self.log.append((method, path, ranged, len(sent)))
        yield sent
        if cut is not None:  # the promised Content-Length is never reached: the client sees a dropped connection
            raise ConnectionAbortedError("test: connection dropped")

    def gets(self, path: str) -> list[tuple[str | None, int]]:
        return [(ranged, sent) for method, p, ranged, sent in self.log if method == "GET" and p == path]


@pytest.fixture(scope="module")
def s3_server() -> Iterator[LoggedS3]:
    """A loopback S3 endpoint, with s3fs pointed at it through the standard AWS variables."""
    app = LoggedS3()
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)  # any free port
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        yield app
        s3fs.S3FileSystem.clear_instance_cache()
    server.shutdown()
    thread.join()


@pytest.fixture
def s3_source(s3_server, parquet_bytes) -> str:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.pipe(f"{BUCKET}/{KEY}", parquet_bytes)
    fs.pipe(f"{BUCKET}/data/CC-MAIN-2013-20/README.md", b"not a parquet file")
    s3_server.log.clear()
    return f"s3://{BUCKET}/{KEY}"


def test_glob_and_fingerprint_use_listings_and_heads_only(s3_server, s3_source, parquet_bytes):
    assert expand_sources([f"s3://{BUCKET}/data/*/*.parquet"]) == [s3_source]
    fingerprint = source_fingerprint(s3_source)
    assert fingerprint["size"] == len(parquet_bytes) and fingerprint["etag"].strip('"')
    assert not s3_server.gets(f"/{BUCKET}/{KEY}")  # no object content read
    with pytest.raises(SourceError, match=f"no file matches s3://{BUCKET}/data/\\*/\\*.jsonl"):
        expand_sources([f"s3://{BUCKET}/data/*/*.jsonl"])


def test_whole_file_download_is_byte_identical_with_the_etag(s3_source, tmp_path, parquet_bytes):
    [entry] = download_sources([s3_source], tmp_path / "dest")
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    assert entry["url"] == s3_source and entry["etag"] == source_fingerprint(s3_source)["etag"]


def _starts(gets: list[tuple[str | None, int]]) -> list[int]:
    return [int(ranged.removeprefix("bytes=").split("-")[0]) for ranged, _ in gets]


def test_dropped_connection_refetches_only_the_chunk_it_cut(s3_server, s3_source, tmp_path, parquet_bytes):
    chunk = 64 << 10
    s3_server.cut[f"/{BUCKET}/{KEY}"] = (3, 1000)  # the fourth range request dies after 1000 bytes
    [entry] = download_sources([s3_source], tmp_path / "dest", backoff_s=0.01, chunk_bytes=chunk)
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    gets = s3_server.gets(f"/{BUCKET}/{KEY}")
    assert gets[3][1] == 1000 and _starts(gets)[3:5] == [3 * chunk, 3 * chunk]  # that range again, not the file
    assert sorted(set(_starts(gets))) == list(range(0, len(parquet_bytes), chunk))
    assert sum(sent for _, sent in gets) == len(parquet_bytes) + 1000


def test_interrupted_download_continues_from_the_partial_file(s3_server, s3_source, tmp_path, parquet_bytes):
    chunk = 64 << 10

    def interrupt_after_300k(done: int, total: int) -> None:
        if done >= 300_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_sources([s3_source], tmp_path / "dest", progress=interrupt_after_300k, chunk_bytes=chunk)
    kept = (tmp_path / "dest" / "000_00000.parquet.partial").stat().st_size
    assert kept == 5 * chunk and not (tmp_path / "dest" / "000_00000.parquet").exists()
    s3_server.log.clear()
    [entry] = download_sources([s3_source], tmp_path / "dest", chunk_bytes=chunk)
    _check_entry(entry, tmp_path / "dest", parquet_bytes)
    gets = s3_server.gets(f"/{BUCKET}/{KEY}")
    assert _starts(gets)[0] == kept and sum(sent for _, sent in gets) == len(parquet_bytes) - kept


def test_max_rows_reads_the_footer_and_first_row_groups_by_range(s3_server, s3_source, tmp_path, parquet_bytes):
    [entry] = download_sources([s3_source], tmp_path / "dest", max_rows=350)
    assert (entry["rows"], entry["row_groups"]) == (2 * ROW_GROUP, 2)
    gets = s3_server.gets(f"/{BUCKET}/{KEY}")
    assert all(ranged for ranged, _ in gets)
    fetched = sum(sent for _, sent in gets)
    assert fetched < len(parquet_bytes) / 3, f"fetched {fetched} of {len(parquet_bytes)} bytes"
    copy = pq.read_table(tmp_path / "dest" / entry["file"])
    assert copy.equals(pq.read_table(pa.BufferReader(parquet_bytes)).slice(0, 2 * ROW_GROUP)) and ROWS > 2 * ROW_GROUP


def test_missing_key_and_non_parquet_object_are_one_line_errors(s3_source, tmp_path):
    missing = f"s3://{BUCKET}/data/CC-MAIN-2013-20/999_00000.parquet"
    with pytest.raises(SourceError, match=f"source not found: {missing} — check data.source"):
        download_sources([missing], tmp_path / "dest")
    readme = f"s3://{BUCKET}/data/CC-MAIN-2013-20/README.md"
    with pytest.raises(Exception, match=f"{readme} is not a complete parquet file") as error:
        download_sources([readme], tmp_path / "dest")
    assert "\n" not in str(error.value) and list((tmp_path / "dest").iterdir()) == []


def test_botocore_streaming_errors_are_retried_not_fatal():
    """A cut response surfaces from botocore as ResponseStreamingError, not an OSError: it must
    be retried like any dropped connection, and so must S3's 503 SlowDown, while a refused
    request is not."""
    from botocore.exceptions import ClientError, ResponseStreamingError

    from storage.download import DownloadError, _classify, _Transient

    cut = ResponseStreamingError(error="Connection broken: IncompleteRead(1000 bytes read, 64536 more expected)")
    assert isinstance(_classify("s3://b/k", cut), _Transient)
    try:
        raise RuntimeError("wrapped by a backend") from cut
    except RuntimeError as wrapped:
        assert isinstance(_classify("s3://b/k", wrapped), _Transient)
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    refused = _classify("s3://b/k", denied)
    assert isinstance(refused, DownloadError) and "AccessDenied" in str(refused)
    slow_down = ClientError({"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    assert isinstance(_classify("s3://b/k", slow_down), _Transient)
