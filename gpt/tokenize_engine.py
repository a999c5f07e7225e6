"""Which BPE engine encodes the tokenize stage's documents, with tiktoken as the referee.

`native` is the project's own C encoder (gpt/native_bpe.py, gpt/native/gpt2_bpe.c): tiktoken's
`encode_ordinary`, written out for GPT-2 alone, ~7× tiktoken per core and ready in milliseconds;
it is compiled on first use and needs a C compiler. `fastokens` (a Rust BPE engine, ~8×
tiktoken per core, but ~0.3 s to load) runs from a GPT-2 `tokenizer.json` written here, in
memory. Both are built from the same sha256-checked `encoder.json` and `vocab.bpe` that
tiktoken's GPT-2 is built from (gpt/encoding.py), with "<|endoftext|>" in a document as
ordinary text, as in tiktoken's `encode_ordinary`. Nothing is downloaded.

An engine is trusted only once it passes a self-check (the native engine's runs beside its
first batches, and nothing it encoded is kept if it fails): a fixed battery of hard strings
(contractions after tabs, U+180E and every other space-like character, emoji sequences,
"<|endoftext|>" as text, long whitespace runs, all scripts and categories) whose ids must equal
tiktoken's. `auto` takes the first of native, fastokens that can be used and passes,
tiktoken otherwise (with a one-line warning naming why); an engine asked for by name and
unusable is a one-line error. The stage then re-encodes a seeded sample of documents with
tiktoken (`tokenize.verify_fraction`) and every document whose count disagrees with FineWeb's
`token_count` (gpt/tokenizer.py), so a shard's bytes never depend on the engine: the engine is
not part of the artifact's version.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import tiktoken

from configs.errors import UserError
from gpt import native_bpe
from gpt.encoding import gpt2_encoding, gpt2_encoding_arguments, gpt2_file
from gpt.tokenize_worker import ONE_CORE_ENV, fastokens_batch_encoder

ENGINES = ("auto", "native", "fastokens", "tiktoken")
AUTO_ORDER = ("native", "fastokens")  # what `auto` tries, fastest first, before tiktoken
FASTOKENS_REQUIREMENT = "fastokens==0.3.5"  # the version checked against tiktoken on FineWeb, fuzzed text and every code point


class EngineError(UserError):
    """The engine asked for cannot be used; the message is one line naming the fix."""


class SelfCheckFailure(EngineError):
    """An engine's ids differ from tiktoken's on the self-check; the message is one line."""


class EngineFallbackWarning(UserWarning):
    """`tokenize.engine: auto` passed over a faster engine it could not use."""


@dataclass(frozen=True)
class Engine:
    """A checked engine: what every encoder (this process's and each helper's) builds itself from."""

    name: str  # "native", "fastokens" or "tiktoken"
    version: str
    spec: dict[str, Any] = field(repr=False)  # picklable, sent to helper processes (gpt/tokenize_worker.py)
    tokenizer: Any = field(default=None, repr=False, compare=False)  # the native or fastokens tokenizer, loaded in this process
    deferred_check: Callable[[], None] | None = field(default=None, repr=False, compare=False)  # select_engine's check_later

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def self_check(self) -> None:
        """Run the self-check left for later, if any; SelfCheckFailure if the engine fails it."""
        if self.deferred_check is not None:
            self.deferred_check()


def referee() -> tiktoken.Encoding:
    """The encoding every engine is checked against: tiktoken's GPT-2."""
    return gpt2_encoding()


def referee_label() -> str:
    return f"tiktoken {tiktoken.__version__}"


# ---------------------------------------------------------------------------------------
# GPT-2 as a tokenizer.json, and fastokens
# ---------------------------------------------------------------------------------------


def gpt2_tokenizer_json() -> str:
    """GPT-2 in HuggingFace's tokenizer.json format, from the checked vocabulary files: BPE with
    `encoder.json` as its vocabulary (already in GPT-2's byte-level alphabet) and `vocab.bpe`'s
    merges in order; a byte-level pre-tokenizer with GPT-2's regex and no prefix space; no
    normalizer, no post-processor, no added tokens. Built in ~0.03 s, so it is not cached."""
    merges = [line for line in gpt2_file("vocab.bpe").decode("utf-8").split("\n")[1:] if line]  # line 0: "#version: 0.2"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
             "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": "@VOCAB@", "merges": merges}
    document = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level, "model": model}
    vocabulary = gpt2_file("encoder.json").decode("utf-8")  # already JSON: spliced in as it is
    return json.dumps(document, ensure_ascii=False).replace('"@VOCAB@"', vocabulary, 1)


def _import_fastokens() -> ModuleType:
    """The fastokens package (ImportError when it is not installed)."""
    import fastokens

    return fastokens


def _fastokens_version() -> str:
    try:
        return importlib.metadata.version("fastokens")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------
# The self-check
# ---------------------------------------------------------------------------------------

