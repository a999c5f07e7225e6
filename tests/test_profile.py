"""DuckDB profile: exact counts on a parquet with known duplicates, empties and nulls; the real
FineWeb sample; fsspec (memory://) files; the markdown and SVG reports."""

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage.profile import ProfileError, document_table, histogram_svg, profile_documents, profile_markdown, profile_parquet

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fineweb-sample"
SAMPLE = SHARED / "fineweb_sample_2800.parquet"
FULL_SCHEMA_ROWS = SHARED / "documented_rows_full_schema.jsonl"

LONG = "A long enough document about tokenizers. " * 10  # 410 characters
ROWS = [
    # text, url, language, language_score, token_count, dump, date
    (LONG, "<https://www.Example.org/a>", "en", 0.99, 80, "CC-MAIN-2024-10", "2024-02-20T10:00:00Z"),
    (LONG, "https://example.org/b?x=1", "en", 0.95, 80, "CC-MAIN-2024-10", "2024-03-01T00:00:00Z"),  # duplicate text
    (LONG, "http://user@example.org:8080/c", "en", 0.90, 80, "CC-MAIN-2024-18", "2024-04-11T00:00:00Z"),  # duplicate text
    ("short one", "https://other.net/", "fr", 0.70, 2, "CC-MAIN-2024-18", None),
    ("", "https://other.net/empty", "en", 0.65, 0, "CC-MAIN-2024-18", "2024-04-12T00:00:00Z"),
    ("", None, "en", 0.80, 0, "CC-MAIN-2024-18", "2024-04-13T00:00:00Z"),  # empty again: not a "duplicate"
    (None, "https://third.io/x", None, None, None, "CC-MAIN-2024-18", "2023-12-31T23:59:59Z"),
    (LONG + "é", "https://third.io/y", "en", 0.85, 81, "CC-MAIN-2024-18", "2024-04-14T00:00:00Z"),
]
COLUMNS = ["text", "url", "language", "language_score", "token_count", "dump", "date"]


def _known_parquet(path: Path, row_group_size: int = 3) -> Path:
    table = pa.table({name: [row[i] for row in ROWS] for i, name in enumerate(COLUMNS)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_exact_counts_on_a_parquet_with_known_content(tmp_path):
    path = _known_parquet(tmp_path / "known.parquet")
    profile = profile_parquet([path], short_doc_chars=200, top_domains=2)

    assert profile["rows"] == 8 and profile["bytes"] == path.stat().st_size == profile["file_bytes"][str(path)]
    text = profile["text"]
    assert (text["null"], text["empty"], text["short"]) == (1, 2, 1)
    assert text["chars_total"] == 3 * 410 + 9 + 411 and text["utf8_bytes_total"] == text["chars_total"] + 1  # é is 2 bytes
    assert text["chars"]["max"] == 411 and text["chars"]["p50"] == 410
    assert profile["duplicates"] == {"documents": 2, "share": 2 / 8}
    assert profile["null_counts"] == {"text": 1, "url": 1, "language": 1, "language_score": 1, "token_count": 1, "dump": 0, "date": 1}
    assert profile["language"] == {"en": 6, "fr": 1}
    assert profile["language_score"]["min"] == 0.65 and profile["language_score"]["max"] == 0.99
    assert profile["token_count"]["sum"] == 3 * 80 + 2 + 81 and profile["token_count"]["max"] == 81
    assert profile["dumps"] == {"CC-MAIN-2024-18": 6, "CC-MAIN-2024-10": 2}
    assert profile["date"] == {"min": "2023-12-31T23:59:59Z", "max": "2024-04-14T00:00:00Z"}
    assert profile["top_domains"] == [{"domain": "example.org", "documents": 2}, {"domain": "other.net", "documents": 2}]
    hist = profile["histograms"]["text_chars"]
    assert sum(hist["counts"]) == 7  # every non-null text, the two empty ones in [0, 1)
    assert hist["counts"][0] == 2 and hist["counts"][hist["edges"].index(256)] == 4
    assert sum(profile["histograms"]["token_count"]["counts"]) == 7


def test_several_files_are_profiled_together(tmp_path):
    files = [_known_parquet(tmp_path / "a.parquet"), _known_parquet(tmp_path / "b.parquet")]
    profile = profile_parquet(files)
    assert profile["rows"] == 16 and profile["files"] == 2
    assert profile["duplicates"]["documents"] == 2 + 5  # the 5 non-empty texts of b all repeat texts of a


def test_document_tables_of_files_with_different_columns_merge_into_the_whole(tmp_path):
    """Per-file document tables (one task each in the pipeline) merged: duplicates across files
    counted, a column missing from one file counted as null in all its rows."""
    known = _known_parquet(tmp_path / "known.parquet")
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"text": [LONG, "fresh text", None]}), bare)  # LONG repeats across files; no url, no language
    tables = [tmp_path / "known.docs.parquet", tmp_path / "bare.docs.parquet"]
    assert [document_table(file, table) for file, table in zip([known, bare], tables)] == [8, 3]
    assert sum(table.stat().st_size for table in tables) < known.stat().st_size + bare.stat().st_size  # no text in them

    merged = profile_documents(tables, [known, bare], top_domains=2)
    assert merged["rows"] == 11 and merged["files"] == 2 and merged["bytes"] == known.stat().st_size + bare.stat().st_size
    assert merged["duplicates"]["documents"] == 2 + 1  # the third LONG of known, and bare's LONG
    assert merged["null_counts"] == {"text": 2, "url": 1 + 3, "language": 1 + 3, "language_score": 1 + 3,
                                     "token_count": 1 + 3, "dump": 0 + 3, "date": 1 + 3}
    assert merged["text"]["null"] == 2 and merged["language"] == {"en": 6, "fr": 1}
    assert [(Path(f["file"]).name, f["rows"], f["duplicates"], f["short"]) for f in merged["per_file"]] == [
        ("known.parquet", 8, 2, 1), ("bare.parquet", 3, 0, 1)]  # within each file
    assert "## Files" in profile_markdown(merged)
    assert {**merged, "seconds": 0, "file_bytes": 0} == {**profile_parquet([known, bare], top_domains=2), "seconds": 0, "file_bytes": 0}


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared FineWeb sample not present")
def test_real_fineweb_sample():
    profile = profile_parquet([SAMPLE], top_domains=5)
    texts = pq.read_table(SAMPLE, columns=["text"])["text"]
    assert profile["rows"] == 2800
    assert profile["text"]["chars_total"] == pc.sum(pc.utf8_length(texts)).as_py()
    assert profile["text"]["utf8_bytes_total"] == pc.sum(pc.binary_length(texts)).as_py()
    assert profile["text"]["chars"]["max"] == pc.max(pc.utf8_length(texts)).as_py()
    assert profile["duplicates"]["documents"] == 2800 - len(set(texts.to_pylist()))
    assert profile["top_domains"][0] == {"domain": "openjurist.org", "documents": 32}
    assert "token_count" not in profile and "language" not in profile  # columns the sample does not have


