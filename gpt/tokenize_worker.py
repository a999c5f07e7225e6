"""The tokenize stage's encoders: GPT-2 BPE over batches of raw UTF-8 texts, in this process and
in helper processes that run this file, with the pipe protocol between them and the pool that
shares the batches out.

An encoder runs one of three engines, named by an engine spec (gpt/tokenize_engine.py builds and
checks it): `{"engine": "tiktoken", "arguments": tiktoken.Encoding's keyword arguments}`,
`{"engine": "fastokens", "tokenizer_json": GPT-2 as a tokenizer.json}` or `{"engine": "native"}`
(the C engine of gpt/native_bpe.py, loaded in this process). All give GPT-2's ids with
"<|endoftext|>" in a text as ordinary text; each encoder uses one core. The native engine runs
on threads of this process only (it leaves the GIL while it encodes and starts in milliseconds);
the others also run in helper processes.

A helper runs this file as a script (`python -P gpt/tokenize_worker.py`), so this module imports
only the standard library and the engine (no numpy, pyarrow, project package, or the caller's
`__main__`, which a Prefect run would be) and a helper starts in ~0.1 s, plus the engine's own
start (~0.03 s for tiktoken, ~0.3 s for fastokens). The parent sends the engine spec once (the
vocabulary files are read and checked once, by the parent), then batches; the helper answers
each batch in order and exits at the end of its input.

Frames, native byte order (parent and helper are the same machine):

    parent → helper   once:       u64 size, pickle of the engine spec
                      per batch:  u64 n, u64 data size, n × i64 start, n × i64 end, data
    helper → parent   once:       u64 READY, when its engine is built (it takes no batch before)
                      per batch:  u64 n, u64 tokens, n × u32 tokens per text,
                                  n × i64 UTF-8 bytes per text (after repair), n × u8 invalid-UTF-8 flag,
                                  tokens × u32: text 0, text 1, … (no EOT: the parent adds it)

The pickle comes from the parent that started the helper, over its own pipe.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import struct
import subprocess
import sys
import tempfile
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, NamedTuple, Protocol, TypeVar

JOBS_IN_FLIGHT_PER_WORKER = 4  # bounds memory; enough that a slow job at the head does not idle the others
ONE_CORE_ENV = {"FASTOKENS_BPE_THREADS": "1", "RAYON_NUM_THREADS": "1"}  # a helper is one core: the engine spawns no threads of its own
_HEADER = struct.Struct("=QQ")
_SIZE = struct.Struct("=Q")
READY = 0x5245414459  # a helper's first answer: its engine is built

Result = TypeVar("Result")
EncodeBatch = Callable[[list[str]], tuple[Any, Any]]  # texts → (u32 tokens of all texts, concatenated; u32 tokens per text)


class Batch(Protocol):
    """What an encoder reads from a job: text bytes, and int64 buffers of each text's span in them."""

    data: Any
    starts: Any
    ends: Any


class Encoded(NamedTuple):
    """An encoder's answer for one batch of n texts, as buffers (numpy reads them without a copy)."""

    lengths: Any  # n × u32: tokens per text
    sizes: Any  # n × i64: UTF-8 bytes per text, after repair
    invalid: Any  # n × u8: 1 where the text was not valid UTF-8
    tokens: Any  # u32: text 0, text 1, … (no EOT)


class EncoderFailed(Exception):
    """A helper process died or answered out of turn; the message is one line."""


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


def new_encoding(arguments: dict[str, Any]) -> Any:
    """A fresh tiktoken.Encoding (its own regex caches: tiktoken's regex runs ~1.5× slower on
    a thread other than the first one to use an encoding, so each encoding thread builds its own)."""
    import tiktoken  # here, not at the top: a fastokens helper never loads it

    return tiktoken.Encoding(**arguments)


def buffer_encoder(enc: Any) -> Callable[[str], Any]:
    """enc.encode_ordinary, returning a buffer of uint32 tokens instead of a list of Python ints
    (~15% less CPU). Special-token text ("<|endoftext|>" in a document) is ordinary text, as in
    encode_ordinary; this is what tiktoken's public encode_to_numpy calls, minus numpy."""
    core = enc._core_bpe
    if hasattr(core, "encode_to_tiktoken_buffer"):  # tiktoken >= 0.8
        no_special: set[str] = set()
        return lambda text: core.encode_to_tiktoken_buffer(text, no_special)
    return lambda text: array("I", enc.encode_ordinary(text))


