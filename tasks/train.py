"""Train stage: resumable GPT training on the token shards, with live progress in the UI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import yaml
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from configs import PipelineConfig, describe
from configs.errors import TransientError, UserError
from configs.secrets import redact
from gpt.checkpoint import checkpoint_iteration, latest_checkpoint
from gpt.memory import GB, estimate_training_memory, fit_verdict, free_memory_per_process
from gpt.metrics import METRICS_FILE, describe_event, read_metrics
from gpt.runtime import resolve_device, resolve_dtype
from gpt.train import ERROR_FILE_ENV
from gpt.train import train as train_gpt
from storage.artifacts import ArtifactStore, folder_lock
from tasks.charts import line_chart_svg, markdown_image
from storage.markdown import markdown_table
from tasks.common import ProgressArtifact, retry_if_transient, ui_key

STAGE = "train"


class RunLockedError(UserError):
    """Another process is training the same run right now."""


def exclusive_run(folder: Path) -> AbstractContextManager[None]:
    """Hold an exclusive lock on a run folder so two flow runs never train into the same checkpoints."""
    return folder_lock(folder / ".lock", busy=lambda holder: RunLockedError(
        f"run {folder.name} is being trained by {holder}; wait for it to finish or pick another train.run_name"))


def checkpointed_iteration(store: ArtifactStore, config: PipelineConfig) -> int | None:
    """The iteration of the run's newest complete checkpoint, or None when it has none."""
    latest = latest_checkpoint(store.run_dir(config.run_name))
    return None if latest is None else checkpoint_iteration(latest)


def model_card(config: PipelineConfig, train_tokens: int | None, memory: list[dict[str, Any]] | None = None) -> str:
    m, t = config.model, config.train
    total = t.max_iters * config.tokens_per_iter()
    epochs = f"{total / train_tokens:.2f}" if train_tokens else "unknown"
    rows = [
        {"what": "preset", "value": config.name},
        {"what": "run", "value": config.run_name},
        {"what": "parameters (nanoGPT count)", "value": f"{m.num_params():,} ({m.num_params() / 1e6:.2f}M)"},
        {"what": "layers × heads × n_embd", "value": f"{m.n_layer} × {m.n_head} × {m.n_embd}"},
        {"what": "block size", "value": m.block_size},
        {"what": "FLOPs per token (fwd+bwd)", "value": f"{m.flops_per_token():,}"},
        {"what": "tokens per iteration", "value": f"{config.tokens_per_iter():,}"},
        {"what": "max iterations", "value": f"{t.max_iters:,}"},
        {"what": "tokens to train on", "value": f"{total:,}"},
        {"what": "train tokens in the data", "value": f"{train_tokens:,}" if train_tokens else "unknown"},
        {"what": "expected epochs over the data", "value": epochs},
        {"what": "learning rate", "value": f"{t.learning_rate} → {t.min_lr} ({t.schedule}, warmup {t.warmup_iters})"},
        {"what": "compile / device / dtype", "value": f"{t.compile} / {t.device} / {t.dtype}"},
        *(memory_rows(config) if memory is None else memory),
    ]
    return f"# Model card: {config.name} / {config.run_name}\n\n{describe(config)}\n\n{markdown_table(rows)}\n"


def memory_rows(config: PipelineConfig) -> list[dict[str, Any]]:
    """The model card's rows on memory: the precision `auto` resolves to here, the estimate for one
    process's micro-batch (gpt/memory.py) and, beside it, the device's free memory and whether the
    micro-batch fits. Under torchrun the free memory is left to the ranks (asking CUDA here would
    hold a context on GPU 0 for the whole run)."""
    t = config.train
    device = resolve_device(t.device)
    dtype = resolve_dtype(t.dtype, device)
    estimate = estimate_training_memory(config.model, t.batch_size, dtype)
    rows = [
        {"what": "precision here", "value": f"{t.dtype} → {str(dtype).removeprefix('torch.')} on {device}"},
        {"what": "memory estimate per process", "value": estimate.describe()},
    ]
    free = free_memory_per_process(device, t.nproc_per_node) if t.nproc_per_node == 1 or device.type != "cuda" else None
    if free is not None:
        name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else " (available RAM)"
        if device.type == "cpu" and t.nproc_per_node > 1:
            name = f" (available RAM / {t.nproc_per_node} processes)"
        verdict = fit_verdict(config.model, t.batch_size, dtype, free)
        rows.append({"what": f"free memory on {device}{name}", "value": f"{free / GB:.2f} GB — train.batch_size={t.batch_size} {verdict}"})
    return rows


def _train_with_torchrun(config: PipelineConfig, data_dir: Path, folder: Path, hellaswag_file: str | None = None) -> dict[str, Any]:
    """Launch `torchrun -m gpt.train` for several processes, streaming its output into the task's
    logs. A rank that stops on a user or transient error says which in its error file
    (gpt.train's FWP_ERROR_FILE), so the task raises the same kind."""
    with tempfile.TemporaryDirectory(prefix="fwp-torchrun-") as scratch:
        config_file, error_file = Path(scratch) / "config.yaml", Path(scratch) / "error"
        config_file.write_text(yaml.safe_dump(redact(config.model_dump())))  # the trainer gets --data-dir: no source URL is needed
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={config.train.nproc_per_node}", "-m", "gpt.train",
                   "--config", str(config_file), "--data-dir", str(data_dir), "--run-dir", str(folder)]
        if hellaswag_file:
            command += ["--hellaswag", hellaswag_file]
        last_line = ""
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, ERROR_FILE_ENV: str(error_file)}) as process:
            for line in process.stdout:
                print(line.rstrip())
                if line.strip():
                    last_line = line.strip()
        errors = [json.loads(file.read_text()) for file in sorted(Path(scratch).glob("error.*"))]
    if process.returncode:
        for error in errors:
            if error["kind"] == "user":
                raise UserError(error["message"])
        detail = errors[0]["message"] if errors else "see the log above"
        raise TransientError(f"torchrun exited with status {process.returncode} ({detail}); the retry resumes from the last checkpoint")
    return json.loads(last_line)