@pytest.mark.skipif(not FULL_SCHEMA_ROWS.exists(), reason="../shared FineWeb rows not present")
def test_full_fineweb_schema_rows(tmp_path):
    rows = [json.loads(line) for line in FULL_SCHEMA_ROWS.read_text().splitlines() if line.strip()]
    path = tmp_path / "full.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    profile = profile_parquet([path])
    assert profile["token_count"]["sum"] == sum(r["token_count"] for r in rows)
    assert profile["language"] == {"en": 2} and set(profile["dumps"]) == {r["dump"] for r in rows}
    assert profile["top_domains"][0]["domain"] == "allrecipes.co.uk"  # angle brackets stripped


def test_fsspec_memory_files_go_through_duckdb(tmp_path):
    local = _known_parquet(tmp_path / "known.parquet")
    fsspec.filesystem("memory").pipe("/profile/known.parquet", local.read_bytes())
    profile = profile_parquet(["memory://profile/known.parquet"])
    assert profile["rows"] == 8 and profile["duplicates"]["documents"] == 2
    assert profile["bytes"] == local.stat().st_size


def test_missing_text_column_and_non_parquet_are_one_line_errors(tmp_path):
    path = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(ProfileError, match=r"column 'text' is missing .*columns: body.*--set data.text_column="):
        profile_parquet([path])
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ProfileError, match="junk.parquet"):
        profile_parquet([junk])


def test_markdown_and_svg_reports(tmp_path):
    profile = profile_parquet([_known_parquet(tmp_path / "known.parquet")])
    report = profile_markdown(profile)
    assert report.startswith("# Data profile")
    assert "| exact duplicate texts | 2 (25.00%) |" in report and "## Top domains" in report and "## Dumps" in report
    svg = histogram_svg(profile["histograms"]["text_chars"], "Document length <chars>")
    root = ET.fromstring(svg)  # well-formed, self-contained XML
    assert root.tag.endswith("svg")
    bars = [el for el in root.iter() if el.tag.endswith("rect") and el.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(bars) == len(profile["histograms"]["text_chars"]["counts"])
    assert "Document length &lt;chars&gt;" in svg
    assert re.search(r"<title>256–512: 4</title>", svg)
    assert "no data" in histogram_svg({"edges": [], "counts": []}, "empty")


def _bulky_parquet(path: Path, documents: int = 6_000, chars: int = 8_000) -> Path:
    """~48 MB of distinct texts in row groups of 500 documents."""
    words = [f"word{i}" for i in range(2_000)]
    texts = [" ".join(words[(d * 7 + k) % len(words)] for k in range(chars // 8)) + f" doc {d}" for d in range(documents)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=500, compression="zstd")
    return path


def test_text_several_times_the_memory_limit_streams_through_duckdb(tmp_path):
    """Four files of ~48 MB text each (~190 MB) under a 48 MB cap give the uncapped report; a
    cap too small to hold one row group is a one-line error that names the setting to raise."""
    one = _bulky_parquet(tmp_path / "bulky0.parquet")
    files = [one] + [Path(shutil.copyfile(one, tmp_path / f"bulky{i}.parquet")) for i in (1, 2, 3)]
    uncapped = profile_parquet(files)
    capped = profile_parquet(files, memory_limit="48MB", spill_directory=tmp_path / "spill")
    assert capped["text"]["utf8_bytes_total"] > 3.5 * 48 * 2**20
    assert {**capped, "seconds": 0} == {**uncapped, "seconds": 0}
    assert capped["duplicates"]["documents"] == 3 * 6_000
    with pytest.raises(ProfileError, match=r"out of memory profiling \S*bulky0\.parquet \(.*--set profile\.memory_limit=") as error:
        profile_parquet(files, memory_limit="4MB")
    assert "\n" not in str(error.value)


def test_memory_limit_is_checked_by_the_config_and_by_duckdb():
    from configs import load_config
    from configs.schema import ConfigError

    assert load_config("demo", ["profile.memory_limit=2GB"]).profile.memory_limit == "2GB"
    with pytest.raises(ConfigError, match="memory_limit"):
        load_config("demo", ["profile.memory_limit=lots"])
    with pytest.raises(ProfileError, match=r"'memory_limit': '7 parsecs'.*profile\.memory_limit to a size such as '4GB'"):
        profile_parquet([Path("unused.parquet")], memory_limit="7 parsecs")
