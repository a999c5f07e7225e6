"""Profile parquet documents with DuckDB, one file at a time, then all of them together.

Two steps, so a dump of hundreds of files is profiled one cached task per file and merged:

- `document_table` reads one parquet file once and writes its *document table*: one small
  row per document (lengths, a hash of the text, the URL's domain, FineWeb's metadata
  columns, a null flag per source column), a few percent of the text's size.
- `profile_documents` computes every statistic from the document tables of all files:
  sizes and length quantiles, empty, short and exactly duplicated documents (across files
  too: the text hashes are compared over all tables), nulls per column, and — when the
  columns exist — languages, language scores, FineWeb's GPT-2 token counts, dumps, dates
  and the top URL domains. The result is exact, whatever the number of files.

`profile_parquet` does both in one call. `profile_markdown` and `histogram_svg` turn the
result into something a person reads in the Prefect UI.
"""

from __future__ import annotations

import html
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from configs.errors import UserError
from storage.fs import filesystem, local_path, protocol_of
from storage.markdown import human_bytes, markdown_table

FILES_SHOWN = 100  # rows of the per-file table in the markdown report
NULL_FLAG = "null:"  # a document table's column `null:<c>` says whether source column c was null


class ProfileError(UserError):
    """Parquet files that cannot be profiled; the message is one line."""


def profile_parquet(
    files: list[str | Path],
    text_column: str = "text",
    short_doc_chars: int = 200,
    top_domains: int = 20,
    memory_limit: str | None = None,
    spill_directory: str | Path | None = None,
) -> dict[str, Any]:
    """Statistics of the documents in the parquet files (see the module docstring).

    DuckDB streams the files, so their size may exceed RAM; memory_limit (e.g. "4GB") caps
    DuckDB's memory (default: DuckDB's own, 80% of RAM) and spill_directory is where it may
    spill beyond it."""
    if not files:
        raise ProfileError("no parquet files to profile; check data.source")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="document-tables-") as folder:
        tables = [Path(folder) / f"{index}.parquet" for index in range(len(files))]
        for file, table in zip(files, tables):
            document_table(file, table, text_column, memory_limit, spill_directory)
        report = profile_documents(tables, files, text_column, short_doc_chars, top_domains, memory_limit, spill_directory)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def document_table(file: str | Path, out: str | Path, text_column: str = "text", memory_limit: str | None = None,
                   spill_directory: str | Path | None = None) -> int:
    """Read one parquet file once and write its document table to `out` (parquet); returns the
    number of documents. A file without the text column, or not parquet, is a ProfileError."""
    url = str(file)
    with _duckdb(memory_limit, spill_directory, [url], what=url) as con:
        path = url if protocol_of(url) != "file" else local_path(url)
        source = "read_parquet($file, utf8_validation = 'replace')"
        try:
            columns = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {source})", {"file": path}).fetchall())
        except duckdb.Error as exc:
            raise ProfileError(f"cannot read {url} as parquet ({str(exc).splitlines()[0]}); re-run the download stage") from None
        if columns.get(text_column) != "VARCHAR":
            found = f"is {columns[text_column]}, not text" if text_column in columns else "is missing"
            raise ProfileError(
                f"column {text_column!r} {found} in {url} (columns: {', '.join(columns)}); "
                "name the text column with --set data.text_column=..."
            )
        select = f"SELECT {', '.join(_per_document(columns, text_column))} FROM {source}"
        copy = f"COPY ({select}) TO $out (FORMAT parquet, COMPRESSION zstd)"
        return _run(con, copy, {"file": path, "out": str(out)}, url, memory_limit).fetchone()[0]  # COPY returns the rows written


