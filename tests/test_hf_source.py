"""hf:// sources (and the Hub's https resolve URLs) through the real huggingface_hub client,
against a loopback Hub that speaks the Hub's HTTP API (tests/hub_server.py), with
HF_ENDPOINT pointed at it: fingerprints, byte-identical downloads, a dropped connection
resumed by range, max_rows by range, globs, and one-line errors for 404, 401 and 403."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import HfFileSystem

from storage.download import DownloadError, download_sources
from storage.fs import SourceError, expand_sources, source_fingerprint
from tests.conftest import FINEWEB_FILES, FINEWEB_FOLDER, FINEWEB_REPO

FILE = f"{FINEWEB_FOLDER}/{FINEWEB_FILES[0]}"
URL = f"hf://datasets/{FINEWEB_REPO}/{FILE}"
GATED = "HuggingFaceFW/fineweb-gated"  # gated like the real Hub: listings public, files need a token
CLOSED = "HuggingFaceFW/fineweb-closed"  # every endpoint needs a token
TOKEN = "hf_" + "Loopback0Token" * 3


@pytest.fixture
def hub(loopback_hub, monkeypatch):
    """The session's loopback Hub as this process's Hugging Face endpoint, with an empty log."""
    monkeypatch.setenv("HF_ENDPOINT", loopback_hub.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # never a token saved on this machine
    HfFileSystem.clear_instance_cache()
    loopback_hub.clear_log()
    yield loopback_hub
    loopback_hub.fail.clear()
    loopback_hub.drop_after.clear()
    HfFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gated(loopback_hub, fineweb_parquet):
    loopback_hub.add_file("datasets", GATED, FILE, fineweb_parquet)
    loopback_hub.gate("datasets", GATED, tokens={TOKEN}, files_only=True)
    loopback_hub.add_file("datasets", CLOSED, FILE, fineweb_parquet)
    loopback_hub.gate("datasets", CLOSED, tokens={TOKEN})


def cdn_gets(hub) -> list:
    return [r for r in hub.log if r.server == "cdn" and r.method == "GET"]


def test_fingerprint_has_size_and_lfs_sha256_without_reading_content(hub, fineweb_parquet):
    fingerprint = source_fingerprint(URL)
    assert fingerprint["url"] == URL and fingerprint["size"] == len(fineweb_parquet)
    assert fingerprint["sha256"] == hashlib.sha256(fineweb_parquet).hexdigest()
    assert fingerprint["etag"] == hub.repo("datasets", FINEWEB_REPO).files[FILE].oid  # the git blob id: changes with the file
    assert cdn_gets(hub) == [] and not any("/resolve/" in r.path for r in hub.log)


def test_download_is_byte_identical_and_checked_against_the_published_sha256(hub, tmp_path, fineweb_parquet):
    [entry] = download_sources([URL], tmp_path / "dest", chunk_bytes=1 << 20)
    assert (tmp_path / "dest" / entry["file"]).read_bytes() == fineweb_parquet
    assert entry["sha256"] == hashlib.sha256(fineweb_parquet).hexdigest()
    assert entry["rows"] == pq.read_metadata(pa.BufferReader(fineweb_parquet)).num_rows
    assert all(r.range for r in cdn_gets(hub))  # ranged reads of 1 MiB, no read-ahead cache
    assert hub.bytes_sent("/cdn-lfs/") == len(fineweb_parquet)


def test_dropped_connection_is_resumed_by_range_where_the_file_stopped(hub, tmp_path, fineweb_parquet, monkeypatch):
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)  # huggingface_hub's own backoff, 23 s otherwise
    chunk = len(fineweb_parquet) // 4  # the file in four ranged reads, and a remainder
    # the first chunk arrives; the next response is cut six times, more than huggingface_hub retries
    hub.drop_after[FILE] = [None] + [50_000] * 6
    [entry] = download_sources([URL], tmp_path / "dest", chunk_bytes=chunk, backoff_s=0.01)
    assert (tmp_path / "dest" / entry["file"]).read_bytes() == fineweb_parquet
    ranges = [r.range for r in cdn_gets(hub)]
    assert ranges[0] == f"bytes=0-{chunk - 1}"
    assert ranges[1:8] == [f"bytes={chunk}-{2 * chunk - 1}"] * 7  # six cuts, then our retry resumes at the partial's end
    assert hub.bytes_sent("/cdn-lfs/") == len(fineweb_parquet) + 6 * 50_000  # nothing fetched twice but the cut bytes


def test_max_rows_reads_the_footer_and_first_row_groups_only(hub, tmp_path, fineweb_parquet):
    source = pq.ParquetFile(pa.BufferReader(fineweb_parquet))
    first_group = source.metadata.row_group(0).num_rows
    [entry] = download_sources([URL], tmp_path / "dest", max_rows=first_group + 1)
    assert (entry["rows"], entry["row_groups"]) == (source.metadata.row_group(1).num_rows + first_group, 2)
    assert pq.read_table(tmp_path / "dest" / entry["file"]).equals(source.read_row_groups([0, 1]))
    assert all(r.range for r in cdn_gets(hub))
    assert hub.bytes_sent("/cdn-lfs/") < len(fineweb_parquet) / 2


def test_glob_lists_the_dump_folder_and_sees_new_files(hub, fineweb_parquet):
    pattern = f"hf://datasets/{FINEWEB_REPO}/{FINEWEB_FOLDER}/*.parquet"
    expected = [f"hf://datasets/{FINEWEB_REPO}/{FINEWEB_FOLDER}/{name}" for name in FINEWEB_FILES]
    assert expand_sources([pattern]) == expected
    added = f"{FINEWEB_FOLDER}/000_00002.parquet"
    hub.add_file("datasets", FINEWEB_REPO, added, fineweb_parquet)
    try:
        assert expand_sources([pattern]) == [*expected, f"hf://datasets/{FINEWEB_REPO}/{added}"]
    finally:
        del hub.repo("datasets", FINEWEB_REPO).files[added]
    with pytest.raises(SourceError, match="no file matches"):
        expand_sources([f"hf://datasets/{FINEWEB_REPO}/{FINEWEB_FOLDER}/*.jsonl"])


@pytest.mark.parametrize("url", [f"hf://datasets/{FINEWEB_REPO}/{FINEWEB_FOLDER}/999_99999.parquet",
                                 f"hf://datasets/HuggingFaceFW/no-such-dataset/{FILE}"])
def test_missing_file_or_dataset_is_a_one_line_error(hub, url):
    with pytest.raises(SourceError) as error:
        source_fingerprint(url)
    assert str(error.value) == f"source not found: {url} — check data.source"


def test_gated_dataset_without_a_token_names_hf_token(hub, gated, tmp_path):
    url = f"hf://datasets/{GATED}/{FILE}"
    with pytest.raises(DownloadError) as error:
        download_sources([url], tmp_path / "dest")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{url}: the Hugging Face Hub refused access (HTTP 401)")
    assert "set HF_TOKEN to a token that can read it" in message
    assert list((tmp_path / "dest").glob("*.parquet")) == []
    closed = f"hf://datasets/{CLOSED}/{FILE}"
    with pytest.raises(SourceError, match=r"refused access \(HTTP 401\).*set HF_TOKEN"):
        source_fingerprint(closed)  # a Hub that hides even the listing: refused, not "not found"


def test_gated_dataset_with_a_wrong_token_is_refused_and_the_right_one_reads(hub, gated, tmp_path, fineweb_parquet, monkeypatch):
    url = f"hf://datasets/{GATED}/{FILE}"
    wrong = "hf_" + "SomebodyElse0" * 3
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(DownloadError) as error:
        download_sources([url], tmp_path / "dest")
    assert "(HTTP 403)" in str(error.value) and "the token in HF_TOKEN has no access" in str(error.value)
    assert wrong not in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    HfFileSystem.clear_instance_cache()
    [entry] = download_sources([url], tmp_path / "dest")
    assert (tmp_path / "dest" / entry["file"]).read_bytes() == fineweb_parquet
    assert not any(r.auth for r in hub.log if r.server == "cdn")  # the token goes to the Hub, never to the CDN


def test_the_hubs_resolve_url_gives_the_same_file_over_https(hub, gated, tmp_path, fineweb_parquet, monkeypatch):
    url = hub.url("datasets", FINEWEB_REPO, FILE)  # what https://huggingface.co/datasets/.../resolve/main/... is here
    fingerprint = source_fingerprint(url)
    assert fingerprint["size"] == len(fineweb_parquet)
    assert fingerprint["sha256"] == hashlib.sha256(fineweb_parquet).hexdigest()  # the redirect's X-Linked-Etag
    [entry] = download_sources([url], tmp_path / "dest")
    assert (tmp_path / "dest" / entry["file"]).read_bytes() == fineweb_parquet

    gated_url = hub.url("datasets", GATED, FILE)
    with pytest.raises(SourceError, match=r"refused access \(HTTP 401\).*set HF_TOKEN"):
        source_fingerprint(gated_url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.clear_log()
    [entry] = download_sources([gated_url], tmp_path / "gated")
    assert (tmp_path / "gated" / entry["file"]).read_bytes() == fineweb_parquet
    assert all(r.auth for r in hub.log if r.server == "hub") and not any(r.auth for r in hub.log if r.server == "cdn")
