"""Checkpoints: atomic folders with checksums, fallback past damage, retention."""

from __future__ import annotations

import json

import pytest
import torch

from gpt.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    remove_temporaries,
    save_checkpoint,
)
from gpt.model import GPT, GPTConfig
from tests.gpt_fixtures import tiny_config

torch.set_num_threads(1)


def trained_pair(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    """A tiny model and an optimizer with real state (one step taken)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 50257, (2, 8))
    model(idx, idx)[1].backward()
    optimizer.step()
    return model, optimizer


def state(val_loss: float | None = None) -> dict:
    config = tiny_config().model_dump(mode="json")
    config["model"].update({"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8})
    return {"val_loss": val_loss, "config": config, "loader": {"cursor": 4}}


def test_round_trip(tmp_path):
    model, optimizer = trained_pair()
    folder = save_checkpoint(tmp_path, 120, model, optimizer, state(2.5), keep_last=3)
    assert folder == tmp_path / "checkpoints" / "step_000120"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.pt", "optimizer.pt", "state.json"]

    loaded = load_checkpoint(folder)
    assert loaded.iteration == 120 and loaded.state["loader"] == {"cursor": 4}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model[key], value)
    fresh_model, fresh_optimizer = trained_pair(seed=1)
    fresh_model.load_state_dict(loaded.model)
    fresh_optimizer.load_state_dict(loaded.optimizer)
    for saved, restored in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert all(torch.equal(saved[k], restored[k]) for k in saved)

    restored_model, restored_state = load_model(folder)
    assert not restored_model.training and restored_state["iteration"] == 120


def test_compiled_model_is_saved_without_prefixes(tmp_path):
    model, optimizer = trained_pair()
    folder = save_checkpoint(tmp_path, 1, torch.compile(model), optimizer, state(), keep_last=1)  # never called: no compile cost
    keys = load_checkpoint(folder).model.keys()
    assert keys == model.state_dict().keys()


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    model, optimizer = trained_pair()
    save_checkpoint(tmp_path, 10, model, optimizer, state(), keep_last=5)
    newest = save_checkpoint(tmp_path, 20, model, optimizer, state(), keep_last=5)
    model_file = newest / "model.pt"
    with open(model_file, "r+b") as handle:
        handle.truncate(model_file.stat().st_size // 2)

    with pytest.warns(UserWarning, match=str(model_file)):
        found = latest_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_000010"
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(newest)


def test_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    model, optimizer = trained_pair()
    good = save_checkpoint(tmp_path, 10, model, optimizer, state(), keep_last=5)
    (tmp_path / "checkpoints" / "step_000020").mkdir()  # e.g. copied by hand, half done
    stale = tmp_path / "checkpoints" / ".step_000030.tmp-0123abcd"  # a writer killed mid-way
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good
    remove_temporaries(tmp_path)
    assert not stale.exists()


def test_retention_keeps_the_last_k_and_the_best(tmp_path):
    model, optimizer = trained_pair()
    losses = {10: 3.0, 20: 2.0, 30: 2.5, 40: None, 50: 2.8}
    for iteration, loss in losses.items():
        save_checkpoint(tmp_path, iteration, model, optimizer, state(loss), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000020", "step_000040", "step_000050"]
    assert json.loads((tmp_path / "checkpoints" / "step_000020" / "state.json").read_text())["val_loss"] == 2.0


def test_resaving_a_step_replaces_a_damaged_folder(tmp_path):
    model, optimizer = trained_pair()
    folder = save_checkpoint(tmp_path, 10, model, optimizer, state(), keep_last=2)
    (folder / "state.json").write_text("{}")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 10, model, optimizer, state(), keep_last=2)
    assert latest_checkpoint(tmp_path) == folder
