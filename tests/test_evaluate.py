"""Evaluation (val loss, bits per byte, HellaSwag) and sampling of a trained checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gpt.checkpoint
from configs.schema import EvalConfig, SampleConfig
from gpt.checkpoint import checkpoint_path
from gpt.data import ShardDataset
from gpt.evaluate import EvalError, evaluate, render_example, utf8_bytes_per_token
from gpt.sample import sample
from gpt.encoding import gpt2_encoding
from gpt.train import train
from storage.artifacts import ArtifactStore
from tasks.report import run_scores
from tests.gpt_fixtures import tiny_config, write_tiny_shards

HELLASWAG_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder, shards folder) of a 10-iteration tiny run."""
    root = tmp_path_factory.mktemp("evaluate")
    shards = write_tiny_shards(root / "shards")
    result = train(tiny_config(max_iters=10), shards, root / "run")
    return Path(result["latest_checkpoint"]), shards


def test_val_loss_perplexity_and_bits_per_byte(trained):
    checkpoint, shards = trained
    metrics = evaluate(checkpoint, shards, EvalConfig(max_batches=3, batch_size=4), device="cpu")
    assert metrics["iteration"] == 10 and metrics["batches"] == 3
    assert metrics["tokens"] == 3 * 4 * 16
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))

    targets = torch.cat([y for _, y in ShardDataset(shards, "val", 16).sequential_batches(4, 3)]).flatten()
    text_bytes = sum(len(gpt2_encoding().decode_single_token_bytes(t)) if t != 50256 else 1 for t in targets.tolist())
    assert metrics["bytes"] == text_bytes
    assert metrics["bits_per_byte"] == pytest.approx(metrics["val_loss"] * metrics["tokens"] / (text_bytes * math.log(2)))
    assert evaluate(checkpoint, shards, EvalConfig(max_batches=3, batch_size=4), device="cpu") == metrics  # same windows


def test_byte_lengths_match_decoding():
    encoding = gpt2_encoding()
    lengths = utf8_bytes_per_token(encoding)
    tokens = encoding.encode("naïve café — 東京 🙂 text")
    assert sum(lengths[t] for t in tokens) == len("naïve café — 東京 🙂 text".encode())


def test_sampling_is_reproducible(trained):
    checkpoint, _ = trained
    config = SampleConfig(prompt="The", num_samples=2, max_new_tokens=8, seed=5)
    texts = sample(checkpoint, config, device="cpu")
    assert len(texts) == 2 and all(t.text.startswith("The") for t in texts)
    assert sample(checkpoint, config, device="cpu") == texts
    assert sample(checkpoint, config.model_copy(update={"seed": 6}), device="cpu") != texts


def test_hellaswag_rendering_crops_long_contexts():
    item = {"ctx": "word " * 40, "label": 0, "endings": ["a b c", "d", "e f", "g h i j"]}
    tokens, mask = render_example(item, gpt2_encoding(), block_size=16)
    assert tokens.shape == (4, 17)
    assert mask.sum(dim=1).tolist() == [len(gpt2_encoding().encode(" " + e)) for e in item["endings"]]


@pytest.mark.skipif(not HELLASWAG_VAL.exists(), reason="shared HellaSwag data not present")
def test_hellaswag_on_real_items(trained):
    checkpoint, shards = trained
    config = EvalConfig(max_batches=1, batch_size=4, hellaswag_path=str(HELLASWAG_VAL), hellaswag_max_items=12)
    metrics = evaluate(checkpoint, shards, config, device="cpu")
    assert metrics["hellaswag_items"] == 12
    assert 0.0 <= metrics["hellaswag_acc"] <= 1.0 and 0.0 <= metrics["hellaswag_acc_norm"] <= 1.0


def test_hellaswag_url_is_refused_with_a_fix(trained):
    checkpoint, shards = trained
    config = EvalConfig(max_batches=1, hellaswag_path="https://example.org/hellaswag_val.jsonl")
    with pytest.raises(EvalError, match="download it first"):
        evaluate(checkpoint, shards, config, device="cpu")


def test_the_run_report_lists_the_run_s_checkpoints_where_gpt_checkpoint_keeps_them(tmp_path, monkeypatch):
    """Only gpt.checkpoint knows where a run keeps its checkpoints: the report asks it."""
    monkeypatch.setattr(gpt.checkpoint, "CHECKPOINTS", "kept-elsewhere")
    store = ArtifactStore(tmp_path)
    evaluations = [("mine", 20, 2.9), ("mine", 10, 3.0), ("mine", 20, 2.5), ("other", 10, 9.9)]  # step 20 scored twice
    for number, (run, step, val_loss) in enumerate(evaluations):
        checkpoint = checkpoint_path(store.run_dir(run), step)
        store.publish("evaluate", f"version-{number}", lambda folder, val_loss=val_loss: {"val_loss": val_loss},
                      inputs={"checkpoint": str(checkpoint)})
    assert [(row["step"], row["val_loss"]) for row in run_scores(store, "mine")] == [(10, 3.0), (20, 2.5)]  # the newest
