"""The tokenize stage's BPE engines: fastokens exactly GPT-2 (tiktoken referees it; the native
engine's own exactness is tests/test_native_bpe.py), shards byte-identical whichever engine or
worker count made them, `auto` falling back to tiktoken, and a wrong engine caught by the
self-check, by `verify_fraction` and by FineWeb's counts.

A wrong engine is made by fault injection: the real fastokens, wrapped so that it changes the
ids of some texts, handed to the stage through the loader the engine module imports it with.
"""

import json
import random
from array import array
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.schema import ConfigError, TokenizeConfig, load_config
from gpt import tokenize_engine, tokenizer
from gpt.encoding import gpt2_encoding
from gpt.tokenize_engine import EngineError, EngineFallbackWarning, forget_engines, select_engine
from gpt.tokenize_worker import fastokens_batch_encoder
from gpt.tokenizer import EngineMismatch, tokenize_parquet
from storage.demo_corpus import build_demo_corpus
from storage.versions import plan_tokenize, plan_tokenize_files

fastokens = pytest.importorskip("fastokens", reason="fastokens is not installed: only tiktoken can be tested")

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT.parent / "shared" / "data" / "fineweb-sample" / "fineweb_sample_2800.parquet"
MARKER = "zebracorn"  # a word the self-check never sees: the injected fault hides behind it

PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "’s", "''", "\t", "\t\t", "\n", "\n\n", "\r\n", " ", "  ",
          "   ", "\u3000", "\u180e", "\u200b", "\u200d", "\xa0", "\x85", "\u2028", "\ufeff", "\u1680", "\u2009",
          "<|endoftext|>", "<|", "|>", "endoftext", "0", "123", "45678", "٣٤", "३", "½", "😀", "👍🏽", "👩‍👩‍👧‍👦", "🇫🇷",
          "1️⃣", "e\u0301", "\u0301", "東京", "한국", "ไทย", "עִב", "abc", "ABC", "Hello", " world", "...", "!!", "$",
          "_", "-", "\x00", "\x1b", "\x7f", "\U0010ffff", "\ue000", "\ufffd", "ß", "İ", "ﬁ"]


def adversarial_texts(count: int, seed: int = 0) -> list[str]:
    """Seeded fuzz: hard pieces, random code points, long whitespace runs, and FineWeb text spliced with them."""
    rng = random.Random(seed)
    fineweb = pq.read_table(SAMPLE, columns=["text"])["text"].to_pylist()[:200] if SAMPLE.exists() else []

    def random_character() -> str:
        while 0xD800 <= (code := rng.randrange(0x110000)) <= 0xDFFF:
            pass
        return chr(code)

    texts = []
    for i in range(count):
        parts = [rng.choice(PIECES) if rng.random() < 0.85 else random_character() for _ in range(rng.randint(1, 60))]
        if i % 7 == 0:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice([" ", "\n", "\t", "\u3000"]) * rng.randint(50, 3000))
        if fineweb and i % 3 == 0:
            document = rng.choice(fineweb)
            cut = rng.randrange(len(document))
            parts = [document[max(0, cut - 300) : cut], *parts, document[cut : cut + 300]]
        texts.append("".join(parts))
    return texts


@pytest.fixture
def no_native(tmp_path, monkeypatch):
    """No C engine here: no compiler, and an empty library cache."""
    monkeypatch.setenv("FINEWEB_NATIVE_CACHE", str(tmp_path / "native-cache"))
    monkeypatch.setenv("CC", "no-such-compiler")


@pytest.fixture
def fresh_engines():
    """Each test chooses its engine anew, and leaves no injected engine behind."""
    forget_engines()
    yield
    forget_engines()


def _wrong_fastokens(change_ids) -> SimpleNamespace:
    """A stand-in for the fastokens module: its tokenizers are real ones whose batch answers
    pass through change_ids(text, ids) -> ids."""

    class WrongTokenizer:
        def __init__(self, real):
            self.real = real

        def encode_batch_flat(self, texts):
            tokens, offsets = self.real.encode_batch_flat(texts)
            tokens, offsets = memoryview(tokens).cast("I"), memoryview(offsets).cast("Q")
            out_tokens, out_offsets = array("I"), array("Q", [0])
            for i, text in enumerate(texts):
                out_tokens.extend(change_ids(text, list(tokens[offsets[i] : offsets[i + 1]])))
                out_offsets.append(len(out_tokens))
            return out_tokens.tobytes(), out_offsets.tobytes()

    return SimpleNamespace(Tokenizer=SimpleNamespace(from_json_str=lambda text: WrongTokenizer(fastokens.Tokenizer.from_json_str(text))))


def _inject(monkeypatch, change_ids) -> None:
    monkeypatch.setattr(tokenize_engine, "_import_fastokens", lambda: _wrong_fastokens(change_ids))


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


# ---------------------------------------------------------------------------------------
# fastokens is GPT-2
# ---------------------------------------------------------------------------------------


