"""Evaluate a checkpoint: val loss, perplexity, bits per byte and, optionally, HellaSwag.

Val loss is the mean cross-entropy per token (nats) over the first
`eval.max_batches × eval.batch_size` non-overlapping windows of the val split, the same
windows every time. Bits per byte divides the total loss by the UTF-8 size of the
evaluated tokens, so models with different tokenizers can be compared:

    bpb = loss_nats × tokens / (bytes × ln 2)

where bytes is the length of the evaluated target tokens decoded with GPT-2's encoding;
`<|endoftext|>` counts as one byte (a document separator), not as the 13 characters of
its name.

HellaSwag is scored like karpathy/build-nanogpt and llm.c (completion style): each of the
four endings, with its leading space, is appended to the context, the loss is taken over
the ending's tokens only, and the prediction is the ending with the lowest total loss (acc)
or the lowest mean loss per token (acc_norm). `score_hellaswag` scores several items per
forward pass, only the endings' positions through the output head, with the plain module
even when given a compiled one (nothing is compiled, so nothing recompiles); under DDP the
ranks share the items out. The trainer and this module's `evaluate` both call it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from configs.errors import UserError
from configs.schema import EvalConfig
from gpt.checkpoint import load_model
from gpt.data import ShardDataset
from gpt.encoding import EOT, gpt2_encoding
from gpt.model import unwrap_model
from gpt.runtime import Runtime, resolve_device, resolve_dtype, reuse_freed_memory, trained_dtype


class EvalError(UserError):
    """Evaluation input that cannot be used; the message is one line."""


def evaluate(checkpoint_dir: str | Path, data_dir: str | Path, eval_config: EvalConfig, device: str = "auto",
             dtype: str | None = None) -> dict[str, Any]:
    """Score a checkpoint on the val shards in `data_dir` (and HellaSwag when configured), under
    the autocast it was trained with (its train.dtype, resolved on `device`; `dtype` overrides).

    Returns a flat dict: checkpoint, iteration, val_loss, perplexity, tokens, bytes,
    bits_per_byte, batches, dtype, and hellaswag_items/_acc/_acc_norm when HellaSwag ran.
    """
    hellaswag_items = None
    if eval_config.hellaswag_path:  # read first, so a bad path fails before the slow part
        hellaswag_items = read_hellaswag(eval_config.hellaswag_path, eval_config.hellaswag_max_items)
    torch_device = resolve_device(device)
    model, state = load_model(checkpoint_dir, torch_device)
    torch_dtype = resolve_dtype(dtype or trained_dtype(state), torch_device)
    encoding = gpt2_encoding()
    val = ShardDataset(data_dir, "val", model.config.block_size)

    token_bytes = torch.tensor(utf8_bytes_per_token(encoding), dtype=torch.int64)
    loss_sum, tokens, num_bytes, batches = 0.0, 0, 0, 0
    with reuse_freed_memory(torch_device.type == "cpu"):  # the logits are big blocks, as in training
        with torch.no_grad(), Runtime.single(torch_device, torch_dtype).autocast():
            for x, y in val.sequential_batches(eval_config.batch_size, eval_config.max_batches):
                _, loss = model(x.to(torch_device), y.to(torch_device), return_logits=False)
                loss_sum += loss.item() * y.numel()
                tokens += y.numel()
                num_bytes += int(token_bytes[y].sum())
                batches += 1
        hellaswag_scores = {} if hellaswag_items is None else score_hellaswag(
            model, hellaswag_items, encoding, torch_device, torch_dtype, items_per_batch=eval_config.hellaswag_items_per_batch)
    val_loss = loss_sum / tokens
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "iteration": state["iteration"],
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss),
        "tokens": tokens,
        "bytes": num_bytes,
        "bits_per_byte": loss_sum / (num_bytes * math.log(2)),
        "batches": batches,
        "dtype": str(torch_dtype).removeprefix("torch."),
        **hellaswag_scores,
    }
    return result


def utf8_bytes_per_token(encoding: Any) -> np.ndarray:
    """UTF-8 length of every token id of the encoding (<|endoftext|> = 1)."""
    lengths = np.array([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)], dtype=np.int64)
    lengths[EOT] = 1
    return lengths


# ---------------------------------------------------------------------------------------
# HellaSwag
# ---------------------------------------------------------------------------------------

HELLASWAG_ITEMS_PER_BATCH = EvalConfig.model_fields["hellaswag_items_per_batch"].default  # items per forward pass
_SMALLEST_WIDTH = 16


def read_hellaswag(path: str | Path, max_items: int | None, shown_as: str | None = None) -> list[dict[str, Any]]:
    """Items {ind, ctx, label, endings[4]} from a local jsonl file (a path or a file:// URL):
    all of them, or `max_items` spread evenly across the file — it is ordered by source
    (ActivityNet's ~3,000 short items first, then WikiHow's), so its first N would be of one
    kind only. `shown_as` names the file in errors (e.g. the URL it came from)."""
    text_path = str(path)
    if "://" in text_path and not text_path.startswith("file://"):
        raise EvalError(f"eval.hellaswag_path {text_path} is a URL; gpt.evaluate reads local files, download it first")
    local = Path(text_path.removeprefix("file://"))
    if not local.is_file():
        raise EvalError(f"eval.hellaswag_path {local} does not exist; point it at a HellaSwag jsonl or unset it")
    items = []
    with open(local, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            if not (isinstance(item, dict) and {"ctx", "endings", "label"} <= item.keys() and len(item["endings"]) == 4):
                raise EvalError(f"{shown_as or local} line {number} is not a HellaSwag item (ctx, 4 endings, label); "
                                "point eval.hellaswag_path at HellaSwag's hellaswag_val.jsonl")
            items.append(item)
    if not items:
        raise EvalError(f"{shown_as or local} holds no HellaSwag items; point eval.hellaswag_path at HellaSwag's hellaswag_val.jsonl")
    if max_items is not None and max_items < len(items):
        items = [items[i * len(items) // max_items] for i in range(max_items)]
    return items


def render_rows(item: dict[str, Any], encoding: Any, block_size: int) -> list[tuple[list[int], int]]:
    """The four rows context+ending of an item, each with how many of its last tokens are the
    ending's (the scored ones). The leading space belongs to the ending's first token; rows
    longer than block_size + 1 lose their oldest context tokens, and the first token of a row
    is never scored (nothing predicts it)."""
    context = encoding.encode_ordinary(item["ctx"])
    rows = []
    for ending in item["endings"]:
        ending_tokens = encoding.encode_ordinary(" " + ending)
        row = (context + ending_tokens)[-(block_size + 1) :]
        rows.append((row, min(len(ending_tokens), len(row) - 1)))
    return rows


def render_example(item: dict[str, Any], encoding: Any, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One item as four rows context+ending (padded with 0) and a mask of the ending tokens."""
    rows = render_rows(item, encoding, block_size)
    width = max(len(row) for row, _ in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (row, scored) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(row) - scored : len(row)] = 1
    return tokens, mask


def batch_width(width: int, block_size: int) -> int:
    """The input width a batch is padded to: the smallest of 16, 24, 32, 48, 64, 96, … (powers
    of two and 1.5× them) that holds `width`, at most block_size: a batch wastes at most a
    third of its width, and the allocator sees a handful of shapes."""
    size = _SMALLEST_WIDTH
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= width:
                return min(candidate, block_size)
        size *= 2


@torch.no_grad()
def hellaswag_losses(model: torch.nn.Module, items: list[dict[str, Any]], encoding: Any, runtime: Runtime | torch.device | str,
                     items_per_batch: int = HELLASWAG_ITEMS_PER_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of each ending of each item, in this process only (no DDP split): the total
    cross-entropy (nats, float64) of the ending's tokens and how many tokens were scored, two
    (len(items), 4) tensors on the CPU, in the order of `items`. `runtime` as in
    `score_hellaswag` (a bare device scores in float32).

    The 4 × len(items) rows are scored 4 × items_per_batch at a time, rows of similar length
    together, right-padded to a width of `batch_width` (causal attention: padding never
    changes the positions before it); a last short batch is filled with empty rows, so every
    batch has the same number of rows.
    """
    runtime = as_runtime(runtime)
    # The plain module, also under torch.compile or DDP: scoring compiles nothing (build-nanogpt #79) and runs
    # no DDP collectives; and only the ending positions reach the 50304-wide head, ~2x faster than full logits.
    model = unwrap_model(model)
    block_size = model.config.block_size
    rows = [(i, j, row, num_scored) for i, item in enumerate(items)
            for j, (row, num_scored) in enumerate(render_rows(item, encoding, block_size))]
    rows.sort(key=lambda entry: len(entry[2]))
    total = torch.zeros((len(items), 4), dtype=torch.float64)
    count = torch.zeros((len(items), 4), dtype=torch.int64)
    num_rows = 4 * items_per_batch
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), num_rows):
            batch = rows[start : start + num_rows]
            width = batch_width(len(batch[-1][2]) - 1, block_size)  # sorted: the last row is the longest
            tokens = torch.zeros((num_rows, width + 1), dtype=torch.long)
            scored = torch.zeros((num_rows, width), dtype=torch.bool)  # target positions of ending tokens
            for r, (_, _, row, num_scored) in enumerate(batch):
                tokens[r, : len(row)] = torch.tensor(row)
                scored[r, len(row) - 1 - num_scored : len(row) - 1] = True
            x, y = runtime.to_device((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
            scored = scored.to(runtime.device)
            with runtime.autocast():
                logits = model.lm_head(model.hidden_states(x)[scored])
            losses = F.cross_entropy(logits.float(), y[scored], reduction="none")
            sums = torch.zeros(num_rows, dtype=torch.float64, device=runtime.device)
            sums.index_add_(0, scored.nonzero()[:, 0], losses.double())
            where = (torch.tensor([entry[0] for entry in batch]), torch.tensor([entry[1] for entry in batch]))
            total[where] = sums[: len(batch)].cpu()
            count[where] = scored.sum(dim=1)[: len(batch)].cpu()
    finally:
        model.train(was_training)
    return total, count


def score_hellaswag(model: torch.nn.Module, items: list[dict[str, Any]], encoding: Any, runtime: Runtime | torch.device | str,
                    dtype: torch.dtype | None = None, items_per_batch: int = HELLASWAG_ITEMS_PER_BATCH) -> dict[str, Any]:
    """HellaSwag accuracy of `model` (plain, compiled or DDP-wrapped) on `items`:
    {hellaswag_items, hellaswag_acc (lowest total ending loss), hellaswag_acc_norm (lowest
    mean loss per token)}; the accuracies are None for no items.

    `runtime` is a gpt.runtime.Runtime (its device, precision and place in a DDP job) or a
    bare device (one process; `dtype` then defaults to float32). Under DDP every rank must
    call this with the same items: each scores every world_size-th of them and the counts
    are all-reduced, so every rank returns the totals of all items.
    """
    runtime = as_runtime(runtime, dtype)
    share = items[runtime.rank :: runtime.world_size]
    total, count = hellaswag_losses(model, share, encoding, runtime, items_per_batch=items_per_batch)
    labels = torch.tensor([int(item["label"]) for item in share], dtype=torch.int64)
    total = total.masked_fill(count == 0, math.inf)  # an ending with no token to score (an empty context) never wins
    mean = total / count
    correct, correct_norm = (int((losses.argmin(dim=1) == labels).sum()) for losses in (total, mean))
    counts = torch.tensor([len(share), correct, correct_norm], dtype=torch.int64, device=runtime.device)
    if runtime.world_size > 1:
        dist.all_reduce(counts)
    num_items, correct, correct_norm = counts.tolist()
    return {
        "hellaswag_items": num_items,
        "hellaswag_acc": correct / num_items if num_items else None,
        "hellaswag_acc_norm": correct_norm / num_items if num_items else None,
    }


def as_runtime(runtime: Runtime | torch.device | str, dtype: torch.dtype | None = None) -> Runtime:
    """A Runtime as given (`dtype` overrides its precision), or one process on a bare device."""
    if isinstance(runtime, Runtime):
        return runtime if dtype is None or dtype == runtime.dtype else replace(runtime, dtype=dtype)
    return Runtime.single(runtime, dtype or torch.float32)