def profile_documents(
    tables: list[str | Path],
    files: list[str | Path],
    text_column: str = "text",
    short_doc_chars: int = 200,
    top_domains: int = 20,
    memory_limit: str | None = None,
    spill_directory: str | Path | None = None,
) -> dict[str, Any]:
    """The statistics of `files` from their document tables (written by `document_table`)."""
    if not tables:
        raise ProfileError("no parquet files to profile; check data.source")
    urls = [str(file) for file in files]
    started = time.perf_counter()
    with _duckdb(memory_limit, spill_directory, [], what=_name_files(urls)) as con:
        tables = [str(table) for table in tables]
        source = "read_parquet($tables, union_by_name = true, filename = true)"
        types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {source})", {"tables": tables}).fetchall())
        columns = {name[len(NULL_FLAG):]: types.get(name[len(NULL_FLAG):], "") for name in types if name.startswith(NULL_FLAG)}
        sections = _sections(columns, short_doc_chars, top_domains)
        row = _run(con, _profile_sql(source, types, sections), {"tables": tables}, _name_files(urls), memory_limit).fetchone()
    results = dict(zip([name for name, _ in sections], row))
    file_of_table = {Path(table).as_posix(): url for table, url in zip(tables, urls)}
    per_file = [{"file": file_of_table[Path(entry.pop("table")).as_posix()], **entry} for entry in results["per_file"] or []]
    results["per_file"] = sorted(per_file, key=lambda entry: urls.index(entry["file"]))
    return _assemble(results, urls, text_column, short_doc_chars, time.perf_counter() - started)