def load_fastokens(tokenizer_json: str) -> Any:
    """fastokens' tokenizer from GPT-2's tokenizer.json (~0.3 s: it builds an automaton over the vocabulary)."""
    import fastokens

    return fastokens.Tokenizer.from_json_str(tokenizer_json)


def fastokens_batch_encoder(tokenizer: Any) -> EncodeBatch:
    """A batch's texts in one call, tokens back as one uint32 buffer: no Python int per token.
    The tokenizer.json has no added tokens, so "<|endoftext|>" in a text is ordinary text."""

    def encode_batch(texts: list[str]) -> tuple[Any, Any]:
        tokens, offsets = tokenizer.encode_batch_flat(texts)
        ends = memoryview(offsets).cast("Q")  # n + 1 token offsets
        return tokens, array("I", [ends[i + 1] - ends[i] for i in range(len(texts))])

    return encode_batch


def tiktoken_batch_encoder(enc: Any) -> EncodeBatch:
    """tiktoken's encoder, text by text, into one uint32 buffer."""
    encode = buffer_encoder(enc)

    def encode_batch(texts: list[str]) -> tuple[Any, Any]:
        tokens, lengths = bytearray(), array("I")
        for text in texts:
            encoded = memoryview(encode(text))
            lengths.append(encoded.nbytes // 4)  # not len(): tiktoken's buffer reports its shape in bytes
            tokens += encoded
        return tokens, lengths

    return encode_batch


def batch_encoder(spec: dict[str, Any], loaded_engine: Any = None) -> EncodeBatch:
    """The encoder a fastokens or tiktoken spec names, built on the thread that will use it. A
    fastokens tokenizer already loaded in this process may be passed in (it is thread-safe);
    tiktoken gets a fresh encoding per thread (see new_encoding)."""
    if spec["engine"] == "fastokens":
        return fastokens_batch_encoder(loaded_engine or load_fastokens(spec["tokenizer_json"]))
    return tiktoken_batch_encoder(new_encoding(spec["arguments"]))


def encode_texts(encode_batch: EncodeBatch, data: memoryview, starts: Iterable[int], ends: Iterable[int]) -> Encoded:
    """Decode and encode data[start:end] for each text. Invalid UTF-8 (e.g. lone surrogates
    written as bytes) is decoded with replacement characters."""
    texts, sizes, invalid = [], array("q"), bytearray()
    for start, end in zip(starts, ends):
        raw = data[start:end]
        try:
            texts.append(str(raw, "utf-8"))
            sizes.append(end - start)
            invalid.append(0)
        except UnicodeDecodeError:
            texts.append(str(raw, "utf-8", "replace"))
            sizes.append(len(texts[-1].encode("utf-8")))
            invalid.append(1)
    tokens, lengths = encode_batch(texts)
    return Encoded(lengths, sizes, bytes(invalid), tokens)


def _int64s(buffer: Any) -> memoryview:
    """An int64 buffer (a numpy array, an array('q'), bytes) as a sequence of Python ints."""
    return memoryview(buffer).cast("B").cast("q")


# ---------------------------------------------------------------------------------------
# The pipe protocol, both ends
# ---------------------------------------------------------------------------------------


def write_spec(stream: Any, spec: dict[str, Any]) -> None:
    payload = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_SIZE.pack(len(payload)) + payload)


def read_spec(stream: Any) -> dict[str, Any]:
    (size,) = _SIZE.unpack(_read_exactly(stream, _SIZE.size))
    return pickle.loads(_read_exactly(stream, size))


def write_batch(stream: Any, batch: Batch) -> None:
    stream.write(_HEADER.pack(len(_int64s(batch.starts)), len(batch.data)))
    stream.write(_int64s(batch.starts))
    stream.write(_int64s(batch.ends))
    stream.write(batch.data)
    stream.flush()


def read_batch(stream: Any) -> tuple[memoryview, memoryview, memoryview] | None:
    """(starts, ends, data) of the next batch, or None at the end of input."""
    header = _read_exactly(stream, _HEADER.size, end_ok=True)
    if header is None:
        return None
    count, data_size = _HEADER.unpack(header)
    spans = _int64s(_read_exactly(stream, 16 * count))
    return spans[:count], spans[count:], memoryview(_read_exactly(stream, data_size))


