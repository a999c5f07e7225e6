"""Evaluate a checkpoint: val loss, perplexity, bits per byte and, optionally, HellaSwag.

Val loss is the mean cross-entropy per token (nats) over the first
`eval.max_batches × eval.batch_size` non-overlapping windows of the val split, the same
windows every time. Bits per byte divides the total loss by the UTF-8 size of the
evaluated tokens, so models with different tokenizers can be compared:

    bpb = loss_nats × tokens / (bytes × ln 2)

where bytes is the length of the evaluated target tokens decoded with GPT-2's encoding;
`<|endoftext|>` counts as one byte (a document separator), not as the 13 characters of
its name.

HellaSwag is scored like karpathy/build-nanogpt: each of the four endings is appended
to the context, and the prediction is the ending with the lowest mean token loss
(acc_norm) or the lowest total loss (acc).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from configs.errors import UserError
from configs.schema import EvalConfig
from gpt.checkpoint import load_model
from gpt.data import ShardDataset
from gpt.model import GPT
from gpt.encoding import EOT, gpt2_encoding
from gpt.runtime import resolve_device, resolve_dtype



class EvalError(UserError):
    """Evaluation input that cannot be used; the message is one line."""


def evaluate(checkpoint_dir: str | Path, data_dir: str | Path, eval_config: EvalConfig, device: str = "auto") -> dict[str, Any]:
    """Score a checkpoint on the val shards in `data_dir` (and HellaSwag when configured).

    Returns a flat dict: checkpoint, iteration, val_loss, perplexity, tokens, bytes,
    bits_per_byte, batches, and hellaswag_items/_acc/_acc_norm when HellaSwag ran.
    """
    hellaswag_items = None
    if eval_config.hellaswag_path:  # read first, so a bad path fails before the slow part
        hellaswag_items = read_hellaswag(eval_config.hellaswag_path, eval_config.hellaswag_max_items)
    torch_device = resolve_device(device)
    model, state = load_model(checkpoint_dir, torch_device)
    dtype = resolve_dtype("auto", torch_device)
    encoding = gpt2_encoding()
    val = ShardDataset(data_dir, "val", model.config.block_size)

    token_bytes = torch.tensor(utf8_bytes_per_token(encoding), dtype=torch.int64)
    loss_sum, tokens, num_bytes, batches = 0.0, 0, 0, 0
    with torch.no_grad(), _autocast(torch_device, dtype):
        for x, y in val.sequential_batches(eval_config.batch_size, eval_config.max_batches):
            _, loss = model(x.to(torch_device), y.to(torch_device))
            loss_sum += loss.item() * y.numel()
            tokens += y.numel()
            num_bytes += int(token_bytes[y].sum())
            batches += 1
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
    }
    if hellaswag_items is not None:
        result.update(hellaswag(model, hellaswag_items, encoding, dtype))
    return result


def utf8_bytes_per_token(encoding: Any) -> np.ndarray:
    """UTF-8 length of every token id of the encoding (<|endoftext|> = 1)."""
    lengths = np.array([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)], dtype=np.int64)
    lengths[EOT] = 1
    return lengths


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------------------------
# HellaSwag
# ---------------------------------------------------------------------------------------


def read_hellaswag(path: str | Path, max_items: int | None) -> list[dict[str, Any]]:
    """Items {ind, ctx, label, endings[4]} from a local jsonl file."""
    text_path = str(path)
    if "://" in text_path and not text_path.startswith("file://"):
        raise EvalError(f"eval.hellaswag_path {text_path} is a URL; gpt.evaluate reads local files, download it first")
    local = Path(text_path.removeprefix("file://"))
    if not local.is_file():
        raise EvalError(f"eval.hellaswag_path {local} does not exist; point it at a HellaSwag jsonl or unset it")
    items = []
    with open(local) as handle:
        for line in handle:
            if line.strip():
                items.append(json.loads(line))
                if max_items is not None and len(items) == max_items:
                    break
    return items


def render_example(item: dict[str, Any], encoding: Any, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows context+ending (padded with 0) and a mask of the ending tokens. Rows
    longer than block_size + 1 lose their oldest context tokens."""
    context = encoding.encode(item["ctx"])
    rows, masks = [], []
    for ending in item["endings"]:
        ending_tokens = encoding.encode(" " + ending)  # the leading space belongs to the ending's first token
        row = (context + ending_tokens)[-(block_size + 1) :]
        scored = min(len(ending_tokens), len(row) - 1)  # the first token of a row has no prediction
        rows.append(row)
        masks.append([0] * (len(row) - scored) + [1] * scored)
    width = max(len(row) for row in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (row, row_mask) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row_mask)] = torch.tensor(row_mask)
    return tokens, mask


@torch.no_grad()
def hellaswag(model: GPT, items: list[dict[str, Any]], encoding: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Accuracy on HellaSwag items: acc (lowest total ending loss) and acc_norm (lowest mean)."""
    device = next(model.parameters()).device
    correct = correct_norm = 0
    for item in items:
        tokens, mask = render_example(item, encoding, model.config.block_size)
        tokens, mask = tokens.to(device), mask.to(device)
        targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -1)  # score only the ending's tokens
        with _autocast(device, dtype):
            logits, _ = model(tokens[:, :-1], targets)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none"
        ).view(4, -1)
        total = losses.sum(dim=1)
        mean = total / (targets != -1).sum(dim=1)
        correct += int(total.argmin().item() == item["label"])
        correct_norm += int(mean.argmin().item() == item["label"])
    count = len(items)
    return {
        "hellaswag_items": count,
        "hellaswag_acc": correct / count if count else None,
        "hellaswag_acc_norm": correct_norm / count if count else None,
    }
