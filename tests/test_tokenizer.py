"""GPT-2 built offline, and the tokenize stage: EOT per document, document-level split,
shards identical for any worker count, bad rows counted instead of crashing."""

import hashlib
import json
import marshal
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.schema import TokenizeConfig
from gpt import tokenize_worker, tokenizer
from gpt import encoding
from gpt.encoding import EOT, gpt2_encoding, gpt2_encoding_arguments, gpt2_file, gpt2_ranks, ranks_cache_path
from gpt.tokenizer import TokenizeError, TokenizerCrashed, is_val_document, tokenize_parquet
from storage.shards import ShardWriter, read_shard

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "data" / "fineweb-sample"
SAMPLE = SHARED / "fineweb_sample_2800.parquet"
FULL_SCHEMA_ROWS = SHARED / "documented_rows_full_schema.jsonl"
WORDS = "the of and to in data model token train shard parquet stream seed python café naïve 東京 😀".split()


def test_hello_world_is_gpt2():
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert (enc.name, enc.n_vocab, enc.eot_token, EOT) == ("gpt2", 50257, 50256, 50256)
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert gpt2_encoding() is enc  # built once per process


def test_builds_offline_with_an_empty_tiktoken_cache(tmp_path):
    """A fresh process, an empty tiktoken cache, no reachable network: still GPT-2."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    code = (
        "import tiktoken\n"
        "def refuse(name): raise AssertionError('tiktoken.get_encoding was called')\n"
        "tiktoken.get_encoding = refuse\n"
        "from gpt.encoding import gpt2_encoding\n"
        "print(gpt2_encoding().encode_ordinary('Hello world'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[15496, 995]"


def test_ranks_are_what_tiktoken_derives_from_the_merges(tmp_path):
    """The ranks are read straight from encoder.json; tiktoken's own loader rebuilds them from
    vocab.bpe's merges (and checks them against encoder.json): the same 50,256 ranks."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    for name in ("vocab.bpe", "encoder.json"):
        (tmp_path / name).write_bytes(gpt2_file(name))
    ranks = data_gym_to_mergeable_bpe_ranks(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))
    assert gpt2_encoding_arguments()["mergeable_ranks"] == ranks and len(ranks) == 50256


def test_ranks_are_decoded_once_per_machine_and_a_damaged_cache_file_is_decoded_again(tmp_path, monkeypatch):
    """The ranks tiktoken needs are kept in the cache folder (they cost ~0.04 s of GIL to decode);
    a damaged file is noticed by its own sha256 and replaced; a folder that cannot be written
    costs only the time."""
    monkeypatch.setenv("FINEWEB_NATIVE_CACHE", str(tmp_path / "cache"))
    decoded = encoding._ranks_from_encoder_json()
    assert gpt2_ranks() == decoded and len(decoded) == 50256
    cached = ranks_cache_path()
    written = cached.read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no partial file left behind

    def refuse():
        raise AssertionError("decoded again although the cache file is good")

    monkeypatch.setattr(encoding, "_ranks_from_encoder_json", refuse)
    assert gpt2_ranks() == decoded  # read back, not decoded

    damaged = bytearray(written)
    damaged[len(damaged) // 2] ^= 0x01
    cached.write_bytes(bytes(damaged))
    monkeypatch.setattr(encoding, "_ranks_from_encoder_json", lambda: decoded)
    assert gpt2_ranks() == decoded and cached.read_bytes() == written  # decoded again and rewritten

    cached.write_bytes(written[:1000])  # cut short
    assert gpt2_ranks() == decoded and cached.read_bytes() == written

    not_ranks = marshal.dumps([1, 2, 3])  # intact, but not the ranks
    cached.write_bytes(hashlib.sha256(not_ranks).digest() + not_ranks)
    assert gpt2_ranks() == decoded and cached.read_bytes() == written
    assert cached.stat().st_mode & 0o777 == 0o644

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("FINEWEB_NATIVE_CACHE", str(tmp_path / "not-a-folder"))
    assert gpt2_ranks() == decoded


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared FineWeb sample not present")
def test_counts_match_tiktoken_counts_on_real_fineweb_rows():
    table = pq.ParquetFile(SAMPLE).read_row_group(0, columns=["text", "gpt2_token_count_tiktoken"])
    counts = [len(t) for t in gpt2_encoding().encode_ordinary_batch(table["text"].to_pylist())]
    assert counts == table["gpt2_token_count_tiktoken"].to_pylist()


@pytest.mark.skipif(not FULL_SCHEMA_ROWS.exists(), reason="../shared FineWeb rows not present")
def test_counts_match_fineweb_token_count_column():
    rows = [json.loads(line) for line in FULL_SCHEMA_ROWS.read_text().splitlines() if line.strip()]
    assert [len(gpt2_encoding().encode_ordinary(r["text"])) for r in rows] == [r["token_count"] for r in rows]


# ---------------------------------------------------------------------------------------
# tokenize_parquet
# ---------------------------------------------------------------------------------------


def _texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + "." for _ in range(count)]


