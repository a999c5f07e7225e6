"""The GPT: shapes, initial loss, parameter counts, nanoGPT weights, generation."""

from __future__ import annotations

import math

import pytest
import torch

from configs import load_config
from configs.schema import ModelConfig
from gpt.checkpoint import load_nanogpt_checkpoint
from gpt.model import GPT, GPTConfig, load_nanogpt_state_dict

torch.set_num_threads(1)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, **overrides}))


def test_forward_shapes_and_initial_loss():
    model = tiny_model()
    idx = torch.randint(0, 50257, (3, 16))
    targets = torch.randint(0, 50257, (3, 16))  # not idx: tied embeddings favour repeating the input
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50304)
    assert loss.shape == ()
    assert abs(loss.item() - math.log(50257)) < 0.1  # uniform guess over the vocabulary

    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50304)  # without targets: the last position only
    assert loss is None


def test_targets_of_minus_one_are_ignored():
    model = tiny_model()
    idx = torch.randint(0, 50257, (2, 8))
    targets = idx.clone()
    _, full = model(idx, targets)
    targets[:, :4] = -1
    logits, partial = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 50304), idx[:, 4:].reshape(-1))
    assert torch.allclose(partial, expected)
    assert not torch.allclose(partial, full)


@pytest.mark.parametrize("preset", ["demo", "fineweb-40m", "gpt2-124m"])
def test_parameter_count_matches_the_config_formula(preset):
    model_config = load_config(preset).model
    with torch.device("meta"):
        model = GPT(GPTConfig.from_model_config(model_config))
    assert model.get_num_params() == model_config.num_params()
    assert model.get_num_params(non_embedding=False) == model_config.num_params(non_embedding=False)


def test_the_seed_run_preset_has_its_published_size():
    assert round(load_config("fineweb-40m").model.num_params() / 1e6, 2) == 40.56


def test_parameter_count_with_bias():
    config = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_model_config(config))
    assert model.get_num_params() == config.num_params()


def test_init_follows_nanogpt():
    model = tiny_model(n_layer=4, n_embd=64)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    c_proj = model.transformer.h[0].mlp.c_proj.weight
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(c_fc.std().item() - 0.02) < 0.002
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(2 * 4)) < 0.001


def test_optimizer_decays_only_matrices():
    model = tiny_model(bias=True)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert optimizer.defaults["fused"] is True


def test_nanogpt_state_dict_with_compile_prefix_round_trip():
    source = tiny_model(seed=1)
    compiled_style = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    compiled_style["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))  # old causal mask
    target = load_nanogpt_state_dict(tiny_model(seed=2), compiled_style)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_nanogpt_checkpoint(tmp_path):
    source = tiny_model(seed=3)
    model_args = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, "bias": False, "vocab_size": 50304, "dropout": 0.0}
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": {f"_orig_mod.{k}": v for k, v in source.state_dict().items()},
            "optimizer": {},
            "model_args": model_args,
            "iter_num": 250,
            "best_val_loss": torch.tensor(3.5),
            "config": {"learning_rate": 6e-4},
        },
        path,
    )
    model, info = load_nanogpt_checkpoint(path)
    assert info == {"iter_num": 250, "best_val_loss": 3.5, "config": {"learning_rate": 6e-4}}
    idx = torch.randint(0, 50257, (1, 8))
    assert torch.equal(model(idx)[0], source(idx)[0])


def test_generate_length_cropping_and_determinism():
    model = tiny_model().eval()
    prompt = torch.tensor([[50256, 464]])
    first = model.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
    again = model.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
    other = model.generate(prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(8))
    assert first.shape == (1, 22)  # longer than block_size 16: the context is cropped
    assert torch.equal(first[:, :2], prompt)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_generate_never_samples_padding_ids():
    model = tiny_model().eval()
    with torch.no_grad():  # make the padding ids (50257..50303) the only ones with non-zero logits
        model.lm_head.weight[:50257] = 0.0
        model.lm_head.weight[50257:] = torch.randn(47, 16, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[464]])
    unlimited = model.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert int(unlimited[0, 1:].min()) >= 50257
    limited = model.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0), vocab_limit=50257)
    assert int(limited.max()) < 50257
