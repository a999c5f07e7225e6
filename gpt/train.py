"""The trainer: nanoGPT's training loop with exact resume, LR continuation and DDP.

In-process:  train(config, data_dir, run_dir, on_event) -> summary dict
CLI:         python -m gpt.train --config configs/demo.yaml [--data-dir SHARDS] [--set k=v ...] [--run-dir DIR]
Multi-GPU:   torchrun --nproc_per_node 8 -m gpt.train --config ... [--data-dir ...]

Without --data-dir the CLI trains on the tokenize artifact that the flow would use for
the same config (same versions, computed by storage.versions), or says how to make it.

One iteration = one optimizer step over `train.grad_accum_steps` micro-batches of
`train.batch_size` sequences, split across the processes of a DDP job. Every
`eval_interval` steps the val loss is measured, every `checkpoint_interval` steps a
checkpoint is written, and both happen at the end. Events (start, train, eval,
checkpoint, schedule, done) go to `<run_dir>/metrics.jsonl`, the `on_event` callback
and the log.

Exact resume: a run killed at any moment (even SIGKILL) and started again ends with
bit-identical weights and optimizer state on CPU, because everything a step depends on
is either in the checkpoint (weights, optimizer, loader cursor, LR schedule, grad
scaler) or a pure function of (seed, iteration, micro-step, rank): the batches (see
gpt/data.py) and the dropout masks (torch is reseeded at every iteration).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import logging
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configs.errors import TransientError, UserError
from configs.secrets import redact
from configs.schema import ModelConfig, PipelineConfig, describe, load_config
from gpt.checkpoint import (
    Checkpoint,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
    step_name,
)
from gpt.data import ShardDataset, TrainLoader
from gpt.flops import mfu, peak_flops
from gpt.model import GPT, GPTConfig
from gpt.schedule import Schedule
from storage.artifacts import ArtifactStore, write_text_atomic
from storage.versions import plan_download, plan_tokenize, stage_code_version

METRICS_FILE = "metrics.jsonl"
# Model settings that must match to resume a run (dropout may change between sessions).
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
# Train settings that shape the LR schedule; on resume the checkpoint's schedule wins.
SCHEDULE_FIELDS = ("learning_rate", "min_lr", "schedule", "warmup_iters", "lr_decay_iters", "wsd_decay_fraction")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger(__name__)


class TrainError(UserError):
    """A training run that cannot start with these settings; the message is one line."""


class TrainingDiverged(UserError):
    """The loss, gradients or weights became NaN/inf; nothing from that iteration was saved."""


# ---------------------------------------------------------------------------------------
# Runtime: processes, device, precision
# ---------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process trains: its device, precision and place in a DDP job."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for forward passes (a no-op in float32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return tuple(t.to(self.device) for t in batch)


def setup_runtime(device_setting: str, dtype_setting: str, num_threads: int | None) -> Runtime:
    """Join the DDP job when launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), pick
    the device and precision, and apply the thread count."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if num_threads:
        torch.set_num_threads(num_threads)
    device = resolve_device(device_setting, local_rank if world_size > 1 else None)
    owns_process_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_process_group = True
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in float32
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(
        device=device,
        dtype=resolve_dtype(dtype_setting, device),
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        owns_process_group=owns_process_group,
    )