@task(name=STAGE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient, log_prints=True)
def train(store: ArtifactStore, config: PipelineConfig, tokenize_ref: dict[str, Any], hellaswag_ref: dict[str, Any] | None,
          ui_name: str) -> dict[str, Any]:
    """Train (or resume, or continue) the run `runs/<run_name>` and publish its curves and checkpoints.
    The HellaSwag artifact, when given, is scored on a subset every `train.hellaswag_interval` iterations."""
    data_dir = Path(tokenize_ref["path"])
    hellaswag_file = hellaswag_ref["file"] if hellaswag_ref else None
    folder = store.run_dir(config.run_name)
    train_tokens = store.manifest("tokenize", tokenize_ref["version"]).metrics["tokens"]["train"]
    memory = memory_rows(config)
    print("; ".join(f"{row['what']}: {row['value']}" for row in memory))
    create_markdown_artifact(key=ui_key(ui_name, "model-card"), markdown=model_card(config, train_tokens, memory),
                             description="what is being trained: size, FLOPs, tokens, epochs, memory")
    progress = ProgressArtifact(f"training {config.run_name} to {config.train.max_iters} iterations")

    def on_event(event: dict[str, Any]) -> None:
        print(describe_event(event))
        if event["event"] == "train":
            progress.update(event["iter"], config.train.max_iters)

    with exclusive_run(folder):
        if config.train.nproc_per_node > 1:
            result = _train_with_torchrun(config, data_dir, folder, hellaswag_file)
        else:
            result = train_gpt(config, data_dir, folder, on_event=on_event, hellaswag_file=hellaswag_file)
    progress.update(1, 1)
    if result.get("already_complete"):
        print(f"run {config.run_name} is already at iteration {result['iterations']} "
              f"(train.max_iters {config.train.max_iters}); nothing trained — raise train.max_iters to continue it")
    publish_training_artifacts(config, folder, result, ui_name)
    return json.loads(json.dumps(result, default=str))


def training_curves(folder: Path, curve: list[dict[str, Any]]) -> str:
    """The four plots people scrape nanoGPT logs for, the LR, and HellaSwag when it is scored during
    training; also saved as SVGs in the run folder."""

    def series(key: str) -> list[tuple[float, float]]:
        return [(row["iter"], row[key]) for row in curve if row.get(key) is not None]

    charts = {
        "loss": line_chart_svg({"train": series("train_loss"), "val": series("val_loss")}, "train / val loss", y_label="loss"),
        "lr": line_chart_svg({"lr": series("lr")}, "learning rate", y_label="lr"),
        "ms_per_iter": line_chart_svg({"ms/iter": series("ms_per_iter")}, "time per iteration", y_label="ms"),
        "mfu": line_chart_svg({"MFU": series("mfu")}, "model FLOPs utilisation", y_label="fraction of peak"),
    }
    if series("hellaswag_acc_norm"):
        charts["hellaswag"] = line_chart_svg({"acc_norm": series("hellaswag_acc_norm"), "acc": series("hellaswag_acc")},
                                             "HellaSwag (a fixed subset) during training", y_label="accuracy")
    (folder / "curves").mkdir(exist_ok=True)
    sections = [f"# Training curves: {folder.name}\n"]
    for name, svg in charts.items():
        (folder / "curves" / f"{name}.svg").write_text(svg)
        sections.append(markdown_image(svg, name) + "\n")
    if not series("mfu"):
        sections.append("_MFU is not computed on CPU or on a GPU whose peak is unknown (set train.peak_tflops)._\n")
    return "\n".join(sections)


def publish_training_artifacts(config: PipelineConfig, folder: Path, result: dict[str, Any], ui_name: str) -> None:
    metrics = read_metrics(folder / METRICS_FILE)
    curve = [
        {"iter": m["iter"], "train_loss": m.get("loss"), "val_loss": m.get("val_loss"), "lr": m.get("lr"),
         "ms_per_iter": m.get("ms_per_iter"), "tokens_per_sec": m.get("tokens_per_sec"), "mfu": m.get("mfu"),
         "hellaswag_acc": m.get("acc"), "hellaswag_acc_norm": m.get("acc_norm")}
        for m in metrics if m.get("event") in ("train", "eval", "hellaswag")
    ]
    if curve:
        create_table_artifact(key=ui_key(ui_name, "loss-curve"), table=curve,
                              description="train/val loss, learning rate, ms/iter, tokens/s and MFU per logged iteration")
        create_markdown_artifact(key=ui_key(ui_name, "training-curves"), markdown=training_curves(folder, curve),
                                 description="loss, learning rate, ms/iter and MFU over the whole run")
    if result.get("latest_checkpoint"):
        create_link_artifact(key=ui_key(ui_name, "latest-checkpoint"), link=Path(result["latest_checkpoint"]).as_uri(),
                             link_text=f"{config.run_name} @ iteration {result.get('iterations')}",
                             description="the newest complete checkpoint of this run")