def _write(path: Path, texts: list, row_group_size: int = 64, **columns) -> Path:
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), **columns}), path, row_group_size=row_group_size)
    return path


def _documents(shard_paths: list[Path]) -> list[list[int]]:
    """Split concatenated shards back into documents at EOT boundaries."""
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in shard_paths]) if shard_paths else np.zeros(0, np.uint16)
    assert tokens.size == 0 or tokens[0] == EOT, "every split must start with EOT"
    starts = np.flatnonzero(tokens == EOT)
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts, [*starts[1:], len(tokens)])]


def _shards(folder: Path, split: str) -> list[Path]:
    return sorted(folder.glob(f"{split}_*.bin"))


def test_split_is_by_whole_document_and_every_document_starts_with_eot(tmp_path):
    texts = _texts(400)
    files = [_write(tmp_path / "a.parquet", texts[:250]), _write(tmp_path / "b.parquet", texts[250:])]
    config = TokenizeConfig(val_fraction=0.1, shard_tokens=1024, num_workers=1, seed=7)
    manifest = tokenize_parquet(files, tmp_path / "out", config)

    enc = gpt2_encoding()
    train, val = _documents(_shards(tmp_path / "out", "train")), _documents(_shards(tmp_path / "out", "val"))
    positions = [(0, r) for r in range(250)] + [(1, r) for r in range(150)]
    expected_val = [enc.encode_ordinary(t) for t, (f, r) in zip(texts, positions) if is_val_document(7, f, r, 0.1)]
    expected_train = [enc.encode_ordinary(t) for t, (f, r) in zip(texts, positions) if not is_val_document(7, f, r, 0.1)]
    assert val == expected_val and train == expected_train  # whole documents, in source order, none cut
    assert manifest["documents"] == {"train": len(train), "val": len(val)}
    assert 0 < len(val) < len(train)

    shards = manifest["shards"]
    assert [s["name"] for s in shards] == [p.name for p in _shards(tmp_path / "out", "train") + _shards(tmp_path / "out", "val")]
    assert all(s["tokens"] <= 1024 for s in shards) and len(shards) > 3
    assert sum(s["documents"] for s in shards if s["split"] == "train") == len(train)
    assert manifest["tokens"]["train"] == sum(len(d) + 1 for d in train)
    assert shards[0]["first_row"] == [0, 0] and shards[-1]["last_row"][0] == 1
    assert manifest["text_bytes"]["val"] == sum(len(t.encode()) for t, (f, r) in zip(texts, positions) if is_val_document(7, f, r, 0.1))
    lengths = manifest["doc_tokens"]
    assert lengths["max"] == max(len(d) for d in train + val) and sum(lengths["histogram"]["counts"]) == 400


