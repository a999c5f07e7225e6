"""HellaSwag scoring (gpt.evaluate.score_hellaswag): batched forward passes give the scores of
the one-item-per-pass loop, a model trained on a sentence picks its ending, a compiled model
scores like the eager one and compiles nothing, and two DDP processes (gloo, real
torchrun) count what one process counts.

This file doubles as the torchrun worker of the DDP test (see `_ddp_worker` at the bottom).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from configs.schema import EvalConfig
from gpt.encoding import gpt2_encoding
from gpt.evaluate import (
    EvalError,
    batch_width,
    hellaswag_losses,
    read_hellaswag,
    render_example,
    score_hellaswag,
)
from gpt.model import GPT, GPTConfig
from gpt.runtime import reuse_freed_memory

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HELLASWAG_VAL = PROJECT_ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl"
needs_hellaswag = pytest.mark.skipif(not HELLASWAG_VAL.exists(), reason="shared HellaSwag data not present")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def keep_freed_memory():
    """As evaluate() and the trainer do on CPU: the 50304-wide logits are big blocks."""
    with reuse_freed_memory():
        yield


# ---------------------------------------------------------------------------------------
# The reference: one item (4 rows) per forward pass, as gpt.evaluate scored HellaSwag before
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def reference_losses(model: GPT, items: list[dict[str, Any]], encoding: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, scored tokens) of each ending, (len(items), 4), one item per forward pass."""
    totals, counts = [], []
    for item in items:
        tokens, mask = render_example(item, encoding, model.config.block_size)
        targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -1)  # score only the ending's tokens
        logits, _ = model(tokens[:, :-1], targets)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        totals.append(losses.view(4, -1).sum(dim=1).double())
        counts.append((targets != -1).sum(dim=1))
    return torch.stack(totals), torch.stack(counts)


