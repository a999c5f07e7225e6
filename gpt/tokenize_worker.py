"""The tokenize stage's encoder: GPT-2 BPE over a batch of raw UTF-8 texts, in this process
or in a helper process that `gpt.tokenizer.tokenize_parquet` feeds over pipes.

A helper runs this file as a script (`python -P gpt/tokenize_worker.py`), so it imports only
tiktoken and the standard library (no numpy, pyarrow, project package or the caller's
`__main__`, which a Prefect run would be) and is ready in ~0.1 s. The parent sends the
encoding's arguments once (so the vocabulary files are read and checked once, by the
parent), then batches; the helper answers each batch in order and exits at end of input.

Frames, native byte order (parent and helper are the same machine):

    parent → helper   once:       u64 size, pickle of the tiktoken.Encoding keyword arguments
                      per batch:  u64 n, u64 data size, n × i64 start, n × i64 end, data
    helper → parent   per batch:  u64 n, u64 tokens, n × u32 tokens per text (EOT not counted),
                                  n × i64 UTF-8 bytes per text (after repair), n × u8 invalid-UTF-8 flag,
                                  tokens × u32: EOT, text 0, EOT, text 1, …

The pickle comes from the parent that started the helper, over its own pipe.
"""

from __future__ import annotations

import pickle
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import tiktoken

EOT = 50256  # <|endoftext|>, written before every text
_EOT_U32 = array("I", [EOT]).tobytes()
_HEADER = struct.Struct("=QQ")


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


def encode_texts(encode: Callable[[str], Any], data: memoryview, starts: Sequence[int], ends: Sequence[int]) -> tuple[array, array, bytes, bytearray]:
    """Decode and encode data[start:end] for each text: (tokens per text, UTF-8 bytes per text
    after repair, invalid-UTF-8 flags, uint32 tokens with EOT before every text). Invalid UTF-8
    (e.g. lone surrogates written as bytes) is decoded with replacement characters."""
    lengths, sizes, invalid, tokens = array("I"), array("q"), bytearray(len(starts)), bytearray()
    for i, (start, end) in enumerate(zip(starts, ends)):
        raw = data[start:end]
        try:
            text = str(raw, "utf-8")
            sizes.append(end - start)
        except UnicodeDecodeError:
            text = str(raw, "utf-8", "replace")
            sizes.append(len(text.encode("utf-8")))
            invalid[i] = 1
        encoded = memoryview(encode(text))
        lengths.append(encoded.nbytes // 4)  # not len(): tiktoken's buffer reports its shape in bytes
        tokens += _EOT_U32
        tokens += encoded
    return lengths, sizes, bytes(invalid), tokens


def _read_exactly(stream: Any, size: int, end_ok: bool = False) -> bytes | None:
    """size bytes from stream; None at a clean end of input when end_ok."""
    data = stream.read(size)
    if len(data) == size:
        return data
    if end_ok and not data:
        return None
    raise EOFError(f"tokenize worker pipe: expected {size} bytes, got {len(data)}")


def main() -> None:
    """Serve batches from stdin to stdout until the parent closes stdin."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    (size,) = struct.unpack("=Q", _read_exactly(stdin, 8))
    encode = buffer_encoder(new_encoding(pickle.loads(_read_exactly(stdin, size))))
    while (header := _read_exactly(stdin, _HEADER.size, end_ok=True)) is not None:
        count, data_size = _HEADER.unpack(header)
        spans = array("q", _read_exactly(stdin, 16 * count))
        data = memoryview(_read_exactly(stdin, data_size))
        lengths, sizes, invalid, tokens = encode_texts(encode, data, spans[:count], spans[count:])
        stdout.write(_HEADER.pack(count, len(tokens) // 4))
        for part in (lengths, sizes, invalid, tokens):
            stdout.write(part)
        stdout.flush()


if __name__ == "__main__":
    main()