@contextmanager
def _duckdb(memory_limit: str | None, spill_directory: str | Path | None, urls: list[str], what: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection with the memory cap and spill folder, reading `urls` through fsspec where they are not local."""
    settings = {"memory_limit": memory_limit, "temp_directory": str(spill_directory) if spill_directory else None}
    try:
        con = duckdb.connect(config={key: value for key, value in settings.items() if value is not None})
    except duckdb.Error as exc:
        raise ProfileError(
            f"DuckDB rejected its settings {settings} ({str(exc).splitlines()[0]}); set profile.memory_limit to a size such as '4GB'"
        ) from None
    with con:
        for url in urls:
            if protocol_of(url) != "file":  # DuckDB reads other URLs through fsspec
                con.register_filesystem(filesystem(url)[0])
        yield con


def _run(con: duckdb.DuckDBPyConnection, sql: str, parameters: dict[str, Any], what: str, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
    """Execute, turning DuckDB's errors into one-line ProfileErrors that name the files and the fix."""
    try:
        return con.execute(sql, parameters)
    except duckdb.OutOfMemoryException as exc:
        raise ProfileError(
            f"DuckDB ran out of memory profiling {what} ({str(exc).splitlines()[0]}); "
            f"raise --set profile.memory_limit=... (now {memory_limit or 'DuckDB default'})"
        ) from None
    except duckdb.Error as exc:
        raise ProfileError(f"DuckDB could not profile {what}: {str(exc).splitlines()[0]}") from None


def _name_files(urls: list[str]) -> str:
    """The files for an error message: all of a few, the first three of many (a dump has hundreds)."""
    if len(urls) <= 3:
        return ", ".join(urls)
    return f"{', '.join(urls[:3])} and {len(urls) - 3} more"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _bucket(expr: str) -> str:
    """Power-of-two bucket: 0 for 0, k+1 for values in [2^k, 2^(k+1))."""
    return f"CASE WHEN {expr} <= 0 THEN 0 ELSE CAST(floor(log2({expr})) AS INTEGER) + 1 END"


def _per_document(columns: dict[str, str], text_column: str) -> list[str]:
    """The document table's columns, as SQL over one source file with `columns`."""
    text = _quote(text_column)
    per_document = [
        f"length({text}) AS chars",
        f"strlen({text}) AS utf8_bytes",
        f"CASE WHEN {text} <> '' THEN hash({text}) END AS text_hash",  # 64-bit: collisions negligible
        *(f"{_quote(c)} IS NULL AS {_quote(NULL_FLAG + c)}" for c in columns),
    ]
    if "url" in columns:  # FineWeb sometimes writes <http://…>; the domain is the host, lowercased
        per_document.append(
            "lower(regexp_extract(trim(url, '<> '), '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/@]*@)?([^/:?#]+)', 1)) AS domain"
        )
    per_document += [c for c in ("language", "language_score", "token_count", "dump", "date") if c in columns]
    return per_document


def _sections(columns: dict[str, str], short_doc_chars: int, top_domains: int) -> list[tuple[str, str]]:
    """(name, SQL subquery over `docs`) for each statistic that the columns present allow."""
    q = "quantile_disc"
    nulls = ", ".join(f"{_quote(c)}: count(*) FILTER (WHERE {_quote(NULL_FLAG + c)})" for c in columns)
    sections = [
        ("totals", f"""SELECT {{
            'rows': count(*),
            'null': count(*) FILTER (WHERE chars IS NULL),
            'empty': count(*) FILTER (WHERE chars = 0),
            'short': count(*) FILTER (WHERE chars > 0 AND chars < {short_doc_chars}),
            'chars_total': coalesce(sum(chars), 0),
            'utf8_bytes_total': coalesce(sum(utf8_bytes), 0),
            'chars_quantiles': {q}(chars, [0.01, 0.5, 0.99]),
            'chars_max': max(chars),
            'chars_mean': avg(chars),
            'duplicates': count(text_hash) - count(DISTINCT text_hash),
            'chars_histogram': histogram({_bucket('chars')}) FILTER (WHERE chars IS NOT NULL)
        }} FROM docs"""),
        ("null_counts", f"SELECT {{{nulls}}} FROM docs"),
        ("per_file", f"""SELECT list({{'table': filename, 'rows': rows, 'empty': empty, 'short': short,
                                          'chars_total': chars_total, 'duplicates': duplicates}} ORDER BY filename) FROM (
            SELECT filename, count(*) AS rows, count(*) FILTER (WHERE chars = 0) AS empty,
                   count(*) FILTER (WHERE chars > 0 AND chars < {short_doc_chars}) AS short,
                   coalesce(sum(chars), 0) AS chars_total, count(text_hash) - count(DISTINCT text_hash) AS duplicates
            FROM docs GROUP BY filename)"""),  # duplicates within each file; the totals count them across files too
    ]
    if "language" in columns:
        sections.append(("language", "SELECT histogram(language) FROM docs"))
    if columns.get("language_score") in ("DOUBLE", "FLOAT"):
        sections.append(("language_score", f"SELECT {{'quantiles': {q}(language_score, [0.01, 0.5, 0.99]), 'min': min(language_score), 'max': max(language_score)}} FROM docs"))
    if "INT" in columns.get("token_count", ""):
        sections.append(("token_count", f"""SELECT {{
            'sum': sum(token_count), 'quantiles': {q}(token_count, [0.01, 0.5, 0.99]), 'max': max(token_count),
            'histogram': histogram({_bucket('token_count')}) FILTER (WHERE token_count IS NOT NULL)
        }} FROM docs"""))
    if "dump" in columns:
        sections.append(("dumps", "SELECT histogram(dump) FROM docs"))
    if "date" in columns:
        sections.append(("date", "SELECT {'min': CAST(min(date) AS VARCHAR), 'max': CAST(max(date) AS VARCHAR)} FROM docs"))
    if "url" in columns:
        sections.append(("top_domains", f"""SELECT list({{'domain': domain, 'documents': n}} ORDER BY n DESC, domain) FROM (
            SELECT domain, count(*) AS n FROM docs WHERE domain <> '' GROUP BY domain ORDER BY n DESC, domain LIMIT {top_domains})"""))
    return sections


def _profile_sql(source: str, types: dict[str, str], sections: list[tuple[str, str]]) -> str:
    """`WITH docs AS MATERIALIZED (the document tables) SELECT (section 1), (section 2), …`: the
    tables are read once, and each section aggregates their rows. A source column missing from
    some files (`types`: the tables' columns) was null in every row of those."""
    columns = [f"coalesce({_quote(name)}, true) AS {_quote(name)}" if name.startswith(NULL_FLAG) else _quote(name)
               for name in types]  # `filename` among them: the table a row came from
    subqueries = ",\n".join(f"({sql}) AS {name}" for name, sql in sections)
    return f"WITH docs AS MATERIALIZED (SELECT {', '.join(columns)} FROM {source})\nSELECT {subqueries}"


def _quantiles(values: list[Any] | None) -> dict[str, Any]:
    return dict(zip(("p1", "p50", "p99"), values or (None, None, None)))


def log2_histogram(buckets: dict[int, int] | None) -> dict[str, list[int]]:
    """Counts per power-of-two bucket → {"edges": [0, 1, 2, 4, …], "counts": [...]} (bin i is [edges[i], edges[i+1]))."""
    if not buckets:
        return {"edges": [], "counts": []}
    top = max(buckets)
    edges = [0] + [2**k for k in range(top + 1)]
    return {"edges": edges, "counts": [int(buckets.get(i, 0)) for i in range(top + 1)]}


def _assemble(sections: dict[str, Any], urls: list[str], text_column: str, short_doc_chars: int, seconds: float) -> dict[str, Any]:
    totals = sections["totals"]
    rows = totals["rows"]
    file_bytes = {url: _size(url) for url in urls}
    profile: dict[str, Any] = {
        "files": len(urls),
        "rows": rows,
        "bytes": sum(file_bytes.values()),  # on disk (compressed parquet)
        "file_bytes": file_bytes,
        "text_column": text_column,
        "text": {
            "null": totals["null"],
            "empty": totals["empty"],
            "short": totals["short"],
            "short_doc_chars": short_doc_chars,
            "chars_total": int(totals["chars_total"]),
            "utf8_bytes_total": int(totals["utf8_bytes_total"]),
            "chars": {
                **_quantiles(totals["chars_quantiles"]),
                "max": totals["chars_max"],
                "mean": round(totals["chars_mean"], 1) if totals["chars_mean"] is not None else None,
            },
        },
        "duplicates": {"documents": totals["duplicates"], "share": totals["duplicates"] / rows if rows else 0.0},
        "null_counts": sections["null_counts"],
        "per_file": [{**entry, "bytes": file_bytes[entry["file"]]} for entry in sections["per_file"]],
        "histograms": {"text_chars": log2_histogram(totals["chars_histogram"])},
    }
    if "language" in sections:
        profile["language"] = _by_count(sections["language"])
    if "language_score" in sections:
        score = sections["language_score"]
        profile["language_score"] = {**_quantiles(score["quantiles"]), "min": score["min"], "max": score["max"]}
    if "token_count" in sections:
        tokens = sections["token_count"]
        profile["token_count"] = {"sum": int(tokens["sum"] or 0), **_quantiles(tokens["quantiles"]), "max": tokens["max"]}
        profile["histograms"]["token_count"] = log2_histogram(tokens["histogram"])
    if "dumps" in sections:
        profile["dumps"] = _by_count(sections["dumps"])
    if "date" in sections:
        profile["date"] = sections["date"]
    if "top_domains" in sections:
        profile["top_domains"] = sections["top_domains"] or []
    profile["seconds"] = round(seconds, 3)
    return profile


def _by_count(counts: dict[Any, int] | None) -> dict[str, int]:
    """A value → count map, most frequent first (nulls are counted in null_counts, not here)."""
    ordered = sorted((counts or {}).items(), key=lambda item: (-item[1], str(item[0])))
    return {str(value): count for value, count in ordered if value is not None}


def _size(url: str) -> int:
    if protocol_of(url) == "file":
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url)
    return int(fs.size(path) or 0)


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def _human(value: float) -> str:
    """1234567 → 1.2M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:g}"


def profile_markdown(profile: dict[str, Any]) -> str:
    """A readable markdown report of a profile_parquet result."""
    rows = profile["rows"]
    text = profile["text"]
    chars = text["chars"]

    def share(count: int) -> str:
        return f"{count:,} ({count / rows:.2%})" if rows else "0"

    overview = [  # (label, value)
        ("files", profile["files"]),
        ("documents", f"{rows:,}"),
        ("bytes on disk", human_bytes(profile["bytes"])),
        ("text (UTF-8)", human_bytes(text["utf8_bytes_total"])),
        ("characters p1 / p50 / p99 / max", f"{chars['p1']} / {chars['p50']} / {chars['p99']} / {chars['max']}"),
        ("null texts", share(text["null"])),
        ("empty texts", share(text["empty"])),
        (f"short texts (< {text['short_doc_chars']} chars)", share(text["short"])),
        ("exact duplicate texts", share(profile["duplicates"]["documents"])),
    ]
    if "token_count" in profile:
        tokens = profile["token_count"]
        overview.append(("GPT-2 tokens (FineWeb token_count)", f"{tokens['sum']:,} (p50 {tokens['p50']}, max {tokens['max']})"))
    if "language_score" in profile:
        score = profile["language_score"]
        overview.append(("language score p1 / p50 / p99", f"{score['p1']:.3f} / {score['p50']:.3f} / {score['p99']:.3f}"))
    if "date" in profile:
        overview.append(("crawl dates", f"{profile['date']['min']} … {profile['date']['max']}"))

    parts = ["# Data profile", markdown_table([{"": label, "value": value} for label, value in overview])]
    nulls = [{"column": column, "nulls": share(count)} for column, count in profile["null_counts"].items() if count]
    if nulls:
        parts += ["## Null values", markdown_table(nulls)]
    if len(profile.get("per_file", [])) > 1:
        shown = profile["per_file"][:FILES_SHOWN]
        files = [{"file": Path(entry["file"]).name, "documents": f"{entry['rows']:,}", "bytes on disk": human_bytes(entry["bytes"]),
                  "short": f"{entry['short']:,}", "duplicates within the file": f"{entry['duplicates']:,}"} for entry in shown]
        more = len(profile["per_file"]) - len(shown)
        parts += ["## Files", markdown_table(files) + (f"\n\n_and {more} more files (profile.json has them all)._" if more else "")]
    for key, title in (("language", "Languages"), ("dumps", "Dumps")):
        if profile.get(key):
            counts = list(profile[key].items())[:20]
            parts += [f"## {title}", markdown_table([{key.rstrip("s"): value, "documents": f"{c:,}"} for value, c in counts])]
    if profile.get("top_domains"):
        parts += ["## Top domains", markdown_table([{"domain": d["domain"], "documents": f"{d['documents']:,}"} for d in profile["top_domains"]])]
    for key, title in (("text_chars", "Document length (characters; bins are [low, high))"), ("token_count", "Document length (GPT-2 tokens)")):
        hist = profile["histograms"].get(key)
        if hist and hist["counts"]:
            bins = [{"range": _bin_label(hist["edges"], i), "documents": f"{c:,}"} for i, c in enumerate(hist["counts"]) if c]
            parts += [f"## {title}", markdown_table(bins)]
    parts.append(f"_{profile['files']} file(s) profiled by DuckDB in {profile['seconds']} s._")
    return "\n\n".join(parts) + "\n"


def _bin_label(edges: list[int], i: int) -> str:
    """`1K–2K` for bin i, whose range is [edges[i], edges[i+1]) (K = 1024, as the edges are powers of two)."""
    low = edges[i]
    if i + 1 >= len(edges):
        return f"≥{_pow2(low)}"
    high = edges[i + 1]
    return str(low) if high - low == 1 else f"{_pow2(low)}–{_pow2(high)}"


def _pow2(value: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift}{unit}"
    return str(value)


def histogram_svg(hist: dict[str, list[int]], title: str) -> str:
    """A self-contained SVG bar chart of a {"edges", "counts"} histogram (hover a bar for its count)."""
    counts = hist.get("counts") or []
    edges = hist.get("edges") or []
    width, height, left, right, top, bottom = 640, 320, 56, 16, 36, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts, default=0) or 1
    bar_w = plot_w / max(len(counts), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{_human(peak)}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    if not counts:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
    for i, count in enumerate(counts):
        bar_h = plot_h * count / peak
        x = left + i * bar_w
        label = _bin_label(edges, i) if edges else str(i)
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{max(bar_w - 2, 1):.1f}" height="{bar_h:.1f}" '
            f'fill="#4a7bd0"><title>{html.escape(label)}: {count:,}</title></rect>'
        )
        parts.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 14}" text-anchor="end" '
            f'transform="rotate(-45 {x + bar_w / 2:.1f} {top + plot_h + 14})">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
