"""Our trainer side by side with karpathy/nanoGPT's train.py on this CPU: ms/iter, peak RSS and
val loss at equal tokens (issue 15's config: 4 layers × 4 heads × 256, block 256, batch 8, 300
iterations, learning rate 1e-3 → 1e-4 with 30 warm-up iterations, same seed and initial weights).

    NANOGPT_DIR=/tmp/nanogpt python -m benchmarks.side_by_side      # ours (float32, bf16) and nanoGPT, taking turns
    python -m benchmarks.side_by_side                               # ours against benchmarks/nanogpt_baseline.json
    NANOGPT_DIR=... python -m benchmarks.side_by_side --write-baseline   # re-pin the baseline from this machine

Nothing is fetched and no nanoGPT code is in this project: NANOGPT_DIR is a checkout of nanoGPT
(train.py, model.py, configurator.py) made by the user; without it ours are compared with the figures
pinned in benchmarks/nanogpt_baseline.json (machine, date, nanoGPT commit and method inside).

Method:
- Data: the FineWeb sample (FWP_BENCH_PARQUET, default ../shared/data/fineweb-sample/
  fineweb_sample_2800.parquet), GPT-2 tokens, each document preceded by <|endoftext|>; the last 2% of
  documents are val. The same tokens are written as llm.c shards for ours and as nanoGPT's
  train.bin/val.bin. Each trainer samples its own random windows from them.
- Runs: ours (`python -m gpt.train`, train.dtype float32 and bfloat16) and nanoGPT (train.py, which runs
  float32 on CPU), all compiled (both trainers' default) and started together, then taking turns:
  SIGSTOP/SIGCONT gives each process the cores alone for --slice seconds in rotation, so load from
  other processes on a shared machine falls on all of them alike.
- ms/iter: the median of each process's own per-iteration times from iteration 11 on (compilation is
  over; the iterations that span a pause are outliers the median drops) until the first of them ended,
  while all were taking turns; `ms_per_iter_whole_run` is the median over all their iterations.
- Peak RSS: each process's ru_maxrss (os.wait4), compilation included.
- Val loss: each final model (nanoGPT's ckpt.pt loaded into our GPT) on the same first 64 val windows
  of 256 tokens, in float32, by this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASELINE_FILE = PROJECT_ROOT / "benchmarks" / "nanogpt_baseline.json"
DEFAULT_PARQUET = PROJECT_ROOT.parent / "shared" / "data" / "fineweb-sample" / "fineweb_sample_2800.parquet"
MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "dropout": 0.0, "bias": False}
TRAIN = {"batch_size": 8, "grad_accum_steps": 1, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 30,
         "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "seed": 1337}
VAL_WINDOWS = 64  # 8 batches of 8 windows of block_size tokens: the first ones of the val split
SETTLED_FROM = 11  # iterations before this one (compilation, first touches) are not timed


def sample_parquet() -> Path | None:
    path = Path(os.environ.get("FWP_BENCH_PARQUET", DEFAULT_PARQUET))
    return path if path.is_file() else None


def write_data(parquet: Path, folder: Path) -> tuple[Path, Path]:
    """The sample's tokens as our shards (folder/ours) and as nanoGPT's train.bin/val.bin (folder/nanogpt)."""
    import pyarrow.parquet as pq

    from gpt.encoding import EOT, gpt2_encoding
    from storage.shards import write_shard

    encoding = gpt2_encoding()
    texts = pq.read_table(parquet, columns=["text"]).column("text").to_pylist()
    documents = [np.array([EOT, *encoding.encode_ordinary(text)], dtype=np.uint16) for text in texts]
    cut = len(documents) - max(1, len(documents) // 50)
    splits = {"train": np.concatenate(documents[:cut]), "val": np.concatenate(documents[cut:])}
    ours, nanogpt = folder / "ours", folder / "nanogpt"
    ours.mkdir(parents=True, exist_ok=True)
    nanogpt.mkdir(parents=True, exist_ok=True)
    for split, tokens in splits.items():
        write_shard(ours / f"{split}_000000.bin", tokens)
        tokens.tofile(nanogpt / f"{split}.bin")
    return ours, nanogpt


def our_command(folder: Path, data: Path, dtype: str, iters: int) -> list[str]:
    from configs.schema import load_config

    train = {**TRAIN, "dtype": dtype, "device": "cpu", "compile": True, "max_iters": iters, "lr_decay_iters": iters,
             "eval_interval": iters, "eval_iters": VAL_WINDOWS // TRAIN["batch_size"], "log_interval": 1,
             "checkpoint_interval": iters}
    config = load_config("demo", {**{f"model.{k}": v for k, v in MODEL.items()}, **{f"train.{k}": v for k, v in train.items()}})
    config_file = folder / f"ours-{dtype}.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return [sys.executable, "-m", "gpt.train", "--config", str(config_file), "--data-dir", str(data),
            "--run-dir", str(folder / f"ours-{dtype}")]


def nanogpt_command(nanogpt_dir: Path, folder: Path, data: Path, iters: int) -> list[str]:
    settings = {**{k: v for k, v in MODEL.items()}, "batch_size": TRAIN["batch_size"],
                "gradient_accumulation_steps": TRAIN["grad_accum_steps"], "learning_rate": TRAIN["learning_rate"],
                "min_lr": TRAIN["min_lr"], "warmup_iters": TRAIN["warmup_iters"], "weight_decay": TRAIN["weight_decay"],
                "beta1": TRAIN["beta1"], "beta2": TRAIN["beta2"], "grad_clip": TRAIN["grad_clip"], "max_iters": iters,
                "lr_decay_iters": iters, "eval_interval": iters, "eval_iters": 1, "log_interval": 1,
                "always_save_checkpoint": True, "device": "cpu", "dtype": "float32", "compile": True,
                "dataset": str(data), "out_dir": str(folder / "nanogpt-run")}  # an absolute dataset: os.path.join keeps it
    return [sys.executable, str(nanogpt_dir / "train.py"), *(f"--{k}={v}" for k, v in settings.items())]


def take_turns(commands: dict[str, tuple[list[str], Path]], folder: Path, slice_s: float) -> dict[str, dict[str, Any]]:
    """Start every command (in its cwd) stopped, then let them run one at a time, slice_s each, in
    rotation until all have exited; their exit codes, peak RSS (bytes) and exit times by name. Their
    output goes to folder/<name>.log, each line prefixed with the time it arrived."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": str(os.cpu_count()), "PYTHONUNBUFFERED": "1"}
    processes, readers = {}, []
    for name, (command, cwd) in commands.items():
        processes[name] = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, start_new_session=True)  # a process group: compile workers pause too
        os.killpg(processes[name].pid, signal.SIGSTOP)
        readers.append(threading.Thread(target=_timestamp_lines, args=(processes[name].stdout, folder / f"{name}.log")))
        readers[-1].start()
    results: dict[str, dict[str, Any]] = {}
    while len(results) < len(processes):
        for name, process in processes.items():
            if name in results:
                continue
            os.killpg(process.pid, signal.SIGCONT)
            deadline = time.monotonic() + slice_s
            while time.monotonic() < deadline:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    results[name] = {"returncode": process.returncode, "peak_rss": usage.ru_maxrss * 1024, "ended": time.time()}
                    break
                time.sleep(0.1)
            else:
                os.killpg(process.pid, signal.SIGSTOP)
    for reader in readers:
        reader.join()
    return results


