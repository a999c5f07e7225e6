"""The tokenize stage's encoders: GPT-2 BPE over batches of raw UTF-8 texts, in this process and
in helper processes that run this file, with the pipe protocol between them and the pool that
shares the batches out.

A helper runs this file as a script (`python -P gpt/tokenize_worker.py`), so this module imports
only tiktoken and the standard library (no numpy, pyarrow, project package, or the caller's
`__main__`, which a Prefect run would be) and a helper is ready in ~0.1 s. The parent sends the
encoding's arguments once (the vocabulary files are read and checked once, by the parent), then
batches; the helper answers each batch in order and exits at the end of its input.

Frames, native byte order (parent and helper are the same machine):

    parent → helper   once:       u64 size, pickle of the tiktoken.Encoding keyword arguments
                      per batch:  u64 n, u64 data size, n × i64 start, n × i64 end, data
    helper → parent   per batch:  u64 n, u64 tokens, n × u32 tokens per text (EOT not counted),
                                  n × i64 UTF-8 bytes per text (after repair), n × u8 invalid-UTF-8 flag,
                                  tokens × u32: EOT, text 0, EOT, text 1, …

The pickle comes from the parent that started the helper, over its own pipe.
"""

from __future__ import annotations

import contextlib
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

import tiktoken

EOT_TEXT = "<|endoftext|>"  # its id comes with the encoding's arguments
JOBS_IN_FLIGHT_PER_WORKER = 4  # bounds memory; enough that a slow job at the head does not idle the others
_HEADER = struct.Struct("=QQ")
_SIZE = struct.Struct("=Q")

Result = TypeVar("Result")


class Batch(Protocol):
    """What an encoder reads from a job: text bytes, and int64 buffers of each text's span in them."""

    data: Any
    starts: Any
    ends: Any


class Encoded(NamedTuple):
    """An encoder's answer for one batch of n texts, as buffers (numpy reads them without a copy)."""

    lengths: Any  # n × u32: tokens per text, EOT not counted
    sizes: Any  # n × i64: UTF-8 bytes per text, after repair
    invalid: Any  # n × u8: 1 where the text was not valid UTF-8
    tokens: Any  # u32: EOT, text 0, EOT, text 1, …


class EncoderFailed(Exception):
    """A helper process died or answered out of turn; the message is one line."""


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


def new_encoding(arguments: dict[str, Any]) -> tiktoken.Encoding:
    """A fresh tiktoken.Encoding (its own regex caches: tiktoken's regex runs ~1.5× slower on
    a thread other than the first one to use an encoding, so each encoding thread builds its own)."""
    return tiktoken.Encoding(**arguments)


def buffer_encoder(enc: tiktoken.Encoding) -> Callable[[str], Any]:
    """enc.encode_ordinary, returning a buffer of uint32 tokens instead of a list of Python ints
    (~15% less CPU). Special-token text ("<|endoftext|>" in a document) is ordinary text, as in
    encode_ordinary; this is what tiktoken's public encode_to_numpy calls, minus numpy."""
    core = enc._core_bpe
    if hasattr(core, "encode_to_tiktoken_buffer"):  # tiktoken >= 0.8
        no_special: set[str] = set()
        return lambda text: core.encode_to_tiktoken_buffer(text, no_special)
    return lambda text: array("I", enc.encode_ordinary(text))


