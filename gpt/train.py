"""The trainer: nanoGPT's training loop with exact resume, LR continuation and DDP.

In-process:  train(config, data_dir, run_dir, on_event) -> summary dict
CLI:         python -m gpt.train --config configs/demo.yaml [--data-dir SHARDS] [--set k=v ...] [--run-dir DIR]
Multi-GPU:   torchrun --nproc_per_node 8 -m gpt.train --config ... [--data-dir ...]

Without --data-dir the CLI trains on the tokenize artifact that the flow would use for
the same config (same versions, computed by storage.versions), or says how to make it.

One iteration = one optimizer step over `train.grad_accum_steps` micro-batches of
`train.batch_size` sequences, split across the processes of a DDP job. Every
`eval_interval` iterations the val loss is measured, every `checkpoint_interval` a
checkpoint is written, and both happen at the end. Events go to gpt/metrics.py's log.

Exact resume: a run killed at any moment (even SIGKILL) and started again ends with
bit-identical weights and optimizer state on CPU, because everything a step depends on
is either in the checkpoint (weights, optimizer, and the state_dict of each stateful
object: progress, loader cursor, LR schedule, RNG states, grad scaler) or a pure function
of (seed, iteration, micro-step, rank): the batches (gpt/data.py) and the dropout masks
(gpt/rng.py: torch is reseeded at every iteration).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configs.errors import TransientError, UserError
from configs.schema import ModelConfig, PipelineConfig, describe, load_config
from configs.secrets import redact
from gpt.checkpoint import (
    Checkpoint,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from gpt.data import ShardDataset, TrainLoader
from gpt.encoding import gpt2_encoding
from gpt.evaluate import read_hellaswag, score_hellaswag
from gpt.flops import mfu, peak_flops
from gpt.metrics import METRICS_FILE, METRICS_FORMAT, EventLog, trim_metrics
from gpt.memory import GB, MemoryEstimate, check_memory, free_memory_per_process
from gpt.model import GPT, GPTConfig
from gpt.rng import RngState, iteration_seed, seed_everything
from gpt.runtime import Runtime, reuse_freed_memory, setup_runtime
from gpt.schedule import Schedule
from storage.artifacts import ArtifactStore
from storage.versions import plan_download, plan_tokenize, stage_code_version

# Where a rank launched by the train task writes the kind of error it stopped on (user or transient),
# suffixed with its rank: torchrun's own exit status says only that a rank failed.
ERROR_FILE_ENV = "FWP_ERROR_FILE"
# Model settings that must match to resume a run (dropout may change between sessions).
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
# Train settings that shape the LR schedule; on resume the checkpoint's schedule wins.
LR_LEVEL_FIELDS = ("learning_rate", "min_lr")  # changed on resume, they rescale the rest of the schedule
SCHEDULE_FIELDS = (*LR_LEVEL_FIELDS, "schedule", "warmup_iters", "lr_decay_iters", "wsd_decay_fraction")

logger = logging.getLogger(__name__)


class TrainError(UserError):
    """A training run that cannot start with these settings; the message is one line."""


class TrainingDiverged(UserError):
    """The loss, gradients or weights became NaN/inf; nothing from that iteration was saved."""


def micro_steps_per_rank(grad_accum_steps: int, world_size: int) -> int:
    if grad_accum_steps % world_size:
        raise TrainError(
            f"train.grad_accum_steps ({grad_accum_steps}) must be divisible by the number of processes "
            f"({world_size}); change one of them"
        )
    return grad_accum_steps // world_size


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
            # the loss in chunks: the logits (batch × block × 50304 floats) never exist all at once
            loss = train_model(x, y, return_logits=False)[1] / micro_steps  # the gradient of the mean over all micro-batches
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
            _, loss = model(x, y, return_logits=False)
        totals[0] += loss.double() * y.numel()
        totals[1] += y.numel()
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


@dataclass
class HellaSwagDuringTraining:
    """A fixed subset of HellaSwag, scored every train.hellaswag_interval iterations:
    train.hellaswag_items items spread over the file, the same each time, so the curve moves
    only with the model."""

    items: list[dict[str, Any]]
    runtime: Runtime
    items_per_batch: int

    @classmethod
    def of(cls, config: PipelineConfig, file: str | Path | None, runtime: Runtime) -> HellaSwagDuringTraining | None:
        if not config.train.hellaswag_interval:
            return None
        if file is None:
            logger.warning("train.hellaswag_interval is set but no HellaSwag items were given (eval.hellaswag_path, "
                           "or --hellaswag for python -m gpt.train); training without them")
            return None
        return cls(read_hellaswag(file, config.train.hellaswag_items), runtime, config.eval.hellaswag_items_per_batch)

    def score(self, model: GPT) -> dict[str, Any]:
        scores = score_hellaswag(model, self.items, gpt2_encoding(), self.runtime, items_per_batch=self.items_per_batch)
        return {"acc": scores["hellaswag_acc"], "acc_norm": scores["hellaswag_acc_norm"], "items": scores["hellaswag_items"]}


# ---------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the loop has achieved so far; a stateful object of the checkpoint."""

    iteration: int = 0  # completed iterations = the index of the next one
    tokens_trained: int = 0
    val_loss: float | None = None  # the latest evaluation
    val_loss_iter: int | None = None
    best_val_loss: float | None = None

    def record_val_loss(self, iteration: int, value: float) -> None:
        self.val_loss, self.val_loss_iter = value, iteration
        if self.best_val_loss is None or value < self.best_val_loss:
            self.best_val_loss = value

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class TrainingState:
    """Everything a checkpoint holds besides the weights and the optimizer: each part a
    stateful object with state_dict/load_state_dict, saved under its own key of state.json."""

    progress: Progress
    loader: TrainLoader
    schedule: Schedule
    rng: RngState
    grad_scaler: torch.amp.GradScaler

    def state_dict(self) -> dict[str, Any]:
        parts = {name: getattr(self, name) for name in ("progress", "loader", "schedule", "rng")}
        state = {name: part.state_dict() for name, part in parts.items()}
        state["grad_scaler"] = self.grad_scaler.state_dict() if self.grad_scaler.is_enabled() else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("progress", "loader", "schedule", "rng"):
            getattr(self, name).load_state_dict(state[name])
        if state["grad_scaler"]:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