def _timestamp_lines(stream: Any, log: Path) -> None:
    with open(log, "w") as handle:
        for line in stream:
            handle.write(f"{time.time():.3f} {line}")
            handle.flush()


def our_ms_per_iter(log: Path, until: float = math.inf) -> float:
    """The median of the per-iteration times the trainer logged (log_interval 1), from SETTLED_FROM on
    and, with `until`, before that moment."""
    times = re.findall(r"^([\d.]+) iter (\d+): loss [\d.]+, .*?, ([\d.]+) ms/iter", log.read_text(), re.M)
    return _median([float(ms) for at, i, ms in times if int(i) >= SETTLED_FROM and float(at) < until])


def nanogpt_ms_per_iter(log: Path, until: float = math.inf) -> float:
    times = re.findall(r"^([\d.]+) iter (\d+): loss [\d.]+, time ([\d.]+)ms", log.read_text(), re.M)
    # nanoGPT counts iterations from 0; its eval iterations (0 and the last) include the evaluation
    return _median([float(ms) for at, i, ms in times if int(i) >= SETTLED_FROM - 1 and float(at) < until])


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan  # nan: no settled iteration in the window (a short run)


@torch.no_grad()
def val_loss(model: torch.nn.Module, data: Path, dtype: torch.dtype = torch.float32) -> float:
    """Mean loss per token over the first VAL_WINDOWS val windows of block_size tokens."""
    from gpt.data import ShardDataset

    model.eval()
    batches = ShardDataset(data, "val", MODEL["block_size"]).sequential_batches(TRAIN["batch_size"], VAL_WINDOWS // TRAIN["batch_size"])
    losses = []
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for x, y in batches:
            losses.append(model(x, y, return_logits=False)[1].item())
    return statistics.fmean(losses)


def machine() -> dict[str, Any]:
    from gpt.runtime import cpu_has_bf16

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "bf16_instructions": cpu_has_bf16(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()[0]}


def nanogpt_version(nanogpt_dir: Path) -> dict[str, str]:
    """What ran: the commit when NANOGPT_DIR is a git checkout (or NANOGPT_COMMIT says), and train.py's sha256."""
    commit = os.environ.get("NANOGPT_COMMIT")
    if not commit and (nanogpt_dir / ".git").exists():
        commit = subprocess.run(["git", "-C", str(nanogpt_dir), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit or "unknown", "train_py_sha256": hashlib.sha256((nanogpt_dir / "train.py").read_bytes()).hexdigest()}


def run(folder: Path, iters: int, nanogpt_dir: Path | None, slice_s: float = 20.0) -> dict[str, Any]:
    """Train ours (float32 and bf16) and, with nanogpt_dir, nanoGPT, taking turns; their figures and
    the ratios the issue's goals are stated in."""
    from gpt.checkpoint import latest_checkpoint, load_model, load_nanogpt_checkpoint

    parquet = sample_parquet()
    if parquet is None:
        raise FileNotFoundError(f"no FineWeb sample at {DEFAULT_PARQUET} (set FWP_BENCH_PARQUET)")
    folder.mkdir(parents=True, exist_ok=True)
    ours_data, nanogpt_data = write_data(parquet, folder)
    started = datetime.now(timezone.utc)
    commands = {f"ours-{dtype}": (our_command(folder, ours_data, dtype, iters), PROJECT_ROOT) for dtype in ("float32", "bfloat16")}
    if nanogpt_dir is not None:  # nanoGPT reads configurator.py from its working directory
        commands["nanogpt"] = (nanogpt_command(nanogpt_dir, folder, nanogpt_data, iters), nanogpt_dir)
    results = take_turns(commands, folder, slice_s)
    for name, result in results.items():
        if result["returncode"]:
            raise RuntimeError(f"{name} exited with {result['returncode']}: {(folder / f'{name}.log').read_text()[-2000:]}")

    together = min(result["ended"] for result in results.values())  # until the first one ended, all took turns
    figures: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        name = f"ours-{dtype}"
        model, _ = load_model(latest_checkpoint(folder / name), "cpu")
        figures[name] = {"ms_per_iter": our_ms_per_iter(folder / f"{name}.log", together),
                         "ms_per_iter_whole_run": our_ms_per_iter(folder / f"{name}.log"),
                         "peak_rss": results[name]["peak_rss"], "val_loss": val_loss(model, ours_data)}
        if dtype == "bfloat16":  # also as it evaluates itself
            figures[name]["val_loss_in_bf16"] = val_loss(model, ours_data, torch.bfloat16)
    if nanogpt_dir is not None:
        model, _ = load_nanogpt_checkpoint(folder / "nanogpt-run" / "ckpt.pt")
        figures["nanogpt"] = {"ms_per_iter": nanogpt_ms_per_iter(folder / "nanogpt.log", together),
                              "ms_per_iter_whole_run": nanogpt_ms_per_iter(folder / "nanogpt.log"),
                              "peak_rss": results["nanogpt"]["peak_rss"], "val_loss": val_loss(model, ours_data),
                              **nanogpt_version(nanogpt_dir)}
        reference, source = figures["nanogpt"], "measured in this sitting"
    else:
        baseline = json.loads(BASELINE_FILE.read_text())
        reference, source = baseline["nanogpt"], f"pinned in {BASELINE_FILE.name} ({baseline['date']}, {baseline['machine']['cpu']})"
    report = {
        "date": started.isoformat(timespec="minutes"),
        "machine": machine(),
        "config": {"model": MODEL, "train": TRAIN, "iterations": iters, "tokens": iters * TRAIN["batch_size"] * MODEL["block_size"],
                   "val_windows": VAL_WINDOWS, "compile": True, "turn_slice_s": slice_s},
        "figures": figures,
        "nanogpt_reference": source,
        "ratios": {
            name: {"ms_per_iter": figures[name]["ms_per_iter"] / reference["ms_per_iter"],
                   "peak_rss": figures[name]["peak_rss"] / reference["peak_rss"],
                   "val_loss_difference": figures[name]["val_loss"] - reference["val_loss"]}
            for name in ("ours-float32", "ours-bfloat16")
        },
    }
    return report


def describe(report: dict[str, Any]) -> str:
    lines = [f"{report['date']} on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
             f"{report['config']['iterations']} iterations; nanoGPT {report['nanogpt_reference']}"]
    for name, f in report["figures"].items():
        lines.append(f"  {name:14s} {f['ms_per_iter']:8.1f} ms/iter  peak RSS {f['peak_rss'] / 1e9:5.2f} GB  val loss {f['val_loss']:.4f}")
    for name, r in report["ratios"].items():
        lines.append(f"  {name:14s} vs nanoGPT: {r['ms_per_iter']:.3f}× ms/iter, {r['peak_rss']:.3f}× peak RSS, "
                     f"val loss {r['val_loss_difference']:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.side_by_side", description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--slice", type=float, default=20.0, help="seconds each process runs before the next takes its turn")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fwp-side-by-side"))
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    parser.add_argument("--write-baseline", action="store_true", help=f"pin nanoGPT's figures in {BASELINE_FILE.name}")
    args = parser.parse_args(argv)
    nanogpt_dir = Path(os.environ["NANOGPT_DIR"]) if os.environ.get("NANOGPT_DIR") else None
    if args.write_baseline and nanogpt_dir is None:
        parser.error("--write-baseline needs NANOGPT_DIR")
    report = run(args.folder, args.iters, nanogpt_dir, args.slice)
    print(describe(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.write_baseline:
        BASELINE_FILE.write_text(json.dumps(baseline_of(report), indent=2) + "\n")
    return 0


def baseline_of(report: dict[str, Any]) -> dict[str, Any]:
    """What benchmarks/nanogpt_baseline.json pins from a report with nanoGPT in it."""
    baseline = {key: report[key] for key in ("date", "machine", "config")}
    baseline["nanogpt"] = report["figures"]["nanogpt"]
    baseline["ours_in_the_same_sitting"] = {k: v for k, v in report["figures"].items() if k != "nanogpt"}
    baseline["method"] = " ".join(__doc__.split("Method:\n", 1)[1].split())
    return baseline


if __name__ == "__main__":
    sys.exit(main())
