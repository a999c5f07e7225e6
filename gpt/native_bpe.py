"""GPT-2's BPE in C (gpt/native/gpt2_bpe.c): the ids of tiktoken's `encode_ordinary`, ~7× faster
per core, ready in a few milliseconds (fastokens needs ~0.3 s to build its automaton).

The C file is compiled on first use with the system's C compiler (`$CC`, else `cc`) into a cache
folder (`$FINEWEB_NATIVE_CACHE`, else ~/.cache/fineweb-pretrain/native) under a name that hashes
its sources and flags, so an edited source is rebuilt and two processes building at once cannot
clash; `make venv` builds it ahead (`python -m gpt.native_bpe`). ctypes releases the GIL for
each call, so threads of one process encode in parallel with one shared, read-only table. The
vocabulary is the checked `encoder.json` tiktoken's GPT-2 ranks come from (gpt/encoding.py), read by C.

    python -m gpt.native_bpe    # build (if needed) and print the library's path; cache GPT-2's ranks for tiktoken
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from configs.errors import UserError
from gpt.encoding import EOT, cache_dir, gpt2_file, gpt2_ranks

SOURCE_DIR = Path(__file__).resolve().parent / "native"
SOURCES = (SOURCE_DIR / "gpt2_bpe.c", SOURCE_DIR / "unicode_classes.h")
CFLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")
# Room for tokens per C call: the buffer stays under 4 MB, above which numpy asks the kernel for
# huge pages, whose zeroing costs a fresh process more system time than the buffer saves (the 1×
# sample's stage: 0.082 → 0.053 s of it, median). A batch of FineWeb text needs ~0.4 M tokens.
TOKENS_PER_CALL = 900_000


class NativeBuildError(UserError):
    """The C engine cannot be compiled or loaded here; the message is one line naming the fix."""


def compiler() -> str:
    return os.environ.get("CC") or "cc"


@functools.cache
def source_digest() -> str:
    """What the library is built from: its sources and flags (the version shards record)."""
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def library_path() -> Path:
    return cache_dir() / f"gpt2_bpe-{source_digest()}.so"


def can_build() -> bool:
    """Whether the library is built, or a compiler is there to build it (known at once)."""
    return library_path().is_file() or shutil.which(compiler()) is not None


def build_library() -> Path:
    """The compiled library, built now if it is not cached (~0.3 s with gcc)."""
    target = library_path()
    if target.is_file():
        return target
    if shutil.which(compiler()) is None:
        raise NativeBuildError(f"no C compiler ({compiler()!r}) to build {SOURCES[0].name}; "
                               "install one (apt-get install gcc) or set CC, or set tokenize.engine=fastokens or tiktoken")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NativeBuildError(f"cannot create {target.parent} ({error.strerror}); set FINEWEB_NATIVE_CACHE to a writable folder") from None
    try:
        building_dir = tempfile.TemporaryDirectory(dir=target.parent)  # same file system: the rename below is atomic
    except OSError as error:
        raise NativeBuildError(f"cannot write in {target.parent} ({error.strerror}); "
                               "set FINEWEB_NATIVE_CACHE to a writable folder") from None
    with building_dir as building:
        partial = Path(building) / target.name
        try:
            result = subprocess.run([compiler(), *CFLAGS, "-o", str(partial), str(SOURCES[0])], capture_output=True, text=True)
        except OSError as error:
            raise NativeBuildError(f"{compiler()} could not run ({error.strerror}); set CC to a working C compiler, "
                                   "or set tokenize.engine=fastokens or tiktoken") from None
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:200])
            raise NativeBuildError(f"{compiler()} could not compile {SOURCES[0].name} ({first}); "
                                   "set CC to a working C compiler, or set tokenize.engine=fastokens or tiktoken")
        os.replace(partial, target)
    return target


def _address(buffer: Any) -> int:
    """The address of a readable buffer (bytes, a numpy array, an Arrow buffer), without a copy."""
    return np.frombuffer(buffer, np.uint8).ctypes.data if len(memoryview(buffer)) else 0


def _utf8(text: str) -> bytes:
    """A text's UTF-8; lone surrogates become U+FFFD, one each, as tiktoken's encode_ordinary makes them."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