def train(
    config: PipelineConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    on_event: Callable[[dict], None] | None = None,
    hellaswag_file: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume, or continue) the run in `run_dir` on the shards in `data_dir`; with
    `hellaswag_file` and train.hellaswag_interval, score train.hellaswag_items of its items
    at that interval (and at the start and the end).

    Returns run_dir, iterations (the final iteration count), start_iter, resumed,
    latest_checkpoint, val_loss (last evaluation), best_val_loss, tokens_trained,
    params and already_complete (True when the run had already reached max_iters
    and nothing was done).
    """
    tc = config.train
    runtime = setup_runtime(tc.device, tc.dtype, tc.num_threads)
    try:
        with reuse_freed_memory(runtime.device.type == "cpu"):
            return _train(config, Path(data_dir), Path(run_dir), runtime, on_event, hellaswag_file)
    except torch.OutOfMemoryError:  # the same again would fail the same way: the user's to change
        raise TrainError(
            f"out of memory on {runtime.device} with train.batch_size={tc.batch_size} × model.block_size="
            f"{config.model.block_size}; lower train.batch_size and raise train.grad_accum_steps (tokens/iter stay the same)"
        ) from None
    finally:
        if runtime.owns_process_group:
            dist.destroy_process_group()


def _train(
    config: PipelineConfig, data_dir: Path, run_dir: Path, runtime: Runtime, on_event: Callable[[dict], None] | None,
    hellaswag_file: str | Path | None,
) -> dict[str, Any]:
    tc = config.train
    micro_steps = micro_steps_per_rank(tc.grad_accum_steps, runtime.world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventLog(run_dir / METRICS_FILE, on_event, enabled=runtime.is_main)
    train_data = ShardDataset(data_dir, "train", config.model.block_size)
    val_data = ShardDataset(data_dir, "val", config.model.block_size)
    hellaswag = HellaSwagDuringTraining.of(config, hellaswag_file, runtime)

    memory = check_training_memory(config, runtime)  # before anything big is allocated
    model, optimizer, scaler = build_model(config, runtime)
    loader = TrainLoader(train_data, tc.batch_size, tc.seed, runtime.rank, runtime.world_size)
    state = TrainingState(Progress(), loader, Schedule.from_config(tc), RngState(), scaler)
    progress = state.progress

    resume_from = _find_resume_checkpoint(run_dir, runtime)
    saved = None
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from, map_location=runtime.device, verify=False)
        _check_same_model(checkpoint.state["config"]["model"], config.model, run_dir)
        _restore(checkpoint, model, optimizer, state)
        saved = checkpoint.state
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
        metrics_format=METRICS_FORMAT,
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
        memory_estimate=memory.total,
    )
    if saved is not None:
        state.schedule = _continue_schedule(state.schedule, saved["config"]["train"], config, start_iter, events)
        trained_on = saved.get("data_dir")
        if trained_on and Path(trained_on).resolve() != data_dir.resolve():  # e.g. the tokenizer's code changed
            events.emit("warning", log_level=logging.WARNING, message=(
                f"resuming on {data_dir}, but iterations 1–{start_iter} were trained on {trained_on}: the data (or the "
                "code that made it) changed since; choose a new train.run_name to train from scratch on the new data"))

    # torch.compile speeds up training only; evaluation and checkpoints use the plain `model`.
    train_model: torch.nn.Module = torch.compile(model) if tc.compile else model
    if runtime.world_size > 1:
        train_model = DDP(train_model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)

    last_checkpoint = resume_from
    if resume_from is None:  # the loss at initialization, like nanoGPT's step 0
        progress.record_val_loss(0, estimate_val_loss(model, val_data, tc.batch_size, tc.eval_iters, runtime))
        events.emit("eval", iter=0, val_loss=progress.val_loss)
        if hellaswag:
            events.emit("hellaswag", iter=0, **hellaswag.score(model))
    train_seconds, iters_since_log = 0.0, 0
    for it in range(start_iter, tc.max_iters):
        started = time.perf_counter()
        lr = state.schedule.lr_at(it)
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
        done = it + 1  # iterations completed: the `iter` of every event from here on
        progress.iteration = done
        progress.tokens_trained += tokens_per_iter
        train_seconds += time.perf_counter() - started
        iters_since_log += 1

        if done % tc.log_interval == 0 or done in (1, tc.max_iters):  # the same iterations whenever a run resumed
            tokens_per_sec = tokens_per_iter * iters_since_log / train_seconds
            events.emit(
                "train",
                iter=done,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                ms_per_iter=1000 * train_seconds / iters_since_log,
                tokens_per_sec=tokens_per_sec,
                mfu=mfu(flops_per_token, tokens_per_sec, job_peak),
            )
            train_seconds, iters_since_log = 0.0, 0
        if done % tc.eval_interval == 0 or done == tc.max_iters:
            val_loss = estimate_val_loss(model, val_data, tc.batch_size, tc.eval_iters, runtime)
            if not math.isfinite(val_loss):
                raise TrainingDiverged(
                    f"val loss is {val_loss} after iteration {done}; nothing was saved and the last good checkpoint is "
                    f"{last_checkpoint or 'none'}; lower train.learning_rate, then rerun to resume from it"
                )
            progress.record_val_loss(done, val_loss)
            events.emit("eval", iter=done, val_loss=val_loss)
        if hellaswag and (done % tc.hellaswag_interval == 0 or done == tc.max_iters):
            events.emit("hellaswag", iter=done, **hellaswag.score(model))
        if done % tc.checkpoint_interval == 0 or done == tc.max_iters:
            last_checkpoint = checkpoint_path(run_dir, done)
            if runtime.is_main:
                _save(run_dir, data_dir, model, optimizer, state, config, runtime)
            events.emit("checkpoint", iter=done, path=str(last_checkpoint))

    summary = _summary(run_dir, progress, start_iter, resume_from is not None, last_checkpoint, params, already_complete=False)
    events.emit("done", **{k: v for k, v in summary.items() if k != "run_dir"})
    return summary


def check_training_memory(config: PipelineConfig, runtime: Runtime, free: int | None = None) -> MemoryEstimate:
    """Log the memory estimate for this micro-batch (gpt/memory.py) and, with train.memory_check,
    stop with a one-line error naming the largest micro-batch that fits when it exceeds the free
    memory (`free` bytes; default: CUDA's free memory, or on CPU the available RAM shared by this
    machine's processes)."""
    tc = config.train
    if free is None:
        free = free_memory_per_process(runtime.device, int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size)))
    memory = check_memory(config.model, tc.batch_size, tc.grad_accum_steps, runtime.dtype,
                          free if tc.memory_check else None, str(runtime.device))
    if runtime.is_main:
        available = f"; {free / GB:.2f} GB free on {runtime.device}" if free is not None else ""
        logger.info(f"memory: {memory.describe()}{available}")
    return memory