# Characters that regex engines and Unicode versions disagree on as whitespace, letters or
# neither: U+180E (a space before Unicode 6.3), zero-widths, the BOM, NEL, line and paragraph
# separators, every Unicode White_Space character.
SPACE_LIKE = ("\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f\x85\xa0\u1680\u180e\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
              "\u2008\u2009\u200a\u200b\u200c\u200d\u2028\u2029\u202f\u205f\u2060\u3000\ufeff")

SELF_CHECK_TEXTS = (
    "Hello world",
    "\tI'm\tyou're\the'll\tthey've\tshe'd\tit's\tdon't\tI'M\tIt’s\t'tis\t''s",  # contractions after tabs; upper case, curly and doubled
    "x's y'S z't 's 't 're 've 'm 'll 'd \t's\n're \u180e's",
    "a\u180eb \u180e\u180e z\u180e \u180ex\t\u180e\n\u180e'll 1\u180e2",  # U+180E MONGOLIAN VOWEL SEPARATOR
    "<|endoftext|> is plain text: <|endoftext|><|endoftext|> <|endoftext |>endoftext|>",
    " " * 300 + "x" + "\n" * 64 + "\t \t" * 40 + "  y  \n" + " \u3000" * 20 + "\r\n" * 30 + "   ",  # long whitespace runs
    "   leading and trailing   ",
    "👩‍👩‍👧‍👦 🇺🇸🇫🇷🇯🇵 👍🏽👍🏿 ❤️ 1️⃣ #️⃣ 🏳️‍🌈 🧑🏻‍🤝‍🧑🏿 😀😃😄 \U0001f600\ufe0f",  # ZWJ sequences, flags, skin tones, keycaps
    "1234567890 3.14159 -0.5e-10 1,000,000 ١٢٣٤ ४५६ ௧௨ ⅷ ½ ² 𝟙𝟚 ①",  # digits of many scripts, number-likes
    "東京タワー 한국어 العربية עִבְרִית हिन्दी ไทย Ελληνικά русский ქართული ᠮᠣᠩᠭᠣᠯ 𓀀𓀁",
    "e\u0301 a\u0308\u0304 Z\u0351\u0352\u0353 \u0301alone \u20dd ก\u0e31\u0e49 क\u094d\u200dष",  # combining marks
    "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x80\x9f\xad\u061c\u200e\u200f\u202a\u202e\u2066",  # controls, format characters
    "\U0010ffff\U000e0001\U000e007f\ufffd\uffff\ufffe\ue000\U000f0000 \U0001d11e\U0001f9ff",  # planes 1-16, private use, non-characters
    "http://example.com/a_b-c?d=e&f=%20#g user@example.org C:\\Windows\\ ~/.bashrc $HOME",
    "def f(x):\n\treturn x**2  # comment\n\n\n    if a != b: pass\n}}}]])))",
    "ALLCAPS camelCase snake_case kebab-case Title Case MiXeD ß ẞ ǅ ﬁ ﬀ İ ı",
    "...!!!???---___***///\\\\\\|||@@@###$$$%%%^^^&&&(((",
    "a" * 200 + " " + "ab" * 150 + " " + "🙂" * 50,  # long words
    "".join(f"a{c}b {c}{c}x{c}'s\t{c}1 " for c in SPACE_LIKE),  # each space-like character, between letters, runs, before contractions
)


def referee_ids(texts: list[str]) -> list[list[int]]:
    """tiktoken's ids for each text: what every engine's must equal."""
    encoding = referee()
    return [encoding.encode_ordinary(text) for text in texts]


def self_check_difference(encode_batch: Any) -> str | None:
    """Where an engine's batch encoder first disagrees with tiktoken on SELF_CHECK_TEXTS, or None."""
    tokens, lengths = encode_batch(list(SELF_CHECK_TEXTS))
    tokens = memoryview(tokens).cast("B").cast("I")
    start = 0
    for text, length, expected in zip(SELF_CHECK_TEXTS, lengths, referee_ids(list(SELF_CHECK_TEXTS))):
        got = tokens[start : start + length].tolist()
        start += length
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            return f"{text[:40]!r}: token {at} is {got[at:at + 1]} where tiktoken has {expected[at:at + 1]}"
    return None


# ---------------------------------------------------------------------------------------
# Choosing the engine
# ---------------------------------------------------------------------------------------


@functools.cache
def engine_spec(name: str) -> dict[str, Any]:
    """What an encoder builds the engine from (once per process; sent to each helper)."""
    if name == "native":  # threads of this process only: no helper process runs it
        return {"engine": "native"}
    if name == "fastokens":
        return {"engine": "fastokens", "tokenizer_json": gpt2_tokenizer_json()}
    return {"engine": "tiktoken", "arguments": gpt2_encoding_arguments()}


def planned_engine(requested: str) -> str:
    """The engine select_engine(requested) will most likely give, known at once (no load, no
    check), so helper processes can start building it while this process checks its own."""
    if requested in _chosen:
        return _chosen[requested]
    if requested == "auto":
        if native_bpe.can_build() and "native" not in _refused:
            return "native"
        try:
            _import_fastokens()
        except ImportError:
            return "tiktoken"
        return "fastokens"
    return requested


def tiktoken_engine() -> Engine:
    return Engine("tiktoken", tiktoken.__version__, engine_spec("tiktoken"))