def encode_texts(encode: Callable[[str], Any], eot: int, data: memoryview, starts: Iterable[int], ends: Iterable[int]) -> Encoded:
    """Decode and encode data[start:end] for each text, with `eot` before every text. Invalid
    UTF-8 (e.g. lone surrogates written as bytes) is decoded with replacement characters."""
    eot_bytes = array("I", [eot]).tobytes()
    lengths, sizes, invalid, tokens = array("I"), array("q"), bytearray(), bytearray()
    for start, end in zip(starts, ends):
        raw = data[start:end]
        try:
            text = str(raw, "utf-8")
            sizes.append(end - start)
            invalid.append(0)
        except UnicodeDecodeError:
            text = str(raw, "utf-8", "replace")
            sizes.append(len(text.encode("utf-8")))
            invalid.append(1)
        encoded = memoryview(encode(text))
        lengths.append(encoded.nbytes // 4)  # not len(): tiktoken's buffer reports its shape in bytes
        tokens += eot_bytes
        tokens += encoded
    return Encoded(lengths, sizes, bytes(invalid), tokens)


def _int64s(buffer: Any) -> memoryview:
    """An int64 buffer (a numpy array, an array('q'), bytes) as a sequence of Python ints."""
    return memoryview(buffer).cast("B").cast("q")


# ---------------------------------------------------------------------------------------
# The pipe protocol, both ends
# ---------------------------------------------------------------------------------------


def write_arguments(stream: Any, arguments: dict[str, Any]) -> None:
    payload = pickle.dumps(arguments, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_SIZE.pack(len(payload)) + payload)


def read_arguments(stream: Any) -> dict[str, Any]:
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
    """Encodes batches in this process, on the one thread that calls it. Its encoding is its
    own: tiktoken's regex runs ~1.5× slower on any thread but the first to use an encoding,
    and the caller's thread may have used a shared one first."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.arguments = arguments
        self.encode: Callable[[str], Any] | None = None

    def __call__(self, batch: Batch) -> Encoded:
        if self.encode is None:  # built on the thread that will use it
            self.encode = buffer_encoder(new_encoding(self.arguments))
        eot = self.arguments["special_tokens"][EOT_TEXT]
        return encode_texts(self.encode, eot, memoryview(batch.data), _int64s(batch.starts), _int64s(batch.ends))

    def close(self, kill: bool = False) -> None:
        pass


class HelperProcess:
    """Encodes batches in a helper process running this file, fed over its stdin and stdout,
    one batch at a time. A fresh interpreter runs nothing of the caller's (a fork would copy a
    caller's threads mid-flight; multiprocessing's spawn would import the caller's __main__)."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        self.arguments = arguments
        self.errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty helper cannot block
        self.process = subprocess.Popen([sys.executable, "-P", __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.errors)
        self.started = False

    def __call__(self, batch: Batch) -> Encoded:
        try:
            if not self.started:  # the encoding's arguments once (~0.6 MB pickled), sent on the encoder's thread
                write_arguments(self.process.stdin, self.arguments)
                self.started = True
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
        if kill:
            self.process.kill()
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # end of input: the helper exits
        self.process.wait()
        self.process.stdout.close()
        self.errors.close()


def encoded_in_order(batches: Iterator[Batch], num_workers: int, arguments: dict[str, Any],
                     finish: Callable[[Batch, Encoded], Result]) -> Iterator[Result]:
    """finish(batch, its encoding) for each batch, in batch order, encoded by num_workers encoders.

    One encoder is this process, on a thread of its own while the calling thread reads the
    input and writes the output; the others are helper processes, each driven by a thread
    here. Whichever encoder is free takes the next batch; `finish` runs on that encoder's
    thread. At most JOBS_IN_FLIGHT_PER_WORKER batches per worker are in flight, so memory
    does not grow with the input.
    """
    if num_workers == 1:
        encoder = InProcessEncoder(arguments)
        for batch in batches:
            yield finish(batch, encoder(batch))
        return
    encoders: list[Any] = [InProcessEncoder(arguments)]
    pending: queue.SimpleQueue = queue.SimpleQueue()
    window: deque[Future] = deque()
    threads: list[threading.Thread] = []
    finished = False
    try:
        encoders += [HelperProcess(arguments) for _ in range(num_workers - 1)]
        for i, encoder in enumerate(encoders):
            threads.append(threading.Thread(target=_serve, args=(encoder, pending, finish), name=f"tokenize-{i}", daemon=True))
            threads[-1].start()
        for batch in batches:
            window.append(Future())
            pending.put((batch, window[-1]))
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


def _serve(encoder: Any, pending: queue.SimpleQueue, finish: Callable[[Batch, Encoded], Any]) -> None:
    """An encoder's thread: take the next batch (whoever is free takes it), answer its future."""
    while (item := pending.get()) is not None:
        batch, future = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(finish(batch, encoder(batch)))
            except BaseException as error:  # handed to the thread that waits on the future
                future.set_exception(error)


def main() -> None:
    """A helper: serve batches from stdin to stdout until the parent closes stdin."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    arguments = read_arguments(stdin)
    encode, eot = buffer_encoder(new_encoding(arguments)), arguments["special_tokens"][EOT_TEXT]
    while (batch := read_batch(stdin)) is not None:
        starts, ends, data = batch
        write_encoded(stdout, encode_texts(encode, eot, data, starts, ends))


if __name__ == "__main__":
    main()
