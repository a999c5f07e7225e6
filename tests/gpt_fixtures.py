"""Tiny models, configs and token shards for the tests of gpt/ (real torch, no mocks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from configs.schema import PipelineConfig
from storage.shards import write_shard

EOT = 50256


def tiny_tokens(rng: np.random.Generator, count: int, alphabet: np.ndarray) -> np.ndarray:
    """Learnable text: documents (EOT-separated) that walk a small alphabet with
    mostly-predictable steps, so the loss falls within a few iterations."""
    tokens = np.empty(count, dtype=np.int64)
    position = 0
    for i in range(count):
        if rng.random() < 0.01:
            tokens[i] = EOT
            continue
        position = (position + (1 if rng.random() < 0.8 else int(rng.integers(len(alphabet))))) % len(alphabet)
        tokens[i] = alphabet[position]
    return tokens


def write_tiny_shards(folder: Path, train_shards: int = 2, train_tokens: int = 6000, val_tokens: int = 2000, seed: int = 0) -> Path:
    """train_000000.bin … and val_000000.bin of learnable tokens below 50257."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    alphabet = rng.choice(50256, size=48, replace=False)
    for index in range(train_shards):
        write_shard(folder / f"train_{index:06d}.bin", tiny_tokens(rng, train_tokens, alphabet))
    write_shard(folder / "val_000000.bin", tiny_tokens(rng, val_tokens, alphabet))
    return folder


def tiny_config(**train: Any) -> PipelineConfig:
    """A 1-layer, n_embd 16 GPT (~0.8M parameters, nearly all in the 50304-wide embedding)
    on one CPU thread; keyword arguments override `train.*`."""
    return PipelineConfig.model_validate(tiny_tree(**train))


def tiny_tree(**train: Any) -> dict[str, Any]:
    """tiny_config as the YAML tree it is made from (only the keys it sets, so an older
    release of the project reads it too)."""
    return {
        "name": "tiny",
        "data": {"source": "demo://python-docs"},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "train": {
            "max_iters": 20,
            "batch_size": 4,
            "grad_accum_steps": 2,
            "learning_rate": 1e-2,
            "min_lr": 1e-3,
            "warmup_iters": 3,
            "eval_interval": 10,
            "eval_iters": 2,
            "log_interval": 1,
            "checkpoint_interval": 10,
            "keep_last_checkpoints": 2,
            "compile": False,
            "num_threads": 1,
            **train,
        },
        "eval": {"max_batches": 4, "batch_size": 4},
        "sample": {"prompt": "The", "num_samples": 2, "max_new_tokens": 8},
    }


def with_model(config: PipelineConfig, **model: Any) -> PipelineConfig:
    tree = config.model_dump()
    tree["model"].update(model)
    return PipelineConfig.model_validate(tree)


def write_yaml(config: PipelineConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path
