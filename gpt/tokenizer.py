"""The tokenize stage: parquet text → llm.c token shards of GPT-2 ids.

`tokenize_parquet` streams parquet record batches, encodes them with the encoders of
gpt/tokenize_worker.py (threads of this process, or helper processes) running the engine that
gpt/tokenize_engine.py chose and checked, puts `<|endoftext|>` before every document, sends
each whole document to train or val by a seeded hash of its (file, row) position, and fills
llm.c shards of at most `shard_tokens` tokens with storage.shards.ShardWriter.

tiktoken referees a faster engine: a seeded sample of documents (`verify_fraction`) is
re-encoded with it and any difference fails the stage, naming the document; a document whose
count differs from FineWeb's `token_count` is re-encoded with it and counted. The shards are
byte-identical whatever the engine or the number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs.errors import TransientError, UserError
from gpt.encoding import EOT
from gpt.tokenize_engine import (Engine, SelfCheckFailure, choose_again, engine_spec, planned_engine, referee, referee_ids,
                                 referee_label, select_engine)
from gpt.tokenize_worker import Encoded, EncoderFailed, EncoderPool
from storage.shards import ShardWriter

if TYPE_CHECKING:  # only the type: the tokenizer reads the config's fields and imports no config code
    from configs.schema import TokenizeConfig

TOKEN_COUNT_COLUMN = "token_count"  # FineWeb's GPT-2 count per document (no EOT)
DOC_TOKENS_FILE = "doc_tokens.npy"  # tokens per document (uint32), in the order they were read
# A helper process is started only when there is more text to encode than it could encode in the
# time its engine takes to start (fastokens: ~0.4 s at ~90 MB/s; tiktoken: ~0.15 s at ~11 MB/s);
# the native engine's encoders are threads, which start at once: one per few batches of text.
TEXT_BYTES_PER_HELPER = {"native": 4_000_000, "fastokens": 32_000_000, "tiktoken": 2_000_000}
BATCH_ROWS = 256  # documents per job (~0.4 M tokens of FineWeb, ~0.02 s with fastokens, ~0.15 s with tiktoken): big enough to amortise a pipe round trip, small enough to balance the last jobs
READ_AHEAD_JOBS = 16  # jobs read while the engine starts (~27 MB of FineWeb text)
REFEREE_QUEUE = 64  # jobs' sampled documents waiting for tiktoken (1% of ~1.7 MB each): bounds memory if it falls behind


class TokenizeError(UserError):
    """Input the tokenizer or the tokenize stage cannot use; the message is one line."""


class EngineMismatch(TokenizeError):
    """The engine's ids for a sampled document differ from tiktoken's; the message is one line."""


class TokenizerCrashed(TransientError):
    """A tokenizer helper process died (killed, out of memory); running again starts over."""


def _drawn(key: str, fraction: float) -> bool:
    """A seeded, reproducible draw with probability `fraction`."""
    draw = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return draw < fraction * 2**64


def is_val_document(seed: int, file_key: str | int, row_index: int, val_fraction: float) -> bool:
    """Whether a document is held out: a seeded hash of its position (its file's key and its
    row), so the split never depends on batching, worker count or which files were tokenized
    together, and a document is never cut in two."""
    return _drawn(f"{seed}/{file_key}/{row_index}", val_fraction)


def is_verified_document(seed: int, file_key: str | int, row_index: int, verify_fraction: float) -> bool:
    """Whether tiktoken re-encodes a document to check the engine: a seeded hash of its
    position, drawn independently of the split."""
    return _drawn(f"verify/{seed}/{file_key}/{row_index}", verify_fraction)


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
    """The documents of one job, EOT-prefixed and concatenated, with their split."""

    file_index: int
    rows: np.ndarray  # row index in the file of each document
    lengths: np.ndarray  # tokens per document, without EOT
    is_val: np.ndarray
    text_bytes: np.ndarray  # UTF-8 bytes per document (after repair)
    tokens: np.ndarray  # uint16: EOT, doc 0, EOT, doc 1, ...
    skipped_empty: int
    invalid_utf8: int
    token_count_mismatches: int  # documents whose count differs from FineWeb's (after any re-encoding)
    token_count_reencoded: int  # documents the engine counted differently from FineWeb, re-encoded with tiktoken


def _text(job: _Job, i: int) -> str:
    """The i-th text of a job, decoded as the encoders decode it (invalid UTF-8 replaced)."""
    return str(memoryview(job.data)[int(job.starts[i]) : int(job.ends[i])], "utf-8", "replace")


@dataclass
class _Sampled:
    """Documents of one job drawn for tiktoken to re-encode (tokenize.verify_fraction): their
    rows, texts and the engine's ids, copied out of the job so it can be freed."""

    file_index: int
    rows: list[int]
    texts: list[str]
    ids: list[np.ndarray]