def reference_scores(items: list[dict[str, Any]], losses: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """The scores of the reference loop's losses."""
    total, count = losses
    labels = torch.tensor([item["label"] for item in items])
    return {
        "hellaswag_items": len(items),
        "hellaswag_acc": (total.argmin(dim=1) == labels).float().mean().item(),
        "hellaswag_acc_norm": ((total / count).argmin(dim=1) == labels).float().mean().item(),
    }


def assert_same_scores(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    (total, count), (ref_total, ref_count) = got, expected
    assert torch.equal(count, ref_count)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-4)
    assert torch.equal(total.argmin(dim=1), ref_total.argmin(dim=1))  # acc's predictions
    assert torch.equal((total / count).argmin(dim=1), (ref_total / ref_count).argmin(dim=1))  # acc_norm's


# ---------------------------------------------------------------------------------------
# Models and items
# ---------------------------------------------------------------------------------------


def opinionated_model(block_size: int, seed: int = 0, n_embd: int = 16) -> GPT:
    """A tiny random GPT with weights large enough that its endings' losses are far apart
    (GPT-2's init gives near-uniform logits, where every ending scores about the same)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, n_layer=1, n_head=2, n_embd=n_embd))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(std=0.3)
    return model.eval()


AWKWARD_ITEMS = [
    # endings of very different lengths
    {"ctx": "She opened the door and", "label": 1, "endings": [
        "left.", "walked slowly into the long dark corridor, counting every step she took until the end of it.",
        "", "sang"]},
    # a context so long that every row loses its oldest tokens at block_size 32
    {"ctx": "The river ran past the old mill where " + "the wheel turned and " * 12 + "then", "label": 0, "endings": [
        "it stopped.", "a bird flew over the water and landed on the roof", "nothing", "the miller laughed at his dog"]},
    # an ending longer than the block on its own: its row is ending tokens only
    {"ctx": "He said", "label": 3, "endings": [
        "yes", "no", "maybe tomorrow", " ".join(["many words that go on"] * 8)]},
    {"ctx": "A man is sitting on a roof. he", "label": 3, "endings": [
        "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."]},
    {"ctx": "Unicode: naïve café — 東京 🙂 and <|endoftext|> as plain text", "label": 2, "endings": [
        "ends here.", "🙂🙂", "東京", "café au lait"]},
    {"ctx": "x", "label": 0, "endings": ["a", "b", "c", "d"]},
    {"ctx": "The recipe says to", "label": 2, "endings": [
        "boil the water first", "never", "add salt, then stir for ten minutes", "ask grandma"]},
]


@pytest.fixture(scope="module")
def encoding():
    return gpt2_encoding()


# ---------------------------------------------------------------------------------------
# Batched == one item per pass
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("items_per_batch", [1, 3, 16])  # 7 items: batches of 1, a remainder of 1, one short batch
def test_batched_scores_equal_the_one_item_loop_on_awkward_items(encoding, items_per_batch):
    model = opinionated_model(block_size=32)
    expected = reference_losses(model, AWKWARD_ITEMS, encoding)
    assert render_example(AWKWARD_ITEMS[1], encoding, 32)[0].shape == (4, 33)  # rows that lose context tokens
    assert expected[1][2, 3] == 32  # a row of ending tokens only, all but the first scored
    got = hellaswag_losses(model, AWKWARD_ITEMS, encoding, "cpu", items_per_batch=items_per_batch)
    assert_same_scores(got, expected)
    assert score_hellaswag(model, AWKWARD_ITEMS, encoding, "cpu", items_per_batch=items_per_batch) == pytest.approx(
        reference_scores(AWKWARD_ITEMS, expected))


@needs_hellaswag
@pytest.mark.parametrize("block_size", [64, 160])  # most rows truncated; none (the longest row is 151 tokens)
def test_batched_scores_equal_the_one_item_loop_on_real_items(encoding, block_size):
    items = read_hellaswag(HELLASWAG_VAL, 30)
    model = opinionated_model(block_size=block_size, seed=1)
    expected = reference_losses(model, items, encoding)
    assert_same_scores(hellaswag_losses(model, items, encoding, torch.device("cpu"), items_per_batch=4), expected)
    scores = score_hellaswag(model, items, encoding, "cpu", items_per_batch=8)
    assert scores == pytest.approx(reference_scores(items, expected)) and scores["hellaswag_items"] == 30


def test_scoring_leaves_the_model_in_its_mode_and_needs_no_items(encoding):
    model = opinionated_model(block_size=32).train()
    assert score_hellaswag(model, [], encoding, "cpu") == {
        "hellaswag_items": 0, "hellaswag_acc": None, "hellaswag_acc_norm": None}
    eval_scores = hellaswag_losses(opinionated_model(block_size=32), AWKWARD_ITEMS, encoding, "cpu")
    assert_same_scores(hellaswag_losses(model, AWKWARD_ITEMS, encoding, "cpu"), eval_scores)
    assert model.training


def test_batch_widths_are_few_and_hold_every_row():
    for block_size in (16, 100, 1024):
        widths = [batch_width(w, block_size) for w in range(1, block_size + 1)]
        assert all(w <= got <= block_size for w, got in enumerate(widths, 1))
        assert all(got <= max(16, -(-w * 3 // 2)) for w, got in enumerate(widths, 1))  # wastes at most a third
        assert len(set(widths)) <= 2 * block_size.bit_length()
    assert [batch_width(w, 1024) for w in (1, 17, 25, 33, 100, 150, 1000)] == [16, 24, 32, 48, 128, 192, 1024]


# ---------------------------------------------------------------------------------------
# A model that knows the answer
# ---------------------------------------------------------------------------------------


def test_a_model_trained_on_a_sentence_picks_its_ending(encoding):
    torch.manual_seed(0)
    text = torch.tensor(encoding.encode_ordinary("the cat sat on the mat. " * 12))
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        starts = torch.randint(0, len(text) - 17, (8,)).tolist()
        x = torch.stack([text[s : s + 16] for s in starts])
        y = torch.stack([text[s + 1 : s + 17] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    context = "the cat sat on the"
    items = [
        {"ctx": context, "label": 0, "endings": ["mat.", "moon.", "piano quietly.", "cat sat on the dog."]},
        {"ctx": context, "label": 2, "endings": ["moon.", "piano quietly.", "mat.", "dog."]},
        {"ctx": context, "label": 1, "endings": ["mat.", "moon.", "piano quietly.", "cat sat on the dog."]},  # wrong label
    ]
    assert score_hellaswag(model, items, encoding, "cpu", items_per_batch=2) == {
        "hellaswag_items": 3, "hellaswag_acc": 2 / 3, "hellaswag_acc_norm": 2 / 3}
    assert model.training  # it was training, and is again


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------


def test_a_compiled_model_scores_like_the_eager_one_and_compiles_nothing(encoding):
    """build-nanogpt #79: compile broke HellaSwag. The scorer runs the module under the compile
    wrapper (and only the endings through the head), so nothing is compiled and nothing changes."""
    from torch._inductor.compile_fx import compile_fx

    compilations = []

    def counting_inductor(graph, example_inputs):  # torch.compile's default backend, counted
        compilations.append(graph)
        return compile_fx(graph, example_inputs)

    model = opinionated_model(block_size=32)
    compiled = torch.compile(model, backend=counting_inductor)
    try:
        got = hellaswag_losses(compiled, AWKWARD_ITEMS * 3, encoding, "cpu", items_per_batch=3)
        assert_same_scores(got, reference_losses(model, AWKWARD_ITEMS * 3, encoding))
        assert score_hellaswag(compiled, AWKWARD_ITEMS, encoding, "cpu", items_per_batch=3) == score_hellaswag(
            model, AWKWARD_ITEMS, encoding, "cpu", items_per_batch=3)
        assert compilations == []
        compiled(torch.zeros((2, 8), dtype=torch.long))  # the wrapper itself still compiles: the counter works
        assert len(compilations) == 1
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# DDP: two gloo processes under torchrun
# ---------------------------------------------------------------------------------------


def test_two_ddp_processes_count_what_one_process_counts(encoding, tmp_path):
    items = (AWKWARD_ITEMS * 2)[:9]  # an odd count: ranks score 5 and 4 items
    model = opinionated_model(block_size=32)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "items.json").write_text(json.dumps(items))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.run(command, check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]

    one_process = score_hellaswag(model, items, encoding, "cpu", items_per_batch=2)
    assert one_process["hellaswag_items"] == 9
    for rank in (0, 1):
        reported = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert reported["world_size"] == 2
        assert reported["scores"] == one_process  # 9 items, not 18 (each rank its share) nor 5 or 4 (reduced)


def _ddp_worker(folder: Path) -> None:
    """Under torchrun: score the saved model on the saved items with this rank's Runtime."""
    from gpt.runtime import setup_runtime

    runtime = setup_runtime("cpu", "float32", 1)
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    items = json.loads((folder / "items.json").read_text())
    scores = score_hellaswag(model.eval(), items, gpt2_encoding(), runtime, items_per_batch=2)
    report = {"world_size": runtime.world_size, "scores": scores}
    (folder / f"rank{runtime.rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Reading the file, the config
# ---------------------------------------------------------------------------------------


def test_reading_items_from_a_path_or_file_url(tmp_path):
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in AWKWARD_ITEMS) + "\n\n")
    assert read_hellaswag(path, None) == AWKWARD_ITEMS
    assert read_hellaswag(f"file://{path}", 2) == [AWKWARD_ITEMS[0], AWKWARD_ITEMS[len(AWKWARD_ITEMS) // 2]]  # spread out
    path.write_text(json.dumps(AWKWARD_ITEMS[0]) + "\n" + json.dumps({"ctx": "a", "label": 0, "endings": ["b"]}) + "\n")
    with pytest.raises(EvalError, match="line 2 is not a HellaSwag item"):
        read_hellaswag(path, None)


@needs_hellaswag
def test_the_real_validation_file_reads_whole():
    items = read_hellaswag(HELLASWAG_VAL, None)
    assert len(items) == 10042 and {item["label"] for item in items} == {0, 1, 2, 3}


def test_items_per_batch_is_bounded():
    assert EvalConfig().hellaswag_items_per_batch >= 1
    for bad in (0, 257):
        with pytest.raises(ValidationError):
            EvalConfig(hellaswag_items_per_batch=bad)


if __name__ == "__main__":  # the DDP test's worker, launched by torchrun
    _ddp_worker(Path(sys.argv[1]))