def test_tokenizer_json_is_gpt2_from_the_checked_files():
    document = json.loads(tokenize_engine.gpt2_tokenizer_json())
    model = document["model"]
    assert (model["type"], len(model["vocab"]), len(model["merges"])) == ("BPE", 50257, 50000)
    assert model["vocab"]["<|endoftext|>"] == 50256 and model["merges"][0] == "Ġ t"
    assert document["added_tokens"] == [] and document["normalizer"] is None  # "<|endoftext|>" in a text is plain text
    assert document["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def test_fastokens_is_exactly_tiktoken_on_adversarial_text_and_every_code_point(fresh_engines):
    engine = select_engine("fastokens")
    assert engine.name == "fastokens" and engine.version == "0.3.5"
    encode_batch, reference = fastokens_batch_encoder(engine.tokenizer), gpt2_encoding()
    everything = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = adversarial_texts(3000)
    texts += ["".join(everything[i : i + 64]) for i in range(0, len(everything), 64)]  # every code point, in runs
    for context in ("a{c}b ", " {c}{c}'s", "\t{c} x", "1{c}\n"):  # every 11th, between letters, doubled, near spaces and digits
        texts += ["".join(context.format(c=c) for c in everything[i : i + 64 * 11 : 11]) for i in range(0, len(everything), 64 * 11)]
    tokens, lengths = encode_batch(texts)
    tokens, ends = np.frombuffer(tokens, np.uint32), np.cumsum(lengths)
    expected = reference.encode_ordinary_batch(texts, num_threads=2)
    differing = [t for t, end, length, want in zip(texts, ends, lengths, expected) if tokens[end - length : end].tolist() != want]
    assert not differing, f"{len(differing)} of {len(texts)} differ, first {differing[0][:60]!r}"


# ---------------------------------------------------------------------------------------
# The same shards whichever engine or worker count
# ---------------------------------------------------------------------------------------


def _tokenize_everywhere(path: Path, out: Path, max_rows: int | None = None) -> dict[str, dict[str, bytes]]:
    outputs = {}
    for engine, workers in (("tiktoken", 1), ("native", 1), ("native", 2), ("fastokens", 1), ("fastokens", 2)):
        folder = out / f"{engine}-{workers}"
        config = TokenizeConfig(engine=engine, num_workers=workers, val_fraction=0.05, shard_tokens=1 << 16, verify_fraction=0.05)
        manifest = tokenize_parquet([path], folder, config, max_rows=max_rows)
        assert manifest["engine"].split()[0] == engine and {s["engine"] for s in manifest["shards"]} == {manifest["engine"]}
        assert manifest["referee"].startswith("tiktoken ")
        outputs[f"{engine}-{workers}"] = {**_shards(folder), "doc_tokens.npy": (folder / "doc_tokens.npy").read_bytes()}
    return outputs


def _assert_identical(outputs: dict[str, dict[str, bytes]]) -> None:
    reference = outputs["tiktoken-1"]
    assert len(reference) > 2
    for name, output in outputs.items():
        assert output == reference, f"{name} differs from tiktoken with one worker"


def test_same_shards_on_the_demo_corpus(tmp_path, fresh_engines):
    _assert_identical(_tokenize_everywhere(build_demo_corpus(tmp_path / "demo"), tmp_path))


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared FineWeb sample not present")
def test_same_shards_on_a_slice_of_the_fineweb_sample(tmp_path, monkeypatch, fresh_engines):
    monkeypatch.setattr(tokenizer, "BATCH_ROWS", 64)  # several batches for each encoder
    _assert_identical(_tokenize_everywhere(SAMPLE, tmp_path, max_rows=500))


def test_same_shards_on_adversarial_text_with_invalid_utf8(tmp_path, monkeypatch, fresh_engines):
    monkeypatch.setattr(tokenizer, "BATCH_ROWS", 32)
    raw = [text.encode() for text in adversarial_texts(600, seed=1)]
    raw[3], raw[10], raw[11] = b"lone surrogate \xed\xa0\x80 <|endoftext|>", b"bad byte \xff\t's", None
    raw[64:96] = [None] * 16 + [b""] * 16  # a batch with nothing to encode
    path = tmp_path / "adversarial.parquet"
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary()).view(pa.string())}), path, row_group_size=100)
    _assert_identical(_tokenize_everywhere(path, tmp_path))


# ---------------------------------------------------------------------------------------
# Choosing the engine
# ---------------------------------------------------------------------------------------