def _restore(checkpoint: Checkpoint, model: GPT, optimizer: torch.optim.Optimizer, state: TrainingState) -> None:
    """Put the checkpoint's weights, optimizer and stateful objects in place."""
    model.load_state_dict(checkpoint.model)
    optimizer.load_state_dict(checkpoint.optimizer)
    state.load_state_dict(checkpoint.state)


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
    new_levels = {name: getattr(tc, name) for name in LR_LEVEL_FIELDS if saved_train.get(name) != getattr(tc, name)}
    if new_levels:  # e.g. lowered after a divergence: the rest of the curve, rescaled
        schedule = schedule.rescaled(tc.learning_rate, tc.min_lr, at_iter)
        message = (
            f"{', '.join(f'train.{name} {saved_train.get(name)} → {value}' for name, value in new_levels.items())} since "
            f"the checkpoint: from iteration {at_iter} the LR follows the same curve rescaled to peak {tc.learning_rate:.3e} "
            f"and floor {tc.min_lr:.3e} (LR {schedule.lr_at(at_iter):.3e} at iteration {at_iter})"
        )
        events.emit("schedule", log_level=logging.WARNING, message=message)
    changed = [name for name in SCHEDULE_FIELDS if name not in LR_LEVEL_FIELDS and saved_train.get(name) != getattr(tc, name)]
    if changed:
        message = (
            f"{', '.join('train.' + n for n in changed)} changed since the checkpoint; the checkpoint's LR schedule "
            "is kept so the resumed run follows the same curve (it changes only when train.max_iters grows)"
        )
        events.emit("schedule", log_level=logging.WARNING, message=message)
    return schedule