def resolve_device(setting: str, local_rank: int | None = None) -> torch.device:
    """`auto` → CUDA when available, else CPU. Under DDP a bare `cuda` means this process's GPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"train.device={setting} but no CUDA GPU is visible; set train.device=auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 autocast on GPUs that support it (float16 on older ones), float32 on CPU."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# glibc's mallopt() parameters and their defaults (malloc.h, mallopt(3)).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Keep freed memory in the process while training on CPU (glibc only; else a no-op).

    PyTorch's CPU allocator is plain malloc, and glibc serves every block above 32 MiB
    with a fresh mmap and gives it back with munmap on free. The logits of a 50304-wide
    head are such blocks (8 × 128 tokens × 50304 × 4 bytes = 206 MB, and cross-entropy's
    forward and backward make three more), so each micro-step faulted in and zeroed about
    1.6 GB of new pages: ~400k page faults and most of the system time of an iteration.
    Here large blocks come from the heap and the heap is not trimmed, so the same pages
    are reused every step; on exit the defaults are restored and the memory handed back.
    Only where memory comes from changes, not what is computed.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def micro_steps_per_rank(grad_accum_steps: int, world_size: int) -> int:
    if grad_accum_steps % world_size:
        raise TrainError(
            f"train.grad_accum_steps ({grad_accum_steps}) must be divisible by the number of processes "
            f"({world_size}); change one of them"
        )
    return grad_accum_steps // world_size


# ---------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    """The torch seed of one iteration on one rank: dropout masks depend on nothing else."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, as JSON."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


def _bytes_tensor(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------
# Events: metrics.jsonl, the callback, the log
# ---------------------------------------------------------------------------------------


class EventLog:
    """Sends each event to metrics.jsonl, the on_event callback and the log (rank 0 only)."""

    def __init__(self, metrics_path: Path | None, on_event: Callable[[dict], None] | None, enabled: bool):
        self.metrics_path = metrics_path
        self.on_event = on_event
        self.enabled = enabled

    def emit(self, event: str, log_level: int = logging.INFO, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **fields, "time": time.time()}
        if not self.enabled:
            return record
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.on_event is not None:
            self.on_event(record)
        logger.log(log_level, describe_event(record))
        return record


def describe_event(event: dict[str, Any]) -> str:
    """One human-readable log line per event."""
    kind = event["event"]
    if kind == "start":
        resumed = f", resumed from iteration {event['resumed_from_iter']}" if event["resumed_from_iter"] is not None else ""
        return (
            f"training {event['params'] / 1e6:.2f}M parameters on {event['device']} ({event['dtype']}, "
            f"{event['world_size']} process(es)), {event['tokens_per_iter']:,} tokens/iter, "
            f"iterations {event['start_iter']}→{event['max_iters']}{resumed}"
        )
    if kind == "train":
        mfu_text = f"{event['mfu'] * 100:.1f}%" if event["mfu"] is not None else "n/a"
        return (
            f"iter {event['iter']}: loss {event['loss']:.4f}, lr {event['lr']:.3e}, grad norm {event['grad_norm']:.3f}, "
            f"{event['ms_per_iter']:.1f} ms/iter, {event['tokens_per_sec']:,.0f} tokens/s, mfu {mfu_text}"
        )
    if kind == "eval":
        return f"step {event['iter']}: val loss {event['val_loss']:.4f}"
    if kind == "checkpoint":
        return f"step {event['iter']}: saved checkpoint {event['path']}"
    if kind == "schedule":
        return event["message"]
    if kind == "done":
        return (
            f"done at iteration {event['iterations']}: val loss {_fmt(event['val_loss'])}, "
            f"best {_fmt(event['best_val_loss'])}, {event['tokens_trained']:,} tokens trained"
        )
    return json.dumps(event)


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def _metric_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, event) for each whole line of a metrics file; a line torn by a kill is skipped."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield line, json.loads(line)
        except ValueError:
            continue


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl, oldest first (none when it does not exist)."""
    return [event for _, event in _metric_lines(path)]


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the history that led to the checkpoint at `step`: drop train events of
    iterations >= step, eval/checkpoint events after step, and a line torn by a kill.
    The resumed run writes those iterations again (identically)."""
    if not path.exists():
        return
    kept = []
    for line, event in _metric_lines(path):
        iteration = event.get("iter")
        if iteration is None or (event["event"] == "train" and iteration < step) or (event["event"] != "train" and iteration <= step):
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------
# The training step and evaluation
# ---------------------------------------------------------------------------------------


