"""The GPT: shapes, initial loss, the loss in chunks, parameter counts, nanoGPT weights, generation, precision."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpt.model
from configs import load_config
from configs.schema import ModelConfig
from gpt.checkpoint import load_nanogpt_checkpoint
from gpt.model import GPT, GPTConfig, head_cross_entropy, load_nanogpt_state_dict
from gpt.runtime import cpu_has_bf16, resolve_dtype

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


# ---------------------------------------------------------------------------------------
# The loss in chunks (head_cross_entropy) against nanoGPT's F.cross_entropy(lm_head(x))
# ---------------------------------------------------------------------------------------


def loss_and_grads(loss_fn, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
    """The loss and the gradients of x and weight, under autocast `dtype` (float32: none)."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(x, weight, targets)
    (loss * 0.5).backward()  # a scaled loss, as the trainer's loss / micro_steps
    return loss.detach(), x.grad, weight.grad


def plain_loss(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight), targets, ignore_index=-1)


def head_problem(seed: int = 0, rows: int = 70, width: int = 16, vocab: int = 1000):
    """Hidden states, a head weight large enough for peaked softmaxes, and targets, some ignored."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.5
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::9] = -1
    return x, weight, targets


# float32: summation order only. bf16: both paths round the same bf16 logits; the weight's gradient is
# summed over chunks in float32 here and rounded to bf16 once in the plain path, hence 1e-2 of its largest entry.
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 1e-2)}  # (loss, gradient relative to its max)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_chunked_loss_and_gradients_match_the_plain_path(dtype):
    x, weight, targets = head_problem()
    expected = loss_and_grads(plain_loss, x, weight, targets, dtype)
    loss_tolerance, grad_tolerance = TOLERANCES[dtype]
    for chunk_rows in (8, 70, 1000):  # uneven chunks, one chunk, a chunk larger than the rows
        got = loss_and_grads(lambda *a: head_cross_entropy(*a, chunk_rows=chunk_rows), x, weight, targets, dtype)
        assert got[0].dtype == torch.float32 and abs(got[0] - expected[0]) <= loss_tolerance * expected[0]
        for grad, reference in zip(got[1:], expected[1:]):
            assert grad.dtype == torch.float32
            assert (grad - reference).abs().max() <= grad_tolerance * reference.abs().max()
    assert (targets == -1).any() and (got[1][targets == -1] == 0).all()  # ignored positions get no gradient


def test_chunked_loss_matches_the_plain_path_compiled():
    """Captured whole by torch.compile (fullgraph: no graph break) with its backward; aot_eager runs the
    captured graphs as they are, in seconds. Inductor's kernels for them are compared with eager training
    by tests/test_train.py::test_compiled_training_matches_eager."""
    x, weight, targets = head_problem(seed=1)
    compiled = torch.compile(lambda *a: head_cross_entropy(*a, chunk_rows=16), fullgraph=True, backend="aot_eager")
    expected = loss_and_grads(plain_loss, x, weight, targets, torch.float32)
    got = loss_and_grads(compiled, x, weight, targets, torch.float32)
    assert abs(got[0] - expected[0]) <= 1e-5 * expected[0]
    for grad, reference in zip(got[1:], expected[1:]):
        assert (grad - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_the_model_loss_without_logits_is_the_plain_loss_and_needs_no_full_logits(small_loss_chunks):
    model = tiny_model()
    idx = torch.randint(0, 50257, (4, 16))
    targets = torch.randint(0, 50257, (4, 16))
    targets[:, :3] = -1
    sizes = LargestTensor()
    with sizes:
        logits, chunked = model(idx, targets, return_logits=False)
        chunked.backward()
    assert logits is None
    assert sizes.largest < 4 * 16 * 50304 / 2  # chunks of 16 positions, never all the logits
    chunked_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with sizes:
        _, plain = model(idx, targets)
        plain.backward()
    assert sizes.largest >= 4 * 16 * 50304  # nanoGPT's path holds the logits
    assert torch.allclose(chunked, plain, rtol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(chunked_grads[name], p.grad, rtol=1e-4, atol=1e-7), name
    with torch.no_grad():  # evaluation: the same loss without gradients
        assert torch.allclose(model(idx, targets, return_logits=False)[1], plain, rtol=1e-6)


@pytest.fixture
def small_loss_chunks(monkeypatch):
    """Chunks of at most 2**20 logits (20 positions of the 50304-wide head), so tiny batches have several."""
    monkeypatch.setattr(gpt.model, "LOSS_CHUNK_LOGITS", 2**20)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returned while active."""

    def __enter__(self):
        self.largest = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


# ---------------------------------------------------------------------------------------
# Precision: bf16 where the CPU multiplies bf16 matrices in hardware
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),  # AMD Zen 4, Intel Cooper Lake
    ({"avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),  # Intel Sapphire Rapids
    ({"avx2", "avx512f", "avx512_vnni"}, torch.float32),  # AVX-512 without bf16: emulated, slower than float32
    (set(), torch.float32),
])
def test_auto_precision_on_cpu_follows_the_bf16_flags(flags, expected):
    assert resolve_dtype("auto", torch.device("cpu"), cpu_flags=flags) == expected
    assert resolve_dtype("float32", torch.device("cpu"), cpu_flags=flags) == torch.float32  # explicit wins


def test_this_cpus_flags_agree_with_torchs_own_detection():
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo: torch's detection is used directly")
    assert cpu_has_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
