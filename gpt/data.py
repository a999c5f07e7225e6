"""Batches of token windows from a folder of llm.c shards (`train_*.bin`, `val_*.bin`).

Shards are memory-mapped, never read whole into RAM. A window is `block_size + 1`
consecutive tokens of one shard: x is the first block_size, y the same shifted by one.

Training batches are a pure function of (seed, split, micro-batch index): the index-th
micro-batch draws its window starts from a numpy Generator seeded with exactly those
numbers. The loader's whole position is therefore one integer, the cursor, which a
checkpoint stores; a resumed run sees the same batches as an uninterrupted one. Under
DDP, rank r of W takes indices cursor + r, cursor + W + r, ..., so the set of sequences
in an iteration does not depend on how many processes share it.

Validation batches walk the val split in order, window after window without overlap,
so every evaluation sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from configs.errors import UserError
from storage.shards import read_shard

SPLITS = ("train", "val")


class DataError(UserError):
    """Token shards that cannot be used for training; the message is one line."""


class ShardDataset:
    """All shards of one split, read as windows of block_size + 1 tokens."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.block_size = block_size
        self.paths = sorted(self.data_dir.glob(f"{split}_*.bin"))
        if not self.paths:
            raise DataError(
                f"no {split}_*.bin shards in {self.data_dir}; run the tokenize stage or pass "
                "--data-dir pointing at its output folder"
            )
        self.shards = [read_shard(path) for path in self.paths]
        self.num_tokens = sum(len(shard) for shard in self.shards)
        # Window starts per shard: a window needs block_size + 1 tokens inside one shard.
        starts_per_shard = np.array([max(len(shard) - block_size, 0) for shard in self.shards], dtype=np.int64)
        self.num_windows = int(starts_per_shard.sum())
        self._cumulative_starts = np.cumsum(starts_per_shard)
        if self.num_windows == 0:
            fix = "raise tokenize.val_fraction" if split == "val" else "use more training data"
            raise DataError(
                f"{split} split has {self.num_tokens} tokens ({max(map(len, self.shards))} in its largest shard), "
                f"fewer than block_size+1={block_size + 1}; lower model.block_size or {fix}"
            )

    def window(self, start: int) -> np.ndarray:
        """The block_size + 1 tokens at global window start `start` (0 <= start < num_windows)."""
        shard_index = int(np.searchsorted(self._cumulative_starts, start, side="right"))
        offset = start - (int(self._cumulative_starts[shard_index - 1]) if shard_index else 0)
        return self.shards[shard_index][offset : offset + self.block_size + 1]

    def random_batch(self, seed: int, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th random micro-batch of this split: the same for the same arguments, always."""
        rng = np.random.default_rng([seed, SPLITS.index(self.split), index])
        starts = rng.integers(0, self.num_windows, size=batch_size)
        return self._to_tensors([self.window(int(s)) for s in starts])

    def sequential_batches(self, batch_size: int, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows from the start of the split, in order; stops early
        (last batch possibly smaller) when the split runs out."""
        windows: list[np.ndarray] = []
        batches = 0
        for shard in self.shards:
            for offset in range(0, len(shard) - self.block_size, self.block_size):
                windows.append(shard[offset : offset + self.block_size + 1])
                if len(windows) == batch_size:
                    yield self._to_tensors(windows)
                    windows, batches = [], batches + 1
                    if batches == max_batches:
                        return
        if windows:
            yield self._to_tensors(windows)

    @staticmethod
    def _to_tensors(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(np.stack(windows).astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class TrainLoader:
    """The training stream of one rank: micro-batch after micro-batch, positioned by a cursor.

    The cursor counts micro-batches consumed by the whole job; each `next_batch` on
    every rank advances it by world_size, so all ranks agree on it.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.cursor = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.cursor + self.rank
        self.cursor += self.world_size
        return self.dataset.random_batch(self.seed, index, self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = int(state["cursor"])