def build_model(config: PipelineConfig, runtime: Runtime) -> tuple[GPT, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The freshly initialized model (the same weights on every rank: seeded with train.seed),
    its AdamW, and the grad scaler (active for float16 only)."""
    tc = config.train
    seed_everything(tc.seed)
    model = GPT(GPTConfig.from_model_config(config.model)).to(runtime.device)
    optimizer = model.configure_optimizers(
        tc.weight_decay, tc.learning_rate, (tc.beta1, tc.beta2), runtime.device.type, tc.fused_adamw
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    return model, optimizer, scaler


def train_step(
    train_model: torch.nn.Module,
    loader: TrainLoader,
    micro_steps: int,
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
) -> tuple[float, float]:
    """Forward and backward over this rank's micro-batches (`loader.next_batch()`); returns
    the job's mean loss and the gradient norm (before clipping). The optimizer step is
    left to the caller (optimizer_step), so a diverged iteration can be refused first."""
    loss_sum = torch.zeros((), device=runtime.device)
    for micro_step in range(micro_steps):
        x, y = runtime.to_device(loader.next_batch())
        if isinstance(train_model, DDP):  # all-reduce gradients only after the last micro-step
            train_model.require_backward_grad_sync = micro_step == micro_steps - 1
        with runtime.autocast():
            # [1]: the logits (batch × block × 50304 floats) are not kept alive through backward
            loss = train_model(x, y)[1] / micro_steps  # the gradient of the mean over all micro-batches
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if runtime.world_size > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= runtime.world_size
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return loss_sum.item(), grad_norm.item()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Apply the gradients of train_step (skipped by the grad scaler on float16 overflow) and clear them."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def estimate_val_loss(model: GPT, val_data: ShardDataset, batch_size: int, max_batches: int, runtime: Runtime) -> float:
    """Mean loss per token over the first val windows (the same ones every time); under
    DDP the batches are shared out across ranks and the sums combined."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, token count
    for index, batch in enumerate(val_data.sequential_batches(batch_size, max_batches)):
        if index % runtime.world_size != runtime.rank:
            continue
        x, y = runtime.to_device(batch)
        with runtime.autocast():
            _, loss = model(x, y)
        totals[0] += loss.double() * y.numel()
        totals[1] += y.numel()
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


# ---------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the loop has achieved so far; saved in state.json."""

    iteration: int = 0  # completed iterations = the index of the next one
    tokens_trained: int = 0
    val_loss: float | None = None  # the latest evaluation
    val_loss_iter: int | None = None
    best_val_loss: float | None = None

    def record_val_loss(self, step: int, value: float) -> None:
        self.val_loss, self.val_loss_iter = value, step
        if self.best_val_loss is None or value < self.best_val_loss:
            self.best_val_loss = value


def train(
    config: PipelineConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    on_event: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume, or continue) the run in `run_dir` on the shards in `data_dir`.

    Returns run_dir, iterations (the final iteration count), start_iter, resumed,
    latest_checkpoint, val_loss (last evaluation), best_val_loss, tokens_trained,
    params and already_complete (True when the run had already reached max_iters
    and nothing was done).
    """
    tc = config.train
    runtime = setup_runtime(tc.device, tc.dtype, tc.num_threads)
    try:
        with reuse_freed_memory(runtime.device.type == "cpu"):
            return _train(config, Path(data_dir), Path(run_dir), runtime, on_event)
    except torch.OutOfMemoryError:  # the same again would fail the same way: the user's to change
        raise TrainError(
            f"out of memory on {runtime.device} with train.batch_size={tc.batch_size} × model.block_size="
            f"{config.model.block_size}; lower train.batch_size and raise train.grad_accum_steps (tokens/iter stay the same)"
        ) from None
    finally:
        if runtime.owns_process_group:
            dist.destroy_process_group()


def _train(
    config: PipelineConfig, data_dir: Path, run_dir: Path, runtime: Runtime, on_event: Callable[[dict], None] | None
) -> dict[str, Any]:
    tc = config.train
    micro_steps = micro_steps_per_rank(tc.grad_accum_steps, runtime.world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventLog(run_dir / METRICS_FILE, on_event, enabled=runtime.is_main)
    train_data = ShardDataset(data_dir, "train", config.model.block_size)
    val_data = ShardDataset(data_dir, "val", config.model.block_size)

    model, optimizer, scaler = build_model(config, runtime)
    loader = TrainLoader(train_data, tc.batch_size, tc.seed, runtime.rank, runtime.world_size)
    schedule = Schedule.from_config(tc)
    progress = Progress()

    resume_from = _find_resume_checkpoint(run_dir, runtime)
    saved_state = None
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from, map_location=runtime.device, verify=False)
        _check_same_model(checkpoint.state["config"]["model"], config.model, run_dir)
        schedule, progress = _restore(checkpoint, model, optimizer, scaler, loader)
        saved_state = checkpoint.state
        if progress.iteration >= tc.max_iters:
            return _already_complete(config, run_dir, resume_from, progress, model, events)
        if runtime.is_main:
            trim_metrics(run_dir / METRICS_FILE, progress.iteration)
    elif runtime.is_main:  # a fresh start: events of an attempt killed before its first checkpoint are void
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    start_iter = progress.iteration

    params = model.get_num_params()
    flops_per_token = config.model.flops_per_token()
    tokens_per_iter = config.tokens_per_iter()
    device_peak = peak_flops(runtime.device, tc.peak_tflops)
    job_peak = device_peak * runtime.world_size if device_peak else None
    events.emit(
        "start",
        run_dir=str(run_dir),
        data_dir=str(data_dir),
        params=params,
        flops_per_token=flops_per_token,
        tokens_per_iter=tokens_per_iter,
        device=str(runtime.device),
        dtype=str(runtime.dtype).removeprefix("torch."),
        world_size=runtime.world_size,
        micro_steps_per_rank=micro_steps,
        compile=tc.compile,
        peak_flops=job_peak,
        start_iter=start_iter,
        max_iters=tc.max_iters,
        resumed_from_iter=start_iter if resume_from is not None else None,
        resumed_from=str(resume_from) if resume_from is not None else None,
    )
    if saved_state is not None:
        schedule = _continue_schedule(schedule, saved_state["config"]["train"], config, start_iter, events)

    # torch.compile speeds up training only; evaluation and checkpoints use the plain `model`.
    train_model: torch.nn.Module = torch.compile(model) if tc.compile else model
    if runtime.world_size > 1:
        train_model = DDP(train_model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)

    last_checkpoint = resume_from
    if resume_from is None:  # the loss at initialization, like nanoGPT's step 0
        progress.record_val_loss(0, estimate_val_loss(model, val_data, tc.batch_size, tc.eval_iters, runtime))
        events.emit("eval", iter=0, val_loss=progress.val_loss)
    train_seconds, iters_since_log = 0.0, 0
    for it in range(start_iter, tc.max_iters):
        started = time.perf_counter()
        lr = schedule.lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(iteration_seed(tc.seed, runtime.rank, it))
        loss, grad_norm = train_step(train_model, loader, micro_steps, runtime, scaler, optimizer, tc.grad_clip)
        if not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"training diverged at iteration {it}: loss {loss}, grad norm {grad_norm}; nothing from this "
                f"iteration was saved and the last good checkpoint is {last_checkpoint or 'none (none was written yet)'}; "
                "lower train.learning_rate or raise train.warmup_iters, then rerun to resume from it"
            )
        optimizer_step(optimizer, scaler)
        progress.iteration = it + 1
        progress.tokens_trained += tokens_per_iter
        train_seconds += time.perf_counter() - started
        iters_since_log += 1

        step = it + 1
        if it % tc.log_interval == 0 or step == tc.max_iters:
            tokens_per_sec = tokens_per_iter * iters_since_log / train_seconds
            events.emit(
                "train",
                iter=it,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                ms_per_iter=1000 * train_seconds / iters_since_log,
                tokens_per_sec=tokens_per_sec,
                mfu=mfu(flops_per_token, tokens_per_sec, job_peak),
            )
            train_seconds, iters_since_log = 0.0, 0
        if step % tc.eval_interval == 0 or step == tc.max_iters:
            val_loss = estimate_val_loss(model, val_data, tc.batch_size, tc.eval_iters, runtime)
            if not math.isfinite(val_loss):
                raise TrainingDiverged(
                    f"val loss is {val_loss} at step {step}; nothing was saved and the last good checkpoint is "
                    f"{last_checkpoint or 'none'}; lower train.learning_rate, then rerun to resume from it"
                )
            progress.record_val_loss(step, val_loss)
            events.emit("eval", iter=step, val_loss=val_loss)
        if step % tc.checkpoint_interval == 0 or step == tc.max_iters:
            last_checkpoint = checkpoints_dir(run_dir) / step_name(step)
            if runtime.is_main:
                _save(run_dir, model, optimizer, scaler, loader, schedule, progress, config, runtime)
            events.emit("checkpoint", iter=step, path=str(last_checkpoint))

    summary = _summary(run_dir, progress, start_iter, resume_from is not None, last_checkpoint, params, already_complete=False)
    events.emit("done", **{k: v for k, v in summary.items() if k != "run_dir"})
    return summary


def _restore(
    checkpoint: Checkpoint, model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loader: TrainLoader
) -> tuple[Schedule, Progress]:
    """Put the checkpoint's weights, optimizer, grad scaler, loader cursor and RNG states
    in place; return its LR schedule and progress."""
    state = checkpoint.state
    model.load_state_dict(checkpoint.model)
    optimizer.load_state_dict(checkpoint.optimizer)
    if state["grad_scaler"]:
        scaler.load_state_dict(state["grad_scaler"])
    loader.load_state_dict(state["loader"])
    restore_rng_state(state["rng"])
    progress = Progress(
        iteration=checkpoint.iteration,
        tokens_trained=state["tokens_trained"],
        val_loss=state["last_val_loss"],
        val_loss_iter=state["last_val_loss_iter"],
        best_val_loss=state["best_val_loss"],
    )
    return Schedule.from_state_dict(state["schedule"]), progress


def _find_resume_checkpoint(run_dir: Path, runtime: Runtime) -> Path | None:
    """Rank 0 clears half-written checkpoints and picks the newest intact one; every rank
    resumes from that same folder."""
    found = None
    if runtime.is_main:
        remove_temporaries(run_dir)
        found = latest_checkpoint(run_dir)
    if runtime.world_size > 1:
        shared = [str(found) if found else None]
        dist.broadcast_object_list(shared, src=0)
        found = Path(shared[0]) if shared[0] else None
    return found


def _check_same_model(saved: dict[str, Any], requested: ModelConfig, run_dir: Path) -> None:
    differences = [
        f"{name} {saved.get(name)} there, {getattr(requested, name)} requested"
        for name in ARCHITECTURE_FIELDS
        if saved.get(name) != getattr(requested, name)
    ]
    if differences:
        raise TrainError(
            f"{run_dir} holds checkpoints of a different model ({'; '.join(differences)}); "
            "pick a new train.run_name (or --run-dir) to train this model"
        )


def _continue_schedule(
    schedule: Schedule, saved_train: dict[str, Any], config: PipelineConfig, at_iter: int, events: EventLog
) -> Schedule:
    """The checkpoint's schedule, continued with train.continue_policy if max_iters grew."""
    tc = config.train
    if tc.max_iters > schedule.max_iters:
        schedule, continuation = schedule.continued(tc, at_iter)
        level = logging.WARNING if continuation.is_jump else logging.INFO
        events.emit("schedule", log_level=level, message=continuation.describe(), **vars(continuation))
        return schedule
    changed = [name for name in SCHEDULE_FIELDS if saved_train.get(name) != getattr(tc, name)]
    if changed:
        message = (
            f"{', '.join('train.' + n for n in changed)} changed since the checkpoint; the checkpoint's LR schedule "
            "is kept so the resumed run follows the same curve (it changes only when train.max_iters grows)"
        )
        events.emit("schedule", log_level=logging.WARNING, message=message)
    return schedule


def _save(
    run_dir: Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: TrainLoader,
    schedule: Schedule,
    progress: Progress,
    config: PipelineConfig,
    runtime: Runtime,
) -> Path:
    step = progress.iteration
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged(f"weights became NaN/inf by step {step}; no checkpoint written; lower train.learning_rate and rerun")
    state = {
        "tokens_trained": progress.tokens_trained,
        "val_loss": progress.val_loss if progress.val_loss_iter == step else None,
        "last_val_loss": progress.val_loss,
        "last_val_loss_iter": progress.val_loss_iter,
        "best_val_loss": progress.best_val_loss,
        "loader": loader.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": rng_state(),
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "world_size": runtime.world_size,
        "config": redact(config.model_dump(mode="json")),  # a source URL may hold a password
        "code_version": stage_code_version("train"),
    }
    return save_checkpoint(run_dir, step, model, optimizer, state, config.train.keep_last_checkpoints)


def _already_complete(
    config: PipelineConfig, run_dir: Path, checkpoint: Path, progress: Progress, model: GPT, events: EventLog
) -> dict[str, Any]:
    """Report, without training or writing anything, that the run reached max_iters."""
    summary = _summary(run_dir, progress, progress.iteration, True, checkpoint, model.get_num_params(), already_complete=True)
    if events.enabled:
        logger.info(
            f"run {run_dir} is already at iteration {progress.iteration} (train.max_iters={config.train.max_iters}); "
            "nothing to do — raise train.max_iters to continue it"
        )
        if events.on_event is not None:
            events.on_event({"event": "done", **{k: v for k, v in summary.items() if k != "run_dir"}, "time": time.time()})
    return summary


def _summary(
    run_dir: Path,
    progress: Progress,
    start_iter: int,
    resumed: bool,
    checkpoint: Path | None,
    params: int,
    already_complete: bool,
) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "iterations": progress.iteration,
        "start_iter": start_iter,
        "resumed": resumed,
        "latest_checkpoint": str(checkpoint) if checkpoint else None,
        "val_loss": progress.val_loss,
        "best_val_loss": progress.best_val_loss,
        "tokens_trained": progress.tokens_trained,
        "params": params,
        "already_complete": already_complete,
    }


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="a YAML file or preset name (default: demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_iters=100")
    parser.add_argument("--data-dir", type=Path,
                        help="folder with train_*.bin and val_*.bin shards (default: the tokenize artifact of this config)")
    parser.add_argument("--run-dir", type=Path, help="default: <storage.root>/runs/<run_name>")
    args = parser.parse_args(argv)

    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s", stream=sys.stdout)
    try:
        config = load_config(args.config, args.set)
        if is_main:
            print(describe(config), flush=True)
        data_dir = args.data_dir or tokenized_data_dir(config, args.config, args.set)
        run_dir = args.run_dir or Path(config.storage.root) / "runs" / config.run_name
        summary = train(config, data_dir, run_dir)
    except (UserError, TransientError) as exc:  # one line; anything else is a bug and keeps its traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    if is_main:
        print(json.dumps(summary), flush=True)
    return 0


def tokenized_data_dir(config: PipelineConfig, config_arg: str, overrides: list[str]) -> Path:
    """The tokenize artifact the flow trains this config on (the same versions), or a
    TrainError naming the command that makes it."""
    store = ArtifactStore(config.storage.root)
    download = plan_download(config.data, store.root)
    version = plan_tokenize(download.version, config.data, config.tokenize)
    if store.exists("tokenize", version):
        return store.path("tokenize", version)
    command = ["python", "-m", "flows.fineweb_pretrain", "--config", config_arg]
    command += [part for item in overrides for part in ("--set", item)] + ["--until", "tokenize"]
    raise TrainError(f"no tokenized data for this config under {store.root} yet (tokenize/{version}); "
                     f"make it with: {shlex.join(command)}  (or pass --data-dir)")


if __name__ == "__main__":
    sys.exit(main())