def _save(
    run_dir: Path, data_dir: Path, model: GPT, optimizer: torch.optim.Optimizer, state: TrainingState,
    config: PipelineConfig, runtime: Runtime,
) -> Path:
    progress = state.progress
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged(
            f"weights became NaN/inf by iteration {progress.iteration}; no checkpoint written; lower train.learning_rate and rerun"
        )
    extra = {
        "val_loss": progress.val_loss if progress.val_loss_iter == progress.iteration else None,  # measured here: keeps the best
        "world_size": runtime.world_size,
        "data_dir": str(data_dir),  # what the weights were trained on, and whose val split scores them
        "config": redact(config.model_dump(mode="json")),  # a source URL may hold a password
        "code_version": stage_code_version("train"),
    }
    return save_checkpoint(run_dir, progress.iteration, model, optimizer, {**state.state_dict(), **extra},
                           config.train.keep_last_checkpoints)


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
    parser.add_argument("--hellaswag", type=Path, help="a HellaSwag jsonl to score every train.hellaswag_interval iterations")
    args = parser.parse_args(argv)

    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s", stream=sys.stdout)
    try:
        config = load_config(args.config, args.set)
        if is_main:
            print(describe(config), flush=True)
        data_dir = args.data_dir or tokenized_data_dir(config, args.config, args.set)
        run_dir = args.run_dir or ArtifactStore(config.storage.root).run_dir(config.run_name)
        summary = train(config, data_dir, run_dir, hellaswag_file=args.hellaswag)
    except (UserError, TransientError) as exc:  # one line; anything else is a bug and keeps its traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if os.environ.get(ERROR_FILE_ENV):
            kind = "user" if isinstance(exc, UserError) else "transient"
            Path(f"{os.environ[ERROR_FILE_ENV]}.{os.environ.get('RANK', '0')}").write_text(json.dumps({"kind": kind, "message": str(exc)}))
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