def _sample(job: _Job, key: str, ids: np.ndarray, offsets: np.ndarray, config: TokenizeConfig) -> _Sampled | None:
    drawn = [i for i, row in enumerate(job.rows.tolist()) if is_verified_document(config.seed, key, row, config.verify_fraction)]
    if not drawn:
        return None
    return _Sampled(job.file_index, [int(job.rows[i]) for i in drawn], [_text(job, i) for i in drawn],
                    [ids[offsets[i] : offsets[i + 1]].copy() for i in drawn])


class _RefereeThread:
    """tiktoken's checks of a faster engine, on a thread of their own: the engine's self-check if
    it was left for later (the native engine's: it needs tiktoken, whose ~0.08 s start the
    encoders do not wait for), then the sampled documents as the encoders hand them over. The
    encoders wait for it only when REFEREE_QUEUE jobs' samples are waiting; the stage waits for
    it before it returns, so a failure fails the run and its shards are removed. (Measured: tiktoken in a helper process instead costs
    more than the GIL it frees, on two cores.)"""

    def __init__(self, engine: Engine, files: list[Path]) -> None:
        self.engine, self.files = engine, files
        self.pending: queue.Queue = queue.Queue(maxsize=REFEREE_QUEUE)  # full: the encoders wait for tiktoken
        self.stopped = threading.Event()
        self.verified = 0
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tokenize-referee", daemon=True)
        self.thread.start()

    def raise_failure(self) -> None:
        """The first check that failed, raised (the encoders call it for every batch: the run stops soon)."""
        if self.failure is not None:
            raise self.failure

    def submit(self, sampled: _Sampled) -> None:
        self.raise_failure()
        while not self.stopped.is_set():
            try:
                self.pending.put(sampled, timeout=0.1)
                return
            except queue.Full:
                self.raise_failure()

    def stop(self) -> None:
        """Stop after the document being checked (the stage failed)."""
        self.stopped.set()
        with contextlib.suppress(queue.Full):
            self.pending.put_nowait(None)  # wakes it if it waits for work

    def _run(self) -> None:
        try:
            self.engine.self_check()
            while not self.stopped.is_set() and (sampled := self.pending.get()) is not None:
                self._verify(sampled)
        except BaseException as error:  # handed to the stage, which fails
            self.failure = error
        finally:
            self.stopped.set()  # no encoder waits on a queue nobody drains

    def _verify(self, sampled: _Sampled) -> None:
        for row, ids, expected in zip(sampled.rows, sampled.ids, referee_ids(sampled.texts)):
            got = ids.tolist()
            if got != expected:
                at = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                raise EngineMismatch(
                    f"{self.engine.label} and the referee {referee_label()} differ on row {row} of {self.files[sampled.file_index]} "
                    f"(token {at}: {got[at:at + 1]} vs {expected[at:at + 1]}, {len(got)} vs {len(expected)} tokens); "
                    "set tokenize.engine=tiktoken"
                )
            self.verified += 1

    def close(self) -> int:
        """Wait for every check; the number of documents verified, or the first failure raised."""
        while self.thread.is_alive():
            try:
                self.pending.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
        if self.failure is not None:
            raise self.failure
        return self.verified


