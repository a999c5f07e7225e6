"""llm.c's token shard format, so shards interoperate with llm.c and modded-nanogpt.

    header: 256 little-endian int32 — [0] magic 20240520, [1] version 1, [2] token count
    body:   token count little-endian uint16 tokens

Each document in a shard is preceded by `<|endoftext|>` (50256).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from configs.errors import UserError
from storage.artifacts import atomic_file

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


class ShardError(UserError):
    """A file that is not a valid llm.c token shard; the message is one line."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens as an llm.c shard atomically (temporary name, fsync, rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ShardError(f"{path}: token ids must fit in uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    with atomic_file(Path(path)) as tmp, open(tmp, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(memoryview(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)))  # no copy when already uint16


class ShardWriter:
    """Fills `<split>_000000.bin`, `<split>_000001.bin`, … in a folder with at most shard_tokens
    tokens each; a document may continue into the next shard of its split, as in llm.c.
    `shards` describes what was written: name, split, tokens, documents that start in the
    shard, and the source rows (first_row, last_row) it holds."""

    def __init__(self, out_dir: str | os.PathLike, split: str, shard_tokens: int):
        self.out_dir, self.split = Path(out_dir), split
        self.buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)  # pages are touched only as filled
        self.filled = 0
        self.documents = 0  # documents that start in the current shard
        self.first_row: tuple[int, int] | None = None
        self.last_row: tuple[int, int] | None = None
        self.shards: list[dict] = []

    def add_document(self, tokens: np.ndarray, source_row: tuple[int, int]) -> None:
        self.add_documents(tokens, np.array([len(tokens)]), source_row[0], np.array([source_row[1]]))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, file_index: int, rows: np.ndarray) -> None:
        """Documents of one file back to back in `tokens` (`lengths`: tokens of each, none 0;
        `rows`: their rows in the file), copied a shard's worth at a time rather than one by one."""
        starts = np.cumsum(lengths) - lengths  # each document's first token
        row_at = lambda token: (file_index, int(rows[np.searchsorted(starts, token, side="right") - 1]))  # noqa: E731
        position = 0
        while position < len(tokens):
            if self.filled == 0:
                self.first_row = row_at(position)
            take = min(len(tokens) - position, len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[position : position + take]
            self.documents += int(np.searchsorted(starts, position + take) - np.searchsorted(starts, position))  # that start here
            self.last_row = row_at(position + take - 1)
            self.filled += take
            position += take
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out_dir / name, self.buffer[: self.filled])
        self.shards.append({"name": name, "split": self.split, "tokens": self.filled, "documents": self.documents,
                            "first_row": list(self.first_row), "last_row": list(self.last_row)})
        self.filled = self.documents = 0

    def remove_written(self) -> None:
        """Delete the shards written so far (a failed run leaves none that look complete)."""
        for shard in self.shards:
            (self.out_dir / shard["name"]).unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> int:
    """Validate the header and return the token count."""
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: shorter than the 1024-byte llm.c header; re-run the tokenize stage")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not an llm.c token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ShardError(f"{path}: {actual} bytes but the header promises {count} tokens ({expected} bytes); the shard is truncated or corrupt")
    return count


def read_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a shard's tokens (read-only, no copy into RAM)."""
    count = read_header(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
