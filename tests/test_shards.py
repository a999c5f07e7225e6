"""llm.c token shards: round trip, and one-line errors for files that are not valid shards."""

import numpy as np
import pytest

from storage.shards import HEADER_BYTES, MAGIC, ShardError, read_header, read_shard, write_shard


def test_round_trip_keeps_tokens_and_llm_c_header(tmp_path):
    tokens = np.array([50256, 15496, 995, 0, 65535], dtype=np.uint16)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [MAGIC, 1, 5]
    assert path.stat().st_size == HEADER_BYTES + 2 * 5
    assert read_shard(path).tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]  # no temporary file left


def test_empty_shard_round_trips(tmp_path):
    write_shard(tmp_path / "val_000000.bin", np.zeros(0, dtype=np.uint16))
    assert read_header(tmp_path / "val_000000.bin") == 0


def test_bad_magic_is_rejected(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(np.zeros(256 + 1, dtype="<i4").tobytes())
    with pytest.raises(ShardError, match="bad magic"):
        read_shard(path)


def test_truncated_shard_is_rejected(tmp_path):
    path = tmp_path / "cut.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match="truncated"):
        read_shard(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError, match="shorter than"):
        read_shard(path)


def test_token_ids_must_fit_uint16(tmp_path):
    with pytest.raises(ShardError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([70000]))
    assert not list(tmp_path.iterdir())
