"""HellaSwag scoring benchmarks on CPU (`make bench`): items/s of gpt.evaluate's batched scorer
(`hellaswag_losses`, eval.hellaswag_items_per_batch items × 4 endings per forward pass, fixed
shapes) against the one-item-per-pass loop it replaced (tests/test_hellaswag.py's
`reference_losses`), on the same items, with the same predictions asserted.

The items are the first 200 of the real HellaSwag validation set when ../shared has it, else
200 generated ones of about its lengths. Two untrained CPU-sized models, 2 threads, freed
memory kept (as evaluate() runs on CPU): the demo preset (2 layers × n_embd 64, block 128:
long items lose context tokens) and a bigger one (4 layers × n_embd 256, block 256).
"""

from __future__ import annotations

import random

import pytest
import torch

from configs.schema import EvalConfig
from gpt.encoding import gpt2_encoding
from gpt.evaluate import hellaswag_losses, read_hellaswag
from gpt.model import GPT, GPTConfig
from gpt.runtime import reuse_freed_memory
from tests.test_hellaswag import HELLASWAG_VAL, reference_losses

ITEMS = 200
ROUNDS = 3
THREADS = 2
MODELS = {
    "demo-2x64-block128": GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64),
    "4x256-block256": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=256),
}
SCORERS = ("one-by-one", "batched")
_losses: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def generated_items(count: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped items of random words: contexts of ~40 words, endings of 3 to 30."""
    rng = random.Random(seed)
    words = ["the", "a", "man", "woman", "dog", "ball", "water", "is", "are", "was", "runs", "jumps", "holds",
             "takes", "puts", "into", "onto", "over", "under", "slowly", "then", "and", "while", "with", "on", "in",
             "at", "to", "of", "his", "her", "their", "kitchen", "field", "river", "house", "car", "rope", "paint"]

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
    return [{"ind": i, "ctx": text(10, 60), "label": rng.randrange(4), "endings": [text(3, 30) for _ in range(4)]}
            for i in range(count)]


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return read_hellaswag(HELLASWAG_VAL, ITEMS) if HELLASWAG_VAL.exists() else generated_items(ITEMS)


@pytest.fixture(scope="module")
def encoding():
    return gpt2_encoding()


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_hellaswag_scoring(benchmark, items, encoding, restore_threads, model_name, scorer):
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = GPT(MODELS[model_name]).eval()
    items_per_batch = EvalConfig().hellaswag_items_per_batch

    def score() -> tuple[torch.Tensor, torch.Tensor]:
        if scorer == "batched":
            return hellaswag_losses(model, items, encoding, "cpu", items_per_batch=items_per_batch)
        return reference_losses(model, items, encoding)

    with reuse_freed_memory():
        score_items = items[:items_per_batch]  # warm-up: first-touch allocations, not measured
        hellaswag_losses(model, score_items, encoding, "cpu", items_per_batch=items_per_batch)
        reference_losses(model, score_items, encoding)
        total, count = benchmark.pedantic(score, rounds=ROUNDS, iterations=1)
        _losses[model_name, scorer] = total, count
        other = next(s for s in SCORERS if s != scorer)
        if (model_name, other) not in _losses:  # run alone (-k): score the other way once, untimed
            _losses[model_name, other] = hellaswag_losses(model, items, encoding, "cpu") if other == "batched" \
                else reference_losses(model, items, encoding)
    ref_total, ref_count = _losses[model_name, other]
    assert torch.equal(count, ref_count)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-4)
    assert torch.equal(total.argmin(dim=1), ref_total.argmin(dim=1))
    assert torch.equal((total / count).argmin(dim=1), (ref_total / ref_count).argmin(dim=1))

    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    benchmark.extra_info.update(
        {
            "model": model_name,
            "scorer": scorer,
            "items": len(items),
            "real_items": HELLASWAG_VAL.exists(),
            "items_per_batch": items_per_batch if scorer == "batched" else 1,
            "threads": torch.get_num_threads(),
            "items_per_s_mean": round(len(items) / benchmark.stats.stats.mean, 1),
            "items_per_s_best": round(len(items) / benchmark.stats.stats.min, 1),
        }
    )