def test_shards_are_byte_identical_for_one_two_and_three_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "BATCH_ROWS", 16)  # many more jobs than the in-flight window
    texts = _texts(600, seed=3)
    texts[5] = "a document that mentions <|endoftext|> in its text"
    paths = [_write(tmp_path / "a.parquet", texts[:450], row_group_size=100), _write(tmp_path / "b.parquet", texts[450:], row_group_size=70)]
    outputs, progress = {}, {}
    for workers in (1, 2, 3):
        config = TokenizeConfig(val_fraction=0.05, shard_tokens=4096, num_workers=workers)
        calls = []
        manifest = tokenize_parquet(paths, tmp_path / f"w{workers}", config, progress=lambda done, total: calls.append((done, total)))
        outputs[workers] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"w{workers}").iterdir())}
        progress[workers] = calls
        assert manifest["num_workers"] == workers
    assert outputs[1] == outputs[2] == outputs[3]
    assert len(outputs[1]) > 2
    assert progress[1] == progress[3] and progress[1][-1] == (600, 600) and len(progress[1]) > 30


def test_shard_writer_adds_many_documents_as_it_would_one_by_one(tmp_path):
    """Documents added a batch at a time fill the same shards, with the same document counts
    and first and last rows, as documents added one by one (a document may span shards)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=300)
    tokens = rng.integers(0, 50257, size=int(lengths.sum())).astype(np.uint16)
    rows = np.arange(300) * 3 + 1
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one_by_one, batched = ShardWriter(tmp_path / "one", "train", 97), ShardWriter(tmp_path / "many", "train", 97)
    starts = np.cumsum(lengths) - lengths
    expected = []  # (documents starting in the shard, first row, last row), counted by hand
    for start, length, row in zip(starts.tolist(), lengths.tolist(), rows.tolist()):
        one_by_one.add_document(tokens[start : start + length], (2, row))
        for position in range(start, start + length):
            if position % 97 == 0:
                expected.append([0, [2, row], None])
            expected[-1][0] += position == start
            expected[-1][2] = [2, row]
    cuts = [0, 7, 150, 151, 300]  # batches of 7, 143, 1 and 149 documents
    for first, last in zip(cuts, cuts[1:]):
        end = int(starts[last]) if last < len(lengths) else len(tokens)
        batched.add_documents(tokens[int(starts[first]) : end], lengths[first:last], 2, rows[first:last])
    one_by_one.flush()
    batched.flush()
    assert one_by_one.shards == batched.shards
    assert [[s["documents"], s["first_row"], s["last_row"]] for s in batched.shards] == expected
    assert [(tmp_path / "one" / s["name"]).read_bytes() for s in one_by_one.shards] == [
        (tmp_path / "many" / s["name"]).read_bytes() for s in batched.shards]


def test_endoftext_inside_a_text_is_ordinary_text(tmp_path):
    """Only the separator is EOT: a document's literal "<|endoftext|>" is tokenized as
    encode_ordinary does, never as the special token."""
    texts = ["before <|endoftext|> after"] * 40
    path = _write(tmp_path / "eot.parquet", texts)
    tokenize_parquet([path], tmp_path / "out", TokenizeConfig(val_fraction=0.2, shard_tokens=1024, num_workers=2))
    docs = _documents(_shards(tmp_path / "out", "train")) + _documents(_shards(tmp_path / "out", "val"))
    assert docs == [gpt2_encoding().encode_ordinary(texts[0])] * 40


def test_parallel_tokenizing_from_a_thread_and_from_a_script_without_main_guard(tmp_path):
    """Helpers are fresh interpreters running only gpt/tokenize_worker.py: safe from a
    thread (a Prefect task's), and a script needs no `if __name__ == "__main__"` guard
    (multiprocessing's spawn would re-run its top level in every worker)."""
    path = _write(tmp_path / "docs.parquet", _texts(600, seed=5))
    result = {}

    def run():
        config = TokenizeConfig(val_fraction=0.1, shard_tokens=2048, num_workers=2, engine="fastokens")  # an engine with helpers
        result["manifest"] = tokenize_parquet([path], tmp_path / "from-thread", config)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert sum(result["manifest"]["documents"].values()) == 600

    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from configs.schema import TokenizeConfig\n"
        "from gpt.tokenizer import tokenize_parquet\n"
        "print('top level ran')\n"
        "config = TokenizeConfig(val_fraction=0.1, shard_tokens=2048, num_workers=3, engine='fastokens')\n"
        "manifest = tokenize_parquet([Path(sys.argv[1])], Path(sys.argv[2]), config)\n"
        "print(sum(manifest['documents'].values()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "from-script")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["top", "level", "ran", "600"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "from-thread").iterdir()} == {p.name: p.read_bytes() for p in (tmp_path / "from-script").iterdir()}


@pytest.mark.parametrize("dies", ["starting", "on a batch"])
def test_a_failing_helper_process_is_a_one_line_error_and_leaves_no_shards(tmp_path, monkeypatch, dies):
    """A helper that dies fails the run, even when this process's encoder could do all the
    work (it is slowed down here, so the helper has time to start and die)."""
    monkeypatch.setattr(tokenizer, "BATCH_ROWS", 8)
    broken = tmp_path / "broken_worker.py"
    ready = f"import struct\nsys.stdin.buffer.read(struct.unpack('=Q', sys.stdin.buffer.read(8))[0])\n" \
            f"sys.stdout.buffer.write(struct.pack('=Q', {tokenize_worker.READY}))\nsys.stdout.flush()\n"
    broken.write_text("import sys\n" + (ready if dies == "on a batch" else "") + "sys.stdin.buffer.read(8)\nsys.exit('the helper broke')\n")
    monkeypatch.setattr(tokenize_worker, "__file__", str(broken))
    encode = tokenize_worker.InProcessEncoder.__call__
    monkeypatch.setattr(tokenize_worker.InProcessEncoder, "__call__", lambda self, batch: (time.sleep(0.02), encode(self, batch))[1])
    path = _write(tmp_path / "docs.parquet", _texts(400, seed=6))
    with pytest.raises(TokenizerCrashed, match=r"tokenizer worker process \d+ exited with code 1: the helper broke") as error:
        tokenize_parquet([path], tmp_path / "out", TokenizeConfig(val_fraction=0.1, shard_tokens=1024, num_workers=2, engine="fastokens"))
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_null_empty_and_invalid_utf8_rows_are_counted_not_fatal(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(tokenizer, "BATCH_ROWS", 4)  # with 2 workers, both the helper and this process see bad rows
    good = _texts(30)
    raw = [t.encode() for t in good] + [None, b"", b"lone surrogate \xed\xa0\x80 here", b"bad byte \xff end"]
    text = pa.array(raw, pa.binary()).view(pa.string())  # a string column holding invalid UTF-8, as lenient writers do
    counts = [len(gpt2_encoding().encode_ordinary(t)) for t in good] + [None, 0, 999, None]
    path = tmp_path / "messy.parquet"
    pq.write_table(pa.table({"text": text, "token_count": pa.array(counts, pa.int64())}), path)

    config = TokenizeConfig(val_fraction=0.3, shard_tokens=1024, num_workers=workers, engine="fastokens")  # native: test_tokenize_engine
    manifest = tokenize_parquet([path], tmp_path / "out", config)
    assert manifest["skipped_empty_documents"] == 2
    assert manifest["invalid_utf8_documents"] == 2
    assert sum(manifest["documents"].values()) == 32
    assert manifest["token_count_mismatches"] == 1  # the deliberately wrong 999
    docs = _documents(_shards(tmp_path / "out", "train")) + _documents(_shards(tmp_path / "out", "val"))
    decoded = {gpt2_encoding().decode(d) for d in docs}
    assert "lone surrogate \ufffd\ufffd\ufffd here" in decoded and "bad byte \ufffd end" in decoded


def test_large_string_sliced_and_null_texts_give_the_same_shards(tmp_path):
    """Texts reach the encoders as byte spans into Arrow's buffers: 32- or 64-bit offsets,
    an array that starts inside its buffers (a slice), nulls and empty strings all give the
    same documents."""
    texts = _texts(300, seed=9)
    texts[3], texts[10], texts[11] = None, "", "ünïcödé ☃ text"
    outputs = {}
    for kind in (pa.string(), pa.large_string()):
        path = tmp_path / f"{kind}.parquet"
        pq.write_table(pa.table({"text": pa.array(texts, kind)}), path, row_group_size=70)
        manifest = tokenize_parquet([path], tmp_path / f"out-{kind}", TokenizeConfig(val_fraction=0.1, shard_tokens=2048, num_workers=2))
        outputs[kind] = {p.name: p.read_bytes() for p in (tmp_path / f"out-{kind}").iterdir()}
        assert manifest["skipped_empty_documents"] == 2
    assert outputs[pa.string()] == outputs[pa.large_string()]

    column = pa.array(["skipped", "x", None, "", "naïve", "last"], pa.large_string()).slice(1)
    job = tokenizer._job(0, 100, column, None)
    assert job.rows.tolist() == [100, 103, 104] and job.skipped_empty == 2
    assert [bytes(memoryview(job.data)[a:b]).decode() for a, b in zip(job.starts, job.ends)] == ["x", "naïve", "last"]


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared FineWeb sample not present")
def test_real_fineweb_counts_agree_with_token_count_column(tmp_path):
    table = pq.ParquetFile(SAMPLE).read_row_group(0).rename_columns(["id", "url", "text", "token_count"])
    path = tmp_path / "fineweb.parquet"
    pq.write_table(table, path, row_group_size=100)
    manifest = tokenize_parquet([path], tmp_path / "out", TokenizeConfig(val_fraction=0.05, num_workers=1), max_rows=300)
    assert manifest["token_count_mismatches"] == 0
    assert manifest["rows_read"] == 300
    expected = sum(table["token_count"].to_pylist()[:300]) + 300
    assert manifest["tokens"]["train"] + manifest["tokens"]["val"] == expected


def test_missing_text_column_names_file_columns_and_fix(tmp_path):
    path = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": ["hello"], "id": ["1"]}), path)
    with pytest.raises(TokenizeError) as error:
        tokenize_parquet([path], tmp_path / "out", TokenizeConfig(num_workers=1))
    message = str(error.value)
    assert "body.parquet" in message and "body, id" in message and "--set data.text_column=" in message
    assert "\n" not in message


def test_no_validation_document_is_an_error_and_leaves_no_shards(tmp_path):
    path = _write(tmp_path / "few.parquet", _texts(3))
    with pytest.raises(TokenizeError, match="no document landed in val"):
        tokenize_parquet([path], tmp_path / "out", TokenizeConfig(val_fraction=1e-9, num_workers=1))
    assert not list((tmp_path / "out").iterdir())


def test_non_parquet_input_is_a_one_line_error(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet at all")
    with pytest.raises(TokenizeError, match=r"junk.parquet is not a readable parquet file .*re-run the download stage"):
        tokenize_parquet([junk], tmp_path / "out", TokenizeConfig(num_workers=1))


def test_eots_are_written_before_each_document_and_lengths_that_do_not_add_up_are_refused():
    ids = np.array([5, 6, 7, 8, 9], np.uint32)
    assert tokenizer._eot_before_each(ids, np.array([2, 0, 3])).tolist() == [EOT, 5, 6, EOT, EOT, 7, 8, 9]
    with pytest.raises(TokenizeError, match="answered 5 tokens but lengths adding up to 4") as error:
        tokenizer._eot_before_each(ids, np.array([2, 2]))  # the fifth slot would be left unwritten
    assert "\n" not in str(error.value)
