"""The native C engine (gpt/native_bpe.py): exactly tiktoken's GPT-2 ids on FineWeb, fuzzed
text and every code point in several contexts; invalid UTF-8 judged as Python judges it and
repaired as the other engines repair it; one table shared by threads; the library built once
per source and a missing compiler reported in one line, with `auto` moving on; and a wrong
engine (fault-injected into the real one) caught by its self-check, which the stage runs
beside its first batches, or by `verify_fraction`, with no shard left behind."""

import random
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.schema import TokenizeConfig
from gpt import native_bpe
from gpt.encoding import gpt2_encoding, gpt2_encoding_arguments
from gpt.tokenize_engine import EngineError, EngineFallbackWarning, SelfCheckFailure, forget_engines, select_engine
from gpt.tokenizer import EngineMismatch, is_verified_document, tokenize_parquet
from tests.test_tokenize_engine import SAMPLE, _shards, adversarial_texts


@pytest.fixture(scope="module")
def native():
    return native_bpe.NativeBpe(native_bpe.build_library())


def _differing(native, texts: list[str]) -> list[str]:
    tokens, lengths = native.encode_batch(texts)
    ends = np.cumsum(lengths, dtype=np.int64)
    expected = gpt2_encoding().encode_ordinary_batch(texts, num_threads=2)
    return [text for text, end, length, want in zip(texts, ends, lengths, expected) if tokens[end - length : end].tolist() != want]


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared FineWeb sample not present")
def test_exactly_tiktoken_on_the_fineweb_sample(native):
    texts = pq.read_table(SAMPLE, columns=["text"])["text"].to_pylist()
    assert len(texts) == 2800 and not _differing(native, texts)


def test_exactly_tiktoken_on_adversarial_text_and_every_code_point_in_context(native):
    everything = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = adversarial_texts(3000, seed=2)
    texts += ["".join(everything[i : i + 64]) for i in range(0, len(everything), 64)]  # every code point, in runs
    # every code point in each context: between letters, doubled before a contraction, after a tab, a digit, an
    # "other" character (whose run swallows an apostrophe), a space
    for context in ("a{c}b ", " {c}{c}'s", "\t{c} x", "1{c}\n", "!{c}'ll", " {c}1"):
        texts += ["".join(context.format(c=c) for c in everything[i : i + 256]) for i in range(0, len(everything), 256)]
    differing = _differing(native, texts)
    assert not differing, f"{len(differing)} of {len(texts)} differ, first {differing[0][:60]!r}"


def test_long_pieces_and_empty_texts(native):
    texts = ["", "a" * 5000, " " * 4000 + "x", "🙂" * 3000, "1" * 999, "\n" * 7 + "'s" * 500, "x"]
    assert not _differing(native, texts)
    tokens, lengths = native.encode_batch(texts)
    assert lengths[0] == 0 and lengths.sum() == len(tokens)


def _c_calls(native, monkeypatch) -> list[tuple[int, int, int]]:
    """(room, texts offered, texts taken) of each call the engine makes to C from now on."""
    calls = []
    real_batch = native.lib.gpt2_bpe_encode_batch

    def recorded(*arguments):
        written = real_batch(*arguments)
        calls.append((arguments[7], arguments[5], arguments[10]._obj.value))
        return written

    monkeypatch.setattr(native.lib, "gpt2_bpe_encode_batch", recorded)
    return calls


def test_a_batch_larger_than_one_calls_room_is_encoded_in_several_calls(native, monkeypatch):
    """The tokens buffer of one C call is kept small (TOKENS_PER_CALL); a batch that may need more
    is encoded in several calls, a text longer than the room in a call whose room is its size,
    and the ids are the same as in one call, invalid UTF-8 (repaired, then encoded again) included."""
    texts = adversarial_texts(300, seed=4) + ["", "a" * 5000, "🙂" * 3000, "x"]
    raw = [t.encode("utf-8", "surrogatepass") for t in texts] + [b"ok \xff\xfe bad", b"\xed\xa0\x80" * 700]
    ends = np.cumsum([len(r) for r in raw], dtype=np.int64)
    in_one_call = native.encode_spans(b"".join(raw), ends - [len(r) for r in raw], ends)
    monkeypatch.setattr(native_bpe, "TOKENS_PER_CALL", 2000)
    calls = _c_calls(native, monkeypatch)
    in_small_calls = native.encode_spans(b"".join(raw), ends - [len(r) for r in raw], ends)
    assert len(calls) > 10 and max(room for room, _, _ in calls) == 12000  # "🙂" * 3000: 12,000 bytes, so a room of its size
    assert all(a.tolist() == b.tolist() for a, b in zip(in_small_calls, in_one_call))
    assert in_one_call[2].sum() >= 2  # the invalid texts took the repair path
    assert not _differing(native, texts)
    assert native.encode_batch([])[0].tolist() == []