def test_auto_falls_back_to_tiktoken_when_fastokens_is_missing(tmp_path, monkeypatch, no_native, fresh_engines):
    def missing():
        raise ImportError("No module named 'fastokens'")

    monkeypatch.setattr(tokenize_engine, "_import_fastokens", missing)
    with pytest.warns(EngineFallbackWarning, match=r"tokenize.engine=auto uses tiktoken: no C compiler .* / fastokens is not installed"):
        assert select_engine("auto").name == "tiktoken"
    with pytest.raises(EngineError) as error:
        select_engine("fastokens")
    assert "pip install fastokens==0.3.5" in str(error.value) and "\n" not in str(error.value)

    texts = [f"document {i} with 'contractions' and\ttabs" for i in range(300)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    with pytest.warns(EngineFallbackWarning, match="uses tiktoken"):  # the stage chooses on its own
        manifest = tokenize_parquet([path], tmp_path / "auto", TokenizeConfig(val_fraction=0.1, shard_tokens=4096, num_workers=2))
    assert manifest["engine"].startswith("tiktoken ") and manifest["verified_documents"] == 0


def test_an_engine_that_fails_the_self_check_is_refused(tmp_path, monkeypatch, no_native, fresh_engines):
    _inject(monkeypatch, lambda text, ids: [ids[0] + 1, *ids[1:]] if "\u180e" in text else ids)
    with pytest.raises(EngineError, match=r"fastokens 0\.3\.5 is not exactly GPT-2 on the self-check \(.*where tiktoken has") as error:
        select_engine("fastokens")
    assert "\n" not in str(error.value) and "tokenize.engine=tiktoken" in str(error.value)

    # auto: the helper started on fastokens while this process checked it is replaced by a tiktoken one
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"document {i}\u180e with\tit's" for i in range(300)]}), path, row_group_size=50)
    config = TokenizeConfig(val_fraction=0.1, shard_tokens=4096, num_workers=2)
    with pytest.warns(EngineFallbackWarning, match="not exactly GPT-2"):
        manifest = tokenize_parquet([path], tmp_path / "auto", config)
    assert manifest["engine"].startswith("tiktoken ") and manifest["num_workers"] == 2
    reference = tokenize_parquet([path], tmp_path / "tiktoken", config.model_copy(update={"engine": "tiktoken", "num_workers": 1}))
    assert _shards(tmp_path / "auto") == _shards(tmp_path / "tiktoken") and reference["documents"] == manifest["documents"]


def test_verify_fraction_catches_an_engine_that_differs_on_a_document(tmp_path, monkeypatch, fresh_engines):
    _inject(monkeypatch, lambda text, ids: [*ids[:-1], (ids[-1] + 1) % 50000] if MARKER in text else ids)
    texts = [f"plain document number {i}." for i in range(200)]
    texts[137] = f"the {MARKER} document"
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=50)
    config = TokenizeConfig(engine="fastokens", num_workers=1, val_fraction=0.1, shard_tokens=1024, verify_fraction=1.0)
    with pytest.raises(EngineMismatch, match=r"fastokens 0\.3\.5 and the referee tiktoken \S+ differ on row 137 of .*docs\.parquet") as error:
        tokenize_parquet([path], tmp_path / "out", config)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "out").glob("*.bin"))

    sampled = tokenize_parquet([path], tmp_path / "sampled", config.model_copy(update={"verify_fraction": 0.2}))
    assert sampled["verified_documents"] == sum(tokenizer.is_verified_document(config.seed, "0", row, 0.2) for row in range(200))
    assert 20 < sampled["verified_documents"] < 60  # a seeded sample (this one misses row 137)


def test_documents_counted_otherwise_than_fineweb_are_reencoded_with_tiktoken(tmp_path, monkeypatch, fresh_engines):
    """FineWeb's `token_count` is tiktoken's count: a document the engine counts otherwise is
    re-encoded with tiktoken, counted, and the shards are tiktoken's."""
    _inject(monkeypatch, lambda text, ids: ids[:-1] if MARKER in text else ids)
    texts = [f"row {i}: some text {MARKER if i % 40 == 7 else 'plain'} here" for i in range(400)]
    counts = [len(gpt2_encoding().encode_ordinary(text)) for text in texts]
    counts[5] = 999  # FineWeb itself disagrees with tiktoken here: still a mismatch after re-encoding
    path = tmp_path / "fineweb.parquet"
    pq.write_table(pa.table({"text": texts, "token_count": counts}), path, row_group_size=100)

    config = TokenizeConfig(engine="fastokens", num_workers=1, val_fraction=0.1, shard_tokens=1024, verify_fraction=0.0)
    manifest = tokenize_parquet([path], tmp_path / "wrong", config)
    assert (manifest["token_count_reencoded"], manifest["token_count_mismatches"]) == (10 + 1, 1)  # 10 markers, and row 5
    forget_engines()
    monkeypatch.undo()
    reference = tokenize_parquet([path], tmp_path / "tiktoken", config.model_copy(update={"engine": "tiktoken"}))
    assert (reference["token_count_reencoded"], reference["token_count_mismatches"]) == (0, 1)
    assert _shards(tmp_path / "wrong") == _shards(tmp_path / "tiktoken")


def test_engine_and_verify_fraction_are_not_part_of_the_version():
    config = load_config("demo")
    other = load_config("demo", ["tokenize.engine=tiktoken", "tokenize.verify_fraction=0.5"])
    assert plan_tokenize("d", other.data, other.tokenize) == plan_tokenize("d", config.data, config.tokenize)
    files = [("a.parquet", "0" * 64)]
    assert plan_tokenize_files(files, other.data, other.tokenize) == plan_tokenize_files(files, config.data, config.tokenize)


def test_a_bad_engine_setting_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="engine") as error:
        load_config("demo", ["tokenize.engine=fast"])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="verify_fraction") as error:
        load_config("demo", ["tokenize.verify_fraction=2"])
    assert "\n" not in str(error.value)
