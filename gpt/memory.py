"""How much memory training needs, estimated before the first step, and what is free.

The trainer prints the estimate and, when it exceeds the free memory of the device (CUDA:
`torch.cuda.mem_get_info`; CPU: MemAvailable of /proc/meminfo), stops with one line naming the
largest micro-batch that fits, instead of an out-of-memory traceback an hour in. The Prefect
train task shows the same estimate in the model card.

What is counted, for one process and one micro-batch of `batch_size` sequences:

- parameters, their gradients and AdamW's two moments: 4 × 4 bytes per parameter (float32);
- under bf16/fp16 autocast, the 16-bit copies of the weights that autocast keeps for the
  forward and backward (2 bytes per parameter);
- activations: what autograd keeps per token and layer for the backward pass, counted from the
  tensors the GPT saves (listed with torch.autograd.graph.saved_tensors_hooks):
  17 × n_embd floats in float32 (the block's input, the LayerNorm outputs, q/k/v, the attention
  output before and after re-assembly, the residual, the 4 × n_embd MLP input and GELU output);
  under autocast the matmul inputs are kept in 16 bits, 38 × n_embd bytes in all. Plus the
  attention's log-sum-exp and the LayerNorm statistics, and dropout masks when dropout > 0;
- the loss: one chunk of head_cross_entropy (its logits and their float32 log-softmax), the
  head weight's gradients (the float32 sum, its scaled copy and the embedding's, which autograd
  adds), the weight in the autocast dtype and the gradient of the final hidden states;
- a margin of 10% of the above for allocator rounding, fragmentation and kernels' workspaces.

Not counted: the process itself (the CUDA context, torch's libraries), which the free memory
measured after start-up already excludes, and torch.compile's own memory on the first step.
Checked against the peak RSS of real training steps on CPU (tests/test_memory_estimate.py):
within 0.8–1.25× of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from configs.errors import UserError
from configs.schema import ModelConfig
from gpt.model import LOSS_CHUNK_LOGITS

GB = 1e9
MARGIN = 0.10  # allocator rounding and fragmentation, cuBLAS/oneDNN workspaces


class NotEnoughMemory(UserError):
    """The configured micro-batch does not fit in the device's free memory; one line."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs, by part, for a micro-batch of `batch_size` sequences."""

    batch_size: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int  # including the 16-bit weight copies of autocast
    loss: int  # the head's chunked cross-entropy
    margin: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.loss + self.margin

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "AdamW state": self.optimizer,
            "activations": self.activations,
            "loss (head)": self.loss,
            "margin": self.margin,
        }

    def describe(self) -> str:
        """One line: the total and its parts in GB."""
        parts = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.parts().items())
        return f"~{self.total / GB:.2f} GB for a micro-batch of {self.batch_size} ({parts} GB)"


def estimate_training_memory(model: ModelConfig, batch_size: int, dtype: torch.dtype) -> MemoryEstimate:
    """The memory one process needs to train `model` on micro-batches of `batch_size` sequences
    of model.block_size tokens with autocast `dtype` (float32: none), AdamW and the chunked loss."""
    n_params = model.num_params(non_embedding=False)
    C, L, V, H = model.n_embd, model.n_layer, model.vocab_size, model.n_head
    tokens = batch_size * model.block_size
    low = dtype in (torch.bfloat16, torch.float16)
    width = 2 if low else 4  # bytes of an element in the matmuls' dtype

    per_token_layer = (38 if low else 68) * C + 4 * H + 16  # saved tensors + log-sum-exp + LayerNorm stats
    if model.dropout > 0:
        per_token_layer += 3 * C  # one-byte masks: residual, MLP and attention-output dropout
    per_token = L * per_token_layer + 3 * 4 * C  # + the embedding sum, ln_f's input and output
    weight_copies = 2 * n_params if low else 0
    activations = tokens * per_token + weight_copies

    chunks = math.ceil(tokens * V / LOSS_CHUNK_LOGITS)
    chunk_logits = math.ceil(tokens / chunks) * V
    loss = (
        chunk_logits * (10 if low else 8)  # logits, then their log-softmax in float32 (from a float32 copy under autocast)
        + V * C * 4 * 3  # the head weight's float32 gradient, scaled in the backward, and the embedding's before they are added
        + (V * C * 2 * width if low else 0)  # under autocast: the weight's cast and each chunk's gradient before the sum
        + tokens * C * 4  # the hidden states' gradient
    )
    base = {
        "parameters": 4 * n_params,
        "gradients": 4 * n_params,
        "optimizer": 8 * n_params,
        "activations": activations,
        "loss": loss,
    }
    return MemoryEstimate(batch_size=batch_size, margin=int(MARGIN * sum(base.values())), **base)


def largest_batch_that_fits(model: ModelConfig, dtype: torch.dtype, free_bytes: int, at_most: int) -> int:
    """The largest micro-batch (1..at_most) whose estimate fits in free_bytes; 0 when none does."""
    low, high = 0, at_most  # the estimate grows with the batch: bisect
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_training_memory(model, middle, dtype).total <= free_bytes:
            low = middle
        else:
            high = middle - 1
    return low


def free_memory(device: torch.device) -> int | None:
    """Bytes free for this process on the device: CUDA's free memory, or the CPU's available
    RAM (MemAvailable); None where it cannot be told (other devices, no /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def free_memory_per_process(device: torch.device, processes_here: int) -> int | None:
    """free_memory for one of `processes_here` training processes on this machine: on CPU they
    share the RAM, on CUDA each has its own card."""
    free = free_memory(device)
    return free // max(processes_here, 1) if free is not None and device.type == "cpu" else free


def fit_verdict(model: ModelConfig, batch_size: int, dtype: torch.dtype, free_bytes: int) -> str:
    """'fits', or 'does not fit: the largest micro-batch that fits is N' (the model card's words)."""
    if estimate_training_memory(model, batch_size, dtype).total <= free_bytes:
        return "fits"
    return f"does not fit: the largest micro-batch that fits is {largest_batch_that_fits(model, dtype, free_bytes, batch_size)}"


def check_memory(
    model: ModelConfig, batch_size: int, grad_accum_steps: int, dtype: torch.dtype, free_bytes: int | None, device: str
) -> MemoryEstimate:
    """The estimate for this micro-batch; a NotEnoughMemory naming the largest micro-batch that fits
    (and the grad_accum_steps that keeps the tokens per iteration) when it exceeds free_bytes."""
    estimate = estimate_training_memory(model, batch_size, dtype)
    if free_bytes is None or estimate.total <= free_bytes:
        return estimate
    fits = largest_batch_that_fits(model, dtype, free_bytes, batch_size)
    where = f"train.batch_size={batch_size} needs {estimate.describe()} on {device}, but {free_bytes / GB:.2f} GB are free"
    if fits == 0:
        raise NotEnoughMemory(f"{where}; not even a micro-batch of 1 fits: use a smaller model, a shorter "
                           f"model.block_size or a device with more memory (or set train.memory_check=false to try anyway)")
    sequences = batch_size * grad_accum_steps  # per iteration: keep them with a divisor of it
    keeps = max((b for b in range(1, fits + 1) if sequences % b == 0), default=1)
    raise NotEnoughMemory(
        f"{where}; the largest micro-batch that fits is {fits}: set train.batch_size={keeps} and "
        f"train.grad_accum_steps={sequences // keeps} to keep the {sequences} sequences per iteration "
        f"(or train.memory_check=false to try anyway)"
    )