class _ThreadCache:
    """One thread's C cache of merged pieces, freed when the thread (and so this object) goes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib, self.address = lib, lib.gpt2_cache_new()
        if not self.address:
            raise MemoryError("the C engine could not allocate a thread's cache")

    def __del__(self) -> None:
        self.lib.gpt2_cache_free(self.address)


class NativeBpe:
    """The C engine, loaded: GPT-2's ids for batches of UTF-8 texts, from any thread."""

    def __init__(self, library: Path) -> None:
        try:
            self.lib = ctypes.CDLL(str(library))
        except OSError as error:
            raise NativeBuildError(f"cannot load {library} ({error}); delete it to rebuild, "
                                   "or set tokenize.engine=fastokens or tiktoken") from None
        self.lib.gpt2_bpe_new_from_encoder_json.restype = ctypes.c_void_p
        self.lib.gpt2_bpe_new_from_encoder_json.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32]
        self.lib.gpt2_bpe_token.restype = ctypes.c_size_t
        self.lib.gpt2_bpe_token.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_void_p)]
        self.lib.gpt2_bpe_free.argtypes = [ctypes.c_void_p]
        self.lib.gpt2_bpe_encode_batch.restype = ctypes.c_size_t
        self.lib.gpt2_bpe_encode_batch.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
                                                   + [ctypes.c_void_p] * 2 + [ctypes.POINTER(ctypes.c_size_t)])
        self.lib.gpt2_bpe_classes_tiktoken_version.restype = ctypes.c_char_p
        classes_from = self.lib.gpt2_bpe_classes_tiktoken_version().decode()
        if classes_from != tiktoken.__version__:  # its Unicode version, and so its letters and digits, may differ
            raise NativeBuildError(f"the native engine's Unicode classes come from tiktoken {classes_from}, this is tiktoken "
                                   f"{tiktoken.__version__}; pip install tiktoken=={classes_from}, or regenerate them with "
                                   "tools/gpt2_unicode_classes.py, or set tokenize.engine=fastokens")
        self.lib.gpt2_cache_new.restype = ctypes.c_void_p
        self.lib.gpt2_cache_free.argtypes = [ctypes.c_void_p]
        self.caches = threading.local()  # each thread's cache of merged pieces (the C table itself is read-only)
        # C reads the checked encoder.json itself, without the GIL: Python's json and byte decoding
        # take ~0.03 s of it, which the stage's parquet reading is waiting for at start
        vocabulary = gpt2_file("encoder.json")
        self.table = self.lib.gpt2_bpe_new_from_encoder_json(vocabulary, len(vocabulary), EOT)
        if not self.table:
            raise NativeBuildError("the C engine could not read GPT-2's encoder.json (or ran out of memory, or its table's "
                                   "limits do not hold); "
                                   "set tokenize.engine=fastokens or tiktoken, and report it")

    def token_bytes(self, rank: int) -> bytes:
        """The bytes of token `rank` in the C table (for tests)."""
        where = ctypes.c_void_p()
        size = self.lib.gpt2_bpe_token(self.table, rank, ctypes.byref(where))
        return ctypes.string_at(where, size)

    def _cache(self) -> int:
        """This thread's cache of merged pieces, made on its first call and freed with the thread."""
        if not hasattr(self.caches, "cache"):
            self.caches.cache = _ThreadCache(self.lib)
        return self.caches.cache.address

    def __del__(self) -> None:  # no thread can be encoding with it: they would hold a reference
        if getattr(self, "table", None):
            self.lib.gpt2_bpe_free(self.table)
            self.table = None

    def _encode(self, data: Any, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint32 tokens, uint32 tokens per text, uint8 invalid-UTF-8 flag per text) of data[starts[k]:ends[k]]."""
        count, sizes = len(starts), ends - starts
        lengths, invalid = np.empty(count, np.uint32), np.empty(count, np.uint8)
        if count == 0:
            return np.empty(0, np.uint32), lengths, invalid
        parts, done, finished = [], 0, ctypes.c_size_t()
        while done < count:  # usually one call; a text's tokens never outnumber its bytes, so each call takes one at least
            room = max(min(int(sizes[done:].sum()), TOKENS_PER_CALL), int(sizes[done]), 1)
            tokens = np.empty(room, np.uint32)
            written = self.lib.gpt2_bpe_encode_batch(self.table, self._cache(), _address(data), starts[done:].ctypes.data,
                                                     ends[done:].ctypes.data, count - done, tokens.ctypes.data, room,
                                                     lengths[done:].ctypes.data, invalid[done:].ctypes.data, ctypes.byref(finished))
            parts.append(tokens[:written])
            done += finished.value
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), lengths, invalid

    def encode_spans(self, data: Any, starts: Any, ends: Any) -> tuple[Any, Any, Any, Any]:
        """A batch of raw texts, data[starts[k]:ends[k]], as the tokenize workers answer it:
        (tokens per text, UTF-8 bytes per text after repair, invalid-UTF-8 flags, tokens).
        Invalid UTF-8 is decoded with replacement characters, as tiktoken's callers do."""
        starts = np.ascontiguousarray(np.frombuffer(starts, np.int64) if not isinstance(starts, np.ndarray) else starts, np.int64)
        ends = np.ascontiguousarray(np.frombuffer(ends, np.int64) if not isinstance(ends, np.ndarray) else ends, np.int64)
        tokens, lengths, invalid = self._encode(data, starts, ends)
        sizes = ends - starts
        if invalid.any():  # rare: repair those texts and encode the batch again
            view = memoryview(data)
            texts = [bytes(view[s:e]) if not bad else str(view[s:e], "utf-8", "replace").encode()
                     for s, e, bad in zip(starts.tolist(), ends.tolist(), invalid.tolist())]
            sizes = np.array([len(text) for text in texts], np.int64)
            repaired_ends = np.cumsum(sizes)
            tokens, lengths, _ = self._encode(b"".join(texts), repaired_ends - sizes, repaired_ends)
        return lengths, sizes, invalid, tokens

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts → (their tokens, concatenated; tokens per text): the engines' common batch interface."""
        raw = [_utf8(text) for text in texts]
        sizes = np.array([len(text) for text in raw], np.int64)
        ends = np.cumsum(sizes)
        lengths, _, _, tokens = self.encode_spans(b"".join(raw), ends - sizes, ends)
        return tokens, lengths


if __name__ == "__main__":
    gpt2_ranks()  # tiktoken's, for the referee (gpt/encoding.py): cached even where no compiler is
    print(build_library())