def write_encoded(stream: Any, encoded: Encoded) -> None:
    stream.write(_HEADER.pack(len(encoded.invalid), len(encoded.tokens) // 4))
    for part in encoded:
        stream.write(part)
    stream.flush()


def read_encoded(stream: Any, count: int) -> Encoded:
    answered, tokens = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    if answered != count:
        raise EncoderFailed(f"a tokenizer helper answered {answered} texts for {count}")
    return Encoded(_read_exactly(stream, 4 * count), _read_exactly(stream, 8 * count), _read_exactly(stream, count),
                   _read_exactly(stream, 4 * tokens))


def _read_exactly(stream: Any, size: int, end_ok: bool = False) -> bytes | None:
    """size bytes from stream; None at a clean end of input when end_ok."""
    data = stream.read(size)
    if len(data) == size:
        return data
    if end_ok and not data:
        return None
    raise EOFError(f"tokenize worker pipe: expected {size} bytes, got {len(data)}")


# ---------------------------------------------------------------------------------------
# The pool: this process and helper processes
# ---------------------------------------------------------------------------------------


class InProcessEncoder:
    """Encodes batches in this process, on the one thread that calls it (the engines release
    the GIL while they encode). A native or fastokens tokenizer already loaded here is reused
    (both are thread-safe); a tiktoken encoding is the encoder's own: tiktoken's regex runs ~1.5×
    slower on any thread but the first to use an encoding, and the caller's thread may have used
    a shared one first."""

    def __init__(self, spec: dict[str, Any], loaded_engine: Any = None) -> None:
        self.spec, self.loaded_engine = spec, loaded_engine
        self.encode_batch: EncodeBatch | None = None

    def prepare(self) -> None:
        """Build the engine's encoder, on the thread that will use it."""
        if self.encode_batch is None and self.spec["engine"] != "native":
            self.encode_batch = batch_encoder(self.spec, self.loaded_engine)

    def __call__(self, batch: Batch) -> Encoded:
        if self.spec["engine"] == "native":  # raw UTF-8 straight to C, checked and repaired there
            return Encoded(*self.loaded_engine.encode_spans(batch.data, batch.starts, batch.ends))
        self.prepare()
        return encode_texts(self.encode_batch, memoryview(batch.data), _int64s(batch.starts), _int64s(batch.ends))

    def close(self, kill: bool = False) -> None:
        pass


class HelperProcess:
    """Encodes batches in a helper process running this file, fed over its stdin and stdout,
    one batch at a time. A fresh interpreter runs nothing of the caller's (a fork would copy a
    caller's threads mid-flight; multiprocessing's spawn would import the caller's __main__).
    Its engine is started before it takes a batch (see prepare)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty helper cannot block
        self.process = subprocess.Popen([sys.executable, "-P", __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.errors, env={**os.environ, **ONE_CORE_ENV})
        self.spec: dict[str, Any] | None = spec
        self.ready = False

    def prepare(self) -> None:
        """Send the engine spec (~0.6 MB for tiktoken, ~1.6 MB for fastokens, pickled) and wait
        until the helper's engine is built, so a batch never waits behind an engine's start."""
        if self.spec is None:
            return
        spec, self.spec = self.spec, None
        try:
            write_spec(self.process.stdin, spec)
            self.process.stdin.flush()
            (answer,) = _SIZE.unpack(_read_exactly(self.process.stdout, _SIZE.size))
        except (BrokenPipeError, EOFError):
            raise EncoderFailed(self._failure()) from None
        if answer != READY:
            raise EncoderFailed(f"tokenizer worker process {self.process.pid} answered {answer:#x} instead of being ready")
        self.ready = True

    def __call__(self, batch: Batch) -> Encoded:
        self.prepare()
        try:
            write_batch(self.process.stdin, batch)
            return read_encoded(self.process.stdout, len(_int64s(batch.starts)))
        except (BrokenPipeError, EOFError):
            raise EncoderFailed(self._failure()) from None

    def _failure(self) -> str:
        code = self.process.wait()
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        return f"tokenizer worker process {self.process.pid} exited with code {code}" + (f": {lines[-1]}" if lines else "")

    def close(self, kill: bool = False) -> None:
        """End the helper: at the end of its input, or killed (on error, or still starting its engine)."""
        if kill or not self.ready:
            self.process.kill()
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # end of input: the helper exits
        self.process.wait()
        self.process.stdout.close()
        self.errors.close()


class EncoderPool:
    """num_workers encoders, each driven by a thread here: for the native engine, threads of this
    process; for the others, this process's encoder and num_workers - 1 helper processes.

    The helpers start at once and build their engine (~0.35 s for fastokens) while the caller
    checks its own; `encoded_in_order` then adds this process's encoder, on a thread of its own
    while the calling thread reads the input and writes the output (the engines leave the GIL
    while they encode). Whichever ready encoder is free takes the next batch. Close the pool
    (or use it as a context manager) to end the helpers.
    """

    def __init__(self, num_workers: int, spec: dict[str, Any]) -> None:
        self.num_workers = num_workers
        self.encoders: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.start_failures: list[BaseException] = []  # encoders whose engine did not start: the run fails
        self._start_helpers(spec)

    def _start_helpers(self, spec: dict[str, Any]) -> None:
        self.spec, self.pending, self.start_failures = spec, queue.SimpleQueue(), []
        if spec["engine"] == "native":  # its encoders are threads of this process, added by encoded_in_order
            return
        for _ in range(self.num_workers - 1):
            self._serve_on_a_thread(HelperProcess(spec))

    @property
    def jobs_in_flight(self) -> int:
        """Batches encoded or waiting at once: enough that every encoder always has one."""
        return JOBS_IN_FLIGHT_PER_WORKER * self.num_workers

    def _serve_on_a_thread(self, encoder: Any) -> None:
        self.encoders.append(encoder)
        self.threads.append(threading.Thread(target=_serve, args=(encoder, self.pending, self.start_failures),
                                             name=f"tokenize-{len(self.threads)}", daemon=True))
        self.threads[-1].start()

    def use(self, spec: dict[str, Any]) -> None:
        """Run the engine `spec` names: helpers started for another one are replaced."""
        if spec["engine"] != self.spec["engine"]:
            self.close(kill=True)
            self._start_helpers(spec)

    def encoded_in_order(self, batches: Iterator[Batch], finish: Callable[[Batch, Encoded], Result],
                         loaded_engine: Any = None) -> Iterator[Result]:
        """finish(batch, its encoding) for each batch, in batch order; `finish` runs on the
        encoder's thread. At most JOBS_IN_FLIGHT_PER_WORKER batches per worker are in flight,
        so memory does not grow with the input. `loaded_engine`: the native or fastokens
        tokenizer already loaded here (the native engine's encoders are num_workers threads)."""
        in_process = self.num_workers if self.spec["engine"] == "native" else 1
        for _ in range(in_process):
            self._serve_on_a_thread(InProcessEncoder(self.spec, loaded_engine))
        window: deque[Future] = deque()
        finished = False
        try:
            for batch in batches:
                window.append(Future())
                self.pending.put((batch, window[-1], finish))
                if len(window) >= self.jobs_in_flight:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
            if self.start_failures:  # a helper died before it took a batch: fail as if it died on one
                raise self.start_failures[0]
            finished = True
        finally:
            for future in window:
                future.cancel()
            if not finished:
                self.close(kill=True)  # on error or interrupt, a helper mid-batch is killed

    def close(self, kill: bool = False) -> None:
        for _ in self.threads:
            self.pending.put(None)
        for encoder in self.encoders:
            encoder.close(kill=kill)
        for thread in self.threads:
            thread.join()
        self.encoders, self.threads = [], []

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.close(kill=error is not None)


def _serve(encoder: Any, pending: queue.SimpleQueue, start_failures: list[BaseException]) -> None:
    """An encoder's thread: start its engine, then take the next batch (whoever is free takes
    it) and answer its future. An engine that fails to start fails every batch it takes, and
    its failure is kept, so the run fails even if the other encoders did all the work."""
    failure: BaseException | None = None
    try:
        encoder.prepare()
    except BaseException as error:
        failure = error
        start_failures.append(error)
    while (item := pending.get()) is not None:
        batch, future, finish = item
        if future.set_running_or_notify_cancel():
            try:
                if failure is not None:
                    raise failure
                future.set_result(finish(batch, encoder(batch)))
            except BaseException as error:  # handed to the thread that waits on the future
                future.set_exception(error)


def main() -> None:
    """A helper: serve batches from stdin to stdout until the parent closes stdin."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    encode_batch = batch_encoder(read_spec(stdin))
    stdout.write(_SIZE.pack(READY))
    stdout.flush()
    while (batch := read_batch(stdin)) is not None:
        starts, ends, data = batch
        write_encoded(stdout, encode_texts(encode_batch, data, starts, ends))


if __name__ == "__main__":
    main()
