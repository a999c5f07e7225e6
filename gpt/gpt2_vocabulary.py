"""GPT-2's vocabulary from the bytes of `encoder.json`: every token's bytes in rank order, and
tiktoken's keyword arguments for GPT-2 built from them.

Standard library and tiktoken only, so the tokenize stage's helper processes (which run
gpt/tokenize_worker.py as a script and import no project config) build tiktoken's GPT-2
from the same code as this process does. Checking the file's sha256 is gpt/encoding.py's job.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

EOT = 50256  # <|endoftext|>
EOT_TEXT = "<|endoftext|>"
N_VOCAB = 50257


class VocabularyFileError(ValueError):
    """encoder.json is not GPT-2's; the message is one line."""


def byte_of_character() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character `encoder.json` writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = [byte for byte in range(256) if byte not in printable]
    characters = {byte: chr(byte) for byte in printable} | {byte: chr(256 + i) for i, byte in enumerate(stand_ins)}
    return {character: byte for byte, character in characters.items()}


def token_bytes(encoder_json: bytes) -> tuple[bytes, tuple[int, ...]]:
    """Every token but "<|endoftext|>" as bytes, in rank order: (their bytes joined, the start
    of each and the end). `encoder.json`'s characters stand for bytes, one each, so all tokens
    are translated at once (~0.03 s)."""
    vocab = json.loads(encoder_json)
    vocab.pop(EOT_TEXT, None)
    tokens = list(vocab)  # the file lists them in rank order; sorted only if it does not
    if list(vocab.values()) != list(range(len(tokens))):
        tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[token] for token in tokens] != list(range(len(tokens))):
        raise VocabularyFileError("encoder.json does not number its tokens 0..n-1")
    to_byte = {ord(character): byte for character, byte in byte_of_character().items()}
    joined = "".join(tokens).translate(to_byte).encode("latin-1")
    return joined, tuple(itertools.accumulate((len(token) for token in tokens), initial=0))


def tiktoken_arguments(encoder_json: bytes) -> dict[str, Any]:
    """tiktoken.Encoding's keyword arguments for GPT-2: `encoder.json`'s tokens turned back into
    bytes are the ranks tiktoken's data_gym_to_mergeable_bpe_ranks derives from `vocab.bpe`
    (tests/test_tokenizer.py checks they agree), in ~0.04 s instead of ~0.3 s."""
    from tiktoken_ext.openai_public import r50k_pat_str

    joined, starts = token_bytes(encoder_json)
    ranks = {joined[starts[rank] : starts[rank + 1]]: rank for rank in range(len(starts) - 1)}
    return {"name": "gpt2", "pat_str": r50k_pat_str, "mergeable_ranks": ranks, "special_tokens": {EOT_TEXT: EOT},
            "explicit_n_vocab": N_VOCAB}