def test_a_text_exactly_as_long_as_the_room_left_is_encoded_in_that_call(native, monkeypatch):
    """The C call takes a text while the room left is at least its bytes: at exactly that, it fits."""
    monkeypatch.setattr(native_bpe, "TOKENS_PER_CALL", 8)
    calls = _c_calls(native, monkeypatch)
    texts = ["\x01\x02\x03", "\x04\x05\x06\x07\x08", "\t"]  # 3 + 5 bytes, each a token of its own: 8
    tokens, lengths = native.encode_batch(texts)
    assert [(offered, taken) for _, offered, taken in calls] == [(3, 2), (1, 1)] and lengths.tolist() == [3, 5, 1]
    assert tokens.tolist() == [t for text in texts for t in gpt2_encoding().encode_ordinary(text)]


def test_invalid_utf8_is_judged_as_python_judges_it_and_repaired(native):
    rng = random.Random(5)
    pieces = [b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xc2", b"\xe2\x82",
              b"\xff", b"\x80", b"\xef\xbf\xbd", b"\xf0\x9f\x98\x80", b"\xe2\x82\xac", b"plain 's ", b"\t", "é".encode()]
    texts = [b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    data = b"".join(texts)
    ends = np.cumsum([len(t) for t in texts], dtype=np.int64)
    lengths, sizes, invalid, tokens = native.encode_spans(data, ends - [len(t) for t in texts], ends)

    def is_valid(raw: bytes) -> bool:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert invalid.tolist() == [0 if is_valid(t) else 1 for t in texts] and 0 < invalid.sum() < len(texts)
    repaired = [t.decode("utf-8", "replace") for t in texts]
    assert sizes.tolist() == [len(r.encode()) for r in repaired]
    expected = gpt2_encoding().encode_ordinary_batch(repaired)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    assert [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))] == expected


def test_threads_share_one_table(native):
    texts = adversarial_texts(400, seed=3)
    alone = [t.tolist() for t in native.encode_batch(texts)]
    results = [None] * 4

    def encode(k):
        results[k] = [t.tolist() for t in native.encode_batch(texts)]

    threads = [threading.Thread(target=encode, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [alone] * 4


def test_the_library_is_built_once_per_source_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEWEB_NATIVE_CACHE", str(tmp_path))
    built = native_bpe.build_library()
    assert built.parent == tmp_path and native_bpe.source_digest() in built.name
    mtime = built.stat().st_mtime_ns
    assert native_bpe.build_library() == built and built.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no partial file left behind


def test_a_missing_or_failing_compiler_is_one_line_and_auto_moves_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEWEB_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(native_bpe.NativeBuildError, match="no C compiler .*install one .*tokenize.engine=fastokens or tiktoken") as error:
        native_bpe.build_library()
    assert "\n" not in str(error.value)
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(native_bpe.NativeBuildError, match="could not compile gpt2_bpe.c") as error:
        native_bpe.build_library()
    assert "\n" not in str(error.value) and not list((tmp_path / "cache").iterdir())

    forget_engines()
    try:
        with pytest.raises(EngineError, match="could not compile"):
            select_engine("native")
        with pytest.warns(EngineFallbackWarning, match=r"tokenize.engine=auto uses fastokens: false could not compile"):
            assert select_engine("auto").name == "fastokens"
    finally:
        forget_engines()


def test_a_tiktoken_of_another_unicode_version_is_refused_in_one_line(monkeypatch, fresh):
    monkeypatch.setattr(native_bpe.tiktoken, "__version__", "0.99.0")  # its regex engine may class characters otherwise
    with pytest.raises(EngineError, match=r"Unicode classes come from tiktoken 0\.14\.0, this is tiktoken 0\.99\.0; "
                                          r"pip install tiktoken==0\.14\.0") as error:
        select_engine("native")
    assert "\n" not in str(error.value)


def test_auto_chooses_native_and_records_its_source(tmp_path):
    forget_engines()
    try:
        engine = select_engine("auto")
    finally:
        forget_engines()
    assert (engine.name, engine.version) == ("native", native_bpe.source_digest()) and engine.label.startswith("native ")


def test_the_c_table_holds_every_gpt2_token_as_tiktoken_has_it(native):
    """C reads encoder.json itself (JSON escapes, the byte-level alphabet): every rank's bytes are tiktoken's."""
    ranks = gpt2_encoding_arguments()["mergeable_ranks"]
    assert len(ranks) == 50256
    assert all(native.token_bytes(rank) == token for token, rank in ranks.items())


# ---------------------------------------------------------------------------------------
# A wrong native engine is caught, though its self-check runs beside its first batches
# ---------------------------------------------------------------------------------------


def _docs(tmp_path, texts: list[str]) -> Path:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=50)
    return path


def _wrong_on(monkeypatch, marker: str) -> None:
    """The real C engine, made to change the last id of every text holding `marker`."""
    real_spans, real_batch = native_bpe.NativeBpe.encode_spans, native_bpe.NativeBpe.encode_batch

    def change(texts_of, lengths, tokens):
        tokens, ends = np.array(tokens, np.uint32), np.cumsum(lengths, dtype=np.int64)
        for k, text in enumerate(texts_of):
            if marker in text and lengths[k]:
                tokens[ends[k] - 1] = (tokens[ends[k] - 1] + 1) % 50000
        return tokens

    def encode_spans(self, data, starts, ends):
        lengths, sizes, invalid, tokens = real_spans(self, data, starts, ends)
        view = memoryview(data)
        texts = [str(view[s:e], "utf-8", "replace") for s, e in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist())]
        return lengths, sizes, invalid, change(texts, lengths, tokens)

    def encode_batch(self, texts):
        tokens, lengths = real_batch(self, texts)
        return change(texts, lengths, tokens), lengths

    monkeypatch.setattr(native_bpe.NativeBpe, "encode_spans", encode_spans)
    monkeypatch.setattr(native_bpe.NativeBpe, "encode_batch", encode_batch)


