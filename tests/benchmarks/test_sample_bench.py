"""Sampling benchmarks on CPU (`make bench`): tokens/s of one 512-token sample (batch 1, from
<|endoftext|>, temperature 1.0, top-k 200, seed 0, random weights), with the KV cache and
without it (the whole context re-run for every token, as nanoGPT does), on two CPU-sized models:

- `demo`: configs/demo.yaml's model, 2 layers × 2 heads × n_embd 64, block 128. The sample runs
  four blocks long; past the block the cache is refilled from the cropped context for every
  token (with absolute positions nothing of the previous window can be reused), so the cache
  only saves work on the first 128 tokens.
- `4x256`: 4 layers × 4 heads × n_embd 256, block 512; the sample fills the block exactly.

Both variants of a model must sample the same tokens (asserted). Each round is one sample;
tokens/s is in extra_info next to the timings. One thread: at batch 1 a cached step is a chain of
tiny ops (a 1 × 1024 GELU, attention of one query), where a second OpenMP thread costs more in
synchronisation than it saves, badly so when the other core is busy; the uncached variant runs
on one thread too, so the two are compared on the same hardware.
"""

from __future__ import annotations

import pytest
import torch

from configs.schema import load_config
from gpt.encoding import EOT, N_VOCAB
from gpt.model import GPT, GPTConfig

NEW_TOKENS = 512
MODELS = {
    "demo": GPTConfig.from_model_config(load_config("demo").model),
    "4x256": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=512),
}
ROUNDS = {"cached": 5, "uncached": 2}
THREADS = 1
SAMPLED: dict[str, dict[str, torch.Tensor]] = {}  # model: variant: tokens, to compare the variants


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", list(ROUNDS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_sample_512_tokens(benchmark, one_thread, model_name, variant):
    torch.manual_seed(0)
    model = GPT(MODELS[model_name]).eval()
    prompt = torch.tensor([[EOT]])
    use_cache = variant == "cached"

    def generate() -> torch.Tensor:
        return model.generate(prompt, NEW_TOKENS, temperature=1.0, top_k=200, vocab_limit=N_VOCAB,
                              generator=torch.Generator().manual_seed(0), use_cache=use_cache)

    model.generate(prompt, 8, use_cache=use_cache)  # first-touch allocations, not measured
    tokens = benchmark.pedantic(generate, rounds=ROUNDS[variant], iterations=1)

    assert tokens.shape == (1, 1 + NEW_TOKENS)
    for other, other_tokens in SAMPLED.setdefault(model_name, {}).items():
        assert torch.equal(tokens, other_tokens), f"{variant} and {other} sampled different tokens"
    SAMPLED[model_name][variant] = tokens
    config = MODELS[model_name]
    benchmark.extra_info.update({
        "model": f"{config.n_layer} layers × {config.n_head} heads × n_embd {config.n_embd}, block {config.block_size}",
        "variant": variant,
        "new_tokens": NEW_TOKENS,
        "threads": torch.get_num_threads(),
        "tokens_per_s_mean": round(NEW_TOKENS / benchmark.stats.stats.mean, 1),
        "tokens_per_s_best": round(NEW_TOKENS / benchmark.stats.stats.min, 1),
    })