def _reencoded(job: _Job, ids: np.ndarray, lengths: np.ndarray, differing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths) with the `differing` documents re-encoded by tiktoken."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    documents = [ids[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
    for i in differing.tolist():
        documents[i] = np.asarray(referee().encode_ordinary(_text(job, i)), np.uint32)
    return np.concatenate(documents), np.array([len(document) for document in documents], np.int64)


def _eot_before_each(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint16: EOT, document 0's ids, EOT, document 1's ids, … (GPT-2's ids fit), written straight
    into the one array (no uint32 copy: less fresh memory, which a new process pays for in page faults)."""
    tokens = np.empty(len(ids) + len(lengths), np.uint16)
    at = start = 0
    for length in lengths.tolist():
        tokens[at] = EOT
        tokens[at + 1 : at + 1 + length] = ids[start : start + length]
        at, start = at + 1 + length, start + length
    if start != len(ids):  # np.empty: a slot left unwritten would reach a shard
        raise TokenizeError(f"an encoder answered {len(ids)} tokens but lengths adding up to {start}; set tokenize.engine=tiktoken")
    return tokens


def _finisher(config: TokenizeConfig, engine: Engine, checks: _RefereeThread | None,
              file_keys: list[str]) -> Callable[[_Job, Encoded], _Tokenized]:
    """What an encoder's thread does with its answer: tiktoken's checks of the engine (none
    when the engine is tiktoken, the referee itself: `checks` is None), EOTs, the split."""
    refereed = checks is not None

    def finish(job: _Job, encoded: Encoded) -> _Tokenized:
        key = file_keys[job.file_index]
        lengths = np.frombuffer(encoded.lengths, np.uint32).astype(np.int64)
        ids = np.frombuffer(encoded.tokens, np.uint32)
        mismatches = reencoded = 0
        if refereed:
            checks.raise_failure()  # a failed self-check stops the run at the next batch, sampled or not
            if config.verify_fraction > 0 and (sampled := _sample(job, key, ids, np.concatenate([[0], np.cumsum(lengths)]), config)):
                checks.submit(sampled)
        if job.token_counts is not None:  # FineWeb's own GPT-2 counts: a document the engine counts otherwise is re-encoded
            known = job.token_counts >= 0
            differing = np.flatnonzero(known & (job.token_counts != lengths))
            if refereed and differing.size:
                ids, lengths = _reencoded(job, ids, lengths, differing)
                reencoded = int(differing.size)
            mismatches = int(np.count_nonzero(known & (job.token_counts != lengths)))
        rows = job.rows.tolist()
        is_val = np.fromiter((is_val_document(config.seed, key, row, config.val_fraction) for row in rows),
                             dtype=bool, count=len(rows))
        return _Tokenized(
            file_index=job.file_index,
            rows=job.rows,
            lengths=lengths,
            is_val=is_val,
            text_bytes=np.frombuffer(encoded.sizes, np.int64),
            tokens=_eot_before_each(ids, lengths),
            skipped_empty=job.skipped_empty,
            invalid_utf8=int(np.count_nonzero(np.frombuffer(encoded.invalid, np.uint8))),
            token_count_mismatches=mismatches,
            token_count_reencoded=reencoded,
        )

    return finish


def _text_as_binary(column: pa.Array) -> pa.Array:
    """The text column as raw bytes, so invalid UTF-8 reaches our decoder instead of crashing Arrow."""
    if pa.types.is_string(column.type):
        return column.view(pa.binary())
    if pa.types.is_large_string(column.type):
        return column.view(pa.large_binary())
    return column


def _read_schema(path: Path, text_column: str) -> tuple[pa.Schema, int, int]:
    """Check from the footer that a file is parquet with a usable text column: (schema, rows,
    bytes of text, uncompressed)."""
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
    text_bytes = sum(chunk.total_uncompressed_size for group in range(metadata.num_row_groups)
                     for chunk in map(metadata.row_group(group).column, range(metadata.num_columns))
                     if chunk.path_in_schema == text_column)
    return schema, metadata.num_rows, text_bytes


def _encoders_for(text_bytes: int, engine: str) -> int:
    """One encoder per core (this process and helpers), but no more helpers than the text pays for."""
    return max(1, min(_cpu_count(), 1 + text_bytes // TEXT_BYTES_PER_HELPER[engine]))


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
            # one column: Arrow's thread pool would only add its start (~0.05 s)
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
                if remaining is not None:
                    if remaining == 0:
                        return
                    batch = batch.slice(0, remaining)
                    remaining -= batch.num_rows
                yield _job(file_index, first_row, batch.column(0), batch.column(1) if len(columns) == 2 else None)
                first_row += batch.num_rows


def _read_while(jobs: Iterator[_Job], busy: Future, limit: int) -> Iterator[_Job]:
    """Read up to `limit` jobs while `busy` runs, then the rest as they are asked for: parquet is
    read and decompressed while the engine starts (fastokens' load leaves the GIL free)."""
    early: list[_Job] = []
    while not busy.done() and len(early) < limit and (job := next(jobs, None)) is not None:
        early.append(job)
    return itertools.chain(early, jobs)


@dataclass
class _Totals:
    """What the manifest counts, summed over the batches written."""

    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    text_bytes: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    lengths: list[np.ndarray] = field(default_factory=list)  # tokens per document, batch by batch
    rows: int = 0  # rows read, empty ones included
    skipped: int = 0
    invalid: int = 0
    mismatches: int = 0
    reencoded: int = 0
    verified: int = 0


def _write(result: _Tokenized, writers: dict[str, ShardWriter], totals: _Totals) -> None:
    """A batch's documents into their split's shards (each split's share in one copy), and its counts into totals."""
    for split, in_split in (("train", ~result.is_val), ("val", result.is_val)):
        if in_split.any():
            tokens = result.tokens[np.repeat(in_split, result.lengths + 1)]  # the split's documents, each after its EOT
            writers[split].add_documents(tokens, result.lengths[in_split] + 1, result.file_index, result.rows[in_split])
            totals.documents[split] += int(np.count_nonzero(in_split))
            totals.text_bytes[split] += int(result.text_bytes[in_split].sum())
    totals.lengths.append(result.lengths)
    totals.rows += len(result.rows) + result.skipped_empty
    totals.skipped += result.skipped_empty
    totals.invalid += result.invalid_utf8
    totals.mismatches += result.token_count_mismatches
    totals.reencoded += result.token_count_reencoded


def _cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def length_summary(lengths: np.ndarray) -> dict[str, Any]:
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
    file_keys: list[str] | None = None,
    require_both_splits: bool = True,
) -> dict[str, Any]:
    """Tokenize parquet files into llm.c shards in out_dir and return the stage manifest.

    The manifest holds `shards` (name, split, tokens, documents that start in the shard,
    first_row/last_row as [file index, row], the engine that encoded it), `documents`,
    `tokens` (EOTs included) and `text_bytes` per split (for bits per byte),
    `skipped_empty_documents`, `invalid_utf8_documents` (decoded with replacement
    characters), `doc_tokens` (quantiles and histogram), `tokens_per_second`, `engine`,
    `referee` and `verified_documents` (re-encoded with tiktoken, identical), and, when the
    parquet has FineWeb's `token_count` column, `token_count_reencoded` (documents the
    engine counted otherwise, re-encoded with tiktoken; 0 for an exact engine) and
    `token_count_mismatches` (documents tiktoken too counts otherwise; it should be 0).

    `file_keys` name the files in the val split's hash (default: their index in `files`);
    a name that does not change when other files join keeps each file's split the same.
    Without `require_both_splits`, a file whose documents all land in one split is fine (the
    dataset it joins is checked as a whole).

    progress(rows_done, rows_total) is called after each batch. On any error the shards
    written so far are removed, so out_dir never holds a partial result that looks complete.
    config.num_workers encoders tokenize (0: one per core, as many as the text pays for: see
    TEXT_BYTES_PER_HELPER): threads of this process for the native engine, else this process
    and num_workers - 1 helper processes; config.engine is the BPE engine
    (gpt/tokenize_engine.py). The output depends on neither. If the native engine, chosen by
    `auto`, fails its self-check (which runs beside its first batches), nothing of it is kept
    and the stage runs again with the next engine, after a warning.
    """
    try:
        return _tokenize_parquet(files, out_dir, config, text_column, max_rows, progress, file_keys, require_both_splits)
    except SelfCheckFailure:  # late, its shards removed: `auto` runs again with the next engine, after a warning
        if config.engine != "auto":
            raise
        choose_again()
        return _tokenize_parquet(files, out_dir, config, text_column, max_rows, progress, file_keys, require_both_splits)


def _tokenize_parquet(files: list[Path], out_dir: Path, config: TokenizeConfig, text_column: str, max_rows: int | None,
                      progress: Callable[[int, int], None] | None, file_keys: list[str] | None,
                      require_both_splits: bool) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("*.bin")):
        raise TokenizeError(f"{out_dir} already holds .bin shards; tokenize into an empty folder")
    files = [Path(file) for file in files]
    if not files:
        raise TokenizeError("no parquet files to tokenize; check data.source")
    schemas, rows, file_text_bytes = zip(*(_read_schema(file, text_column) for file in files))
    rows_total = min(sum(rows), max_rows) if max_rows is not None else sum(rows)
    planned = planned_engine(config.engine)
    num_workers = config.num_workers or _encoders_for(sum(file_text_bytes) * rows_total // max(sum(rows), 1), planned)

    started = time.perf_counter()  # the engines' start counts
    writers = {split: ShardWriter(out_dir, split, config.shard_tokens) for split in ("train", "val")}
    totals = _Totals()
    pool = EncoderPool(num_workers, engine_spec(planned))  # helpers start their engine at once
    checks: _RefereeThread | None = None
    try:
        with pool, ThreadPoolExecutor(1, thread_name_prefix="tokenize-engine") as starter:
            # loaded in this process meanwhile; a native engine is self-checked by `checks`, below
            choosing = starter.submit(select_engine, config.engine, True)
            jobs = _read_while(_jobs(files, list(schemas), text_column, max_rows), choosing, limit=READ_AHEAD_JOBS)
            engine = choosing.result()  # a clear error if the engine asked for is unusable
            pool.use(engine.spec)
            checks = _RefereeThread(engine, files) if engine.name != "tiktoken" else None
            keys = file_keys if file_keys is not None else [str(index) for index in range(len(files))]
            results = pool.encoded_in_order(jobs, _finisher(config, engine, checks, keys), loaded_engine=engine.tokenizer)
            with contextlib.closing(results):
                for result in results:
                    _write(result, writers, totals)
                    if progress:
                        progress(totals.rows, rows_total)
        totals.verified = checks.close() if checks else 0  # the engine's self-check and sample: a failure removes the shards
        with ThreadPoolExecutor(len(writers), thread_name_prefix="tokenize-flush") as flushing:  # the last shards' fsyncs at once
            list(flushing.map(ShardWriter.flush, writers.values()))
        for split, count in totals.documents.items():
            if count == 0 and require_both_splits:
                raise TokenizeError(
                    f"no document landed in {split} ({sum(totals.documents.values())} documents, "
                    f"tokenize.val_fraction={config.val_fraction}); use more data or change --set tokenize.val_fraction=..."
                )
    except BaseException as error:
        if checks is not None:
            checks.stop()
        for writer in writers.values():
            writer.remove_written()
        if isinstance(error, EncoderFailed):
            raise TokenizerCrashed(f"{error}; run again (no shard of this run was kept)") from None
        raise
    seconds = time.perf_counter() - started

    tokens = {split: sum(s["tokens"] for s in writer.shards) for split, writer in writers.items()}
    for shard in writers["train"].shards + writers["val"].shards:
        shard["engine"] = engine.label
    all_lengths = np.concatenate(totals.lengths) if totals.lengths else np.zeros(0, np.int64)
    np.save(out_dir / DOC_TOKENS_FILE, all_lengths.astype(np.uint32))  # for a dataset assembled from many files
    manifest: dict[str, Any] = {
        "encoding": "gpt2",
        "eot_token": EOT,
        "sources": [str(file) for file in files],
        "text_column": text_column,
        "rows_read": totals.rows,
        "shards": writers["train"].shards + writers["val"].shards,
        "documents": totals.documents,
        "skipped_empty_documents": totals.skipped,
        "invalid_utf8_documents": totals.invalid,
        "tokens": tokens,
        "text_bytes": totals.text_bytes,
        "doc_tokens": length_summary(all_lengths),
        "num_workers": num_workers,
        "engine": engine.label,
        "referee": referee_label(),
        "verify_fraction": config.verify_fraction,
        "verified_documents": totals.verified,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(sum(tokens.values()) / seconds, 1) if seconds > 0 else None,
    }
    if any(_has_token_counts(schema) for schema in schemas):
        manifest["token_count_reencoded"] = totals.reencoded
        manifest["token_count_mismatches"] = totals.mismatches
    return manifest


def assemble_dataset(parts: list[tuple[str, Path, dict[str, Any]]], out_dir: Path) -> dict[str, Any]:
    """One dataset from per-file tokenize results: `parts` is (file key, folder, its manifest)
    in file order. Each part's shards are hard-linked (not copied) into out_dir, renumbered
    train_000000.bin, … and val_000000.bin, … in that order, so the trainer reads the same
    tokens in the same order whoever tokenized which file, and when. Returns the manifest of
    the whole: the per-file one's totals summed, its shards named by file, and `engines`: the
    engines that encoded them (a file tokenized earlier may have had another; the bytes are the same)."""
    out_dir = Path(out_dir)
    shards: list[dict[str, Any]] = []
    next_index = {"train": 0, "val": 0}
    for key, folder, report in parts:
        for shard in report["shards"]:
            split = shard["split"]
            name = f"{split}_{next_index[split]:06d}.bin"
            next_index[split] += 1
            os.link(Path(folder) / shard["name"], out_dir / name)
            shards.append({**shard, "name": name, "file": key, "file_shard": shard["name"]})
    documents = {split: sum(r["documents"][split] for _, _, r in parts) for split in ("train", "val")}
    for split, count in documents.items():
        if count == 0:
            raise TokenizeError(f"no document landed in {split} ({sum(documents.values())} documents); "
                                "use more data or change --set tokenize.val_fraction=...")
    lengths = [np.load(Path(folder) / DOC_TOKENS_FILE) for _, folder, _ in parts]
    all_lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
    np.save(out_dir / DOC_TOKENS_FILE, all_lengths.astype(np.uint32))
    first = parts[0][2]
    total = lambda name: sum(r.get(name, 0) for _, _, r in parts)  # noqa: E731
    manifest: dict[str, Any] = {
        "encoding": first["encoding"],
        "eot_token": first["eot_token"],
        "sources": [source for _, _, r in parts for source in r["sources"]],
        "files": [key for key, _, _ in parts],
        "text_column": first["text_column"],
        "rows_read": total("rows_read"),
        "shards": [s for s in shards if s["split"] == "train"] + [s for s in shards if s["split"] == "val"],
        "documents": documents,
        "skipped_empty_documents": total("skipped_empty_documents"),
        "invalid_utf8_documents": total("invalid_utf8_documents"),
        "tokens": {split: sum(r["tokens"][split] for _, _, r in parts) for split in ("train", "val")},
        "text_bytes": {split: sum(r["text_bytes"][split] for _, _, r in parts) for split in ("train", "val")},
        "doc_tokens": length_summary(all_lengths),
        "engines": sorted({r.get("engine", "tiktoken") for _, _, r in parts}),  # a part from before engines were recorded: tiktoken
        "verified_documents": total("verified_documents"),
        "seconds": round(total("seconds"), 3),
    }
    manifest["tokens_per_second"] = (round(sum(manifest["tokens"].values()) / manifest["seconds"], 1)
                                     if manifest["seconds"] > 0 else None)
    if any("token_count_mismatches" in r for _, _, r in parts):
        manifest["token_count_reencoded"] = total("token_count_reencoded")
        manifest["token_count_mismatches"] = total("token_count_mismatches")
    return manifest