@pytest.fixture
def fresh():
    forget_engines()
    yield
    forget_engines()


def test_a_native_engine_failing_its_late_self_check_writes_nothing_and_auto_moves_on(tmp_path, monkeypatch, fresh):
    _wrong_on(monkeypatch, "\u180e")
    path = _docs(tmp_path, [f"document {i} with\tit's" for i in range(300)])
    config = TokenizeConfig(engine="native", val_fraction=0.1, shard_tokens=1024, num_workers=2)
    for verify_fraction in (0.01, 0.0):  # without a sample to hand over, the encoders still stop on the failure
        with pytest.raises(SelfCheckFailure, match=r"native \w+ is not exactly GPT-2 on the self-check .*tokenize.engine=fastokens") as error:
            tokenize_parquet([path], tmp_path / f"native-{verify_fraction}", config.model_copy(update={"verify_fraction": verify_fraction}))
        assert "\n" not in str(error.value) and not list((tmp_path / f"native-{verify_fraction}").glob("*.bin"))

    forget_engines()
    with pytest.warns(EngineFallbackWarning, match=r"tokenize.engine=auto uses fastokens: native \w+ is not exactly GPT-2"):
        manifest = tokenize_parquet([path], tmp_path / "auto", config.model_copy(update={"engine": "auto"}))
    assert manifest["engine"].startswith("fastokens ")
    tokenize_parquet([path], tmp_path / "tiktoken", config.model_copy(update={"engine": "tiktoken"}))
    assert _shards(tmp_path / "auto") == _shards(tmp_path / "tiktoken")


def test_verify_fraction_catches_a_native_engine_that_differs_on_a_document(tmp_path, monkeypatch, fresh):
    _wrong_on(monkeypatch, "zebracorn")
    texts = [f"plain document number {i}." for i in range(300)]
    texts[203] = "the zebracorn document"
    path = _docs(tmp_path, texts)
    config = TokenizeConfig(engine="native", val_fraction=0.1, shard_tokens=1024, num_workers=2, verify_fraction=1.0)
    with pytest.raises(EngineMismatch, match=r"native \w+ and the referee tiktoken \S+ differ on row 203 of .*docs\.parquet") as error:
        tokenize_parquet([path], tmp_path / "out", config)
    assert "\n" not in str(error.value) and not list((tmp_path / "out").glob("*.bin"))
    manifest = tokenize_parquet([path], tmp_path / "sampled", config.model_copy(update={"verify_fraction": 0.2}))
    drawn = sum(is_verified_document(config.seed, "0", row, 0.2) for row in range(300))  # a seeded sample (it misses row 203)
    assert manifest["verified_documents"] == drawn