def native_engine(check_later: bool = False) -> Engine:
    """The project's C engine, compiled if it is not cached, and self-checked. EngineError if it
    cannot be used. With `check_later` it is returned at once (~5 ms) with its self-check left
    for the caller to run (`Engine.self_check`, SelfCheckFailure if it fails): the check needs
    tiktoken, whose start takes ~0.08 s, so the stage runs it on a thread beside its encoders
    and fails, removing its shards, if it fails."""
    try:
        tokenizer = native_bpe.NativeBpe(native_bpe.build_library())
    except native_bpe.NativeBuildError as error:
        raise EngineError(str(error)) from None
    version = native_bpe.source_digest()

    def self_check() -> None:
        difference = self_check_difference(tokenizer.encode_batch)
        if difference is not None:
            _refused["native"] = (f"native {version} is not exactly GPT-2 on the self-check ({difference}); "
                                  "set tokenize.engine=fastokens or tiktoken, and report it")
            raise SelfCheckFailure(_refused["native"])

    if not check_later:
        self_check()
    return Engine("native", version, engine_spec("native"), tokenizer, self_check if check_later else None)


def fastokens_engine() -> Engine:
    """fastokens from GPT-2's tokenizer.json, after the self-check. Its ~0.3 s load (no GIL)
    overlaps with tiktoken's start, which the check needs. EngineError if it cannot be used."""
    try:
        fastokens = _import_fastokens()
    except ImportError as error:
        raise EngineError(f"fastokens is not installed ({error}); pip install {FASTOKENS_REQUIREMENT}, "
                          "or set tokenize.engine=tiktoken") from None
    spec = engine_spec("fastokens")
    # One thread per encoder, as in the helpers: on batches like ours fastokens' own worker thread
    # only adds hand-offs (measured ~20% slower, no parallel gain on 2 cores) and a second set of
    # word caches; parallelism comes from helper processes. Read at its first encode; a value
    # set by the user stands.
    os.environ.setdefault("FASTOKENS_BPE_THREADS", ONE_CORE_ENV["FASTOKENS_BPE_THREADS"])
    loaded: dict[str, Any] = {}

    def load() -> None:
        try:
            loaded["tokenizer"] = fastokens.Tokenizer.from_json_str(spec["tokenizer_json"])
        except Exception as error:  # noqa: BLE001 - any failure of a third-party engine is reported in one line
            loaded["error"] = error

    loader = threading.Thread(target=load, name="fastokens-load")
    loader.start()
    referee()  # tiktoken's start, while fastokens loads
    loader.join()
    version = _fastokens_version()
    if "error" in loaded:
        first_line = (str(loaded["error"]).splitlines() or [type(loaded["error"]).__name__])[0]
        raise EngineError(f"fastokens {version} cannot load GPT-2's tokenizer.json ({first_line}); "
                          f"pip install {FASTOKENS_REQUIREMENT}, or set tokenize.engine=tiktoken")
    difference = self_check_difference(fastokens_batch_encoder(loaded["tokenizer"]))
    if difference is not None:
        raise EngineError(f"fastokens {version} is not exactly GPT-2 on the self-check ({difference}); "
                          f"pip install {FASTOKENS_REQUIREMENT}, or set tokenize.engine=tiktoken")
    return Engine("fastokens", version, spec, loaded["tokenizer"])


_chosen: dict[str, str] = {}  # tokenize.engine → the engine select_engine gave for it in this process
_refused: dict[str, str] = {}  # engine → why it failed a self-check that ran while it encoded: `auto` passes it over


@functools.cache
def select_engine(requested: str = "auto", check_later: bool = False) -> Engine:
    """The engine `tokenize.engine` names, checked, once per process (a loaded engine is
    reused by later calls). `auto`: the first of AUTO_ORDER that passes, else tiktoken; a
    warning names why each faster engine was passed over. `check_later`: the native engine
    is returned before its self-check (see native_engine); the caller runs `Engine.self_check`."""
    if requested not in ENGINES:
        raise EngineError(f"tokenize.engine is {requested!r}; use one of {', '.join(ENGINES)}")
    builders = {"native": functools.partial(native_engine, check_later), "fastokens": fastokens_engine,
                "tiktoken": tiktoken_engine}
    if requested != "auto":
        engine = builders[requested]()
    else:
        passed_over = []
        for name in AUTO_ORDER:
            if name in _refused:
                passed_over.append(_refused[name])
                continue
            try:
                engine = builders[name]()
                break
            except EngineError as error:
                passed_over.append(str(error))
        else:
            engine = tiktoken_engine()
        if passed_over:
            warnings.warn(f"tokenize.engine=auto uses {engine.name}: {' / '.join(passed_over)}", EngineFallbackWarning, stacklevel=2)
    _chosen[requested] = engine.name
    return engine


def choose_again() -> None:
    """Choose on the next call as if for the first time, but for engines refused after a late self-check."""
    select_engine.cache_clear()
    _chosen.clear()


def forget_engines() -> None:
    """Choose again on the next call, refused engines included (for tests that change what is installed)."""
    choose_again()
    _refused.clear()
