"""Faults injected for real into the trainer: a SIGKILL at six moments, a full disk, a NaN.
Whatever happens, the rerun resumes from the last complete checkpoint, loses at most
`checkpoint_interval` iterations, and ends bit-identical to a run that was never hurt."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import damaged_files, latest_checkpoint, list_checkpoints, load_checkpoint
from gpt.schedule import Schedule
from gpt.train import TrainingDiverged, train
from storage.artifacts import ArtifactStore
from tests.conftest import run_pipeline_cli
from tests.gpt_fixtures import tiny_config, with_model, write_tiny_shards, write_yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)

CHECKPOINT_INTERVAL = 10
MAX_ITERS = 40


def fault_config():
    """Checkpoints every 10 iterations, the last two kept (so retention deletes), eval every 20,
    two micro-steps per iteration, and dropout (its masks must be reproduced too)."""
    config = tiny_config(max_iters=MAX_ITERS, batch_size=2, checkpoint_interval=CHECKPOINT_INTERVAL, eval_interval=20,
                         keep_last_checkpoints=2)
    return with_model(config, dropout=0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(fault_config(), shards, run)
    return run


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(expected: Path, actual: Path) -> None:
    """Weights, optimizer state, loader cursor and every logged loss equal, bit for bit."""
    a, b = load_checkpoint(latest_checkpoint(expected)), load_checkpoint(latest_checkpoint(actual))
    assert a.iteration == b.iteration == MAX_ITERS
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    for index, saved in a.optimizer["state"].items():
        for name, tensor in saved.items():
            assert torch.equal(tensor, b.optimizer["state"][index][name]), (index, name)
    assert a.state["loader"] == b.state["loader"] and a.state["rng"] == b.state["rng"]
    losses = lambda run: [(e["iter"], e["loss"]) for e in metrics_lines(run) if e["event"] == "train"]  # noqa: E731
    assert losses(expected) == losses(actual)


# (moment, iteration in progress when killed, the checkpoint the rerun must resume from)
KILLS = [
    ("mid-iteration", 4, 0),  # before the first checkpoint: a fresh start
    ("mid-iteration", 14, 10),
    ("mid-evaluation", 19, 10),
    ("mid-metrics-line", 24, 20),
    ("mid-checkpoint-write", 29, 20),
    ("before-checkpoint-rename", 29, 20),
    ("mid-retention", 29, 30),
]


@pytest.mark.parametrize(("moment", "at", "resumes_at"), KILLS, ids=[f"{m}-{at}" for m, at, _ in KILLS])
def test_sigkill_at_any_moment_resumes_from_the_last_complete_checkpoint_bit_identically(
    shards, uninterrupted, tmp_path, moment, at, resumes_at
):
    config, run = fault_config(), tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-m", "tests.kill_trainer", moment, str(at), "--", "--config", str(write_yaml(config, tmp_path / "c.yaml")),
         "--data-dir", str(shards), "--run-dir", str(run)],
        cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    resumed = train(config, shards, run)

    assert resumed["start_iter"] == resumes_at and resumed["resumed"] == (resumes_at > 0)
    assert at - resumed["start_iter"] <= CHECKPOINT_INTERVAL  # what was lost
    assert_same_run(uninterrupted, run)
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    assert all(damaged_files(folder) == [] for folder in list_checkpoints(run))  # nothing half deleted left
    assert [folder.name for folder in list_checkpoints(run)] == [folder.name for folder in list_checkpoints(uninterrupted)]


# ---------------------------------------------------------------------------------------
# A NaN in one batch
# ---------------------------------------------------------------------------------------


@pytest.fixture
def nan_in_one_batch():
    """Every Embedding's output becomes NaN in training micro-batch `poisoned["at"]` (1-based),
    as a corrupted batch would make it; a real forward hook, the model's code untouched."""
    poisoned = {"at": None, "seen": 0}

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Embedding) and module.training and module.embedding_dim and poisoned["at"]:
            if module.num_embeddings > 1024:  # the token embedding: once per micro-batch
                poisoned["seen"] += 1
            if poisoned["seen"] == poisoned["at"]:
                return output * float("nan")
        return output

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield poisoned
    handle.remove()


def test_a_nan_batch_stops_training_naming_the_iteration_and_a_lower_lr_resumes(shards, tmp_path, nan_in_one_batch):
    run, config = tmp_path / "run", fault_config()
    nan_in_one_batch["at"] = 2 * 14 + 2  # the second micro-batch of iteration 14
    with pytest.raises(TrainingDiverged, match=r"iteration 14\b.*step_000010"):
        train(config, shards, run)
    assert [folder.name for folder in list_checkpoints(run)] == ["step_000010"] and damaged_files(run / "checkpoints" / "step_000010") == []
    nan_in_one_batch["at"] = None

    lower = tiny_config(max_iters=MAX_ITERS, batch_size=2, checkpoint_interval=CHECKPOINT_INTERVAL, eval_interval=20,
                        keep_last_checkpoints=2, learning_rate=5e-3, min_lr=5e-4)
    resumed = train(with_model(lower, dropout=0.1), shards, run)

    assert resumed["start_iter"] == 10 and resumed["iterations"] == MAX_ITERS
    events = metrics_lines(run)
    val_losses = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert val_losses[0] == pytest.approx(math.log(50257), abs=1.0) and val_losses[-1] < val_losses[0] - 2  # still learning
    [schedule] = [e for e in events if e["event"] == "schedule"]
    assert "train.learning_rate 0.01 → 0.005" in schedule["message"]
    lrs = {e["iter"]: e["lr"] for e in events if e["event"] == "train"}
    before, after = Schedule.from_config(config.train), Schedule.from_config(lower.train)
    assert all(lrs[done] == pytest.approx(before.lr_at(done - 1)) for done in range(1, 11))  # trained before: as it was
    assert all(lrs[done] == pytest.approx(after.lr_at(done - 1)) for done in range(11, MAX_ITERS + 1))  # the rest: the lower curve


# ---------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------


class SmallDisk:
    """A real tmpfs of a fixed size at `path`; `resize` grows it in place, keeping its files."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, capture_output=True)

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-capped tmpfs needs root (CI runs as root)")
    disks: list[SmallDisk] = []
    yield lambda size: disks.append(SmallDisk(tmp_path / "disk", size)) or disks[-1]
    for disk in disks:
        disk.unmount()


def one_line_error(process: subprocess.CompletedProcess) -> str:
    assert process.returncode == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    return process.stderr.strip().splitlines()[-1]


def test_a_full_disk_during_a_checkpoint_is_one_line_publishes_nothing_and_the_next_run_resumes(
    shards, uninterrupted, small_disk, tmp_path
):
    disk = small_disk("14m")  # one checkpoint of the tiny model is ~9.7 MB: the second one cannot fit
    config, run = fault_config(), tmp_path / "disk" / "run"
    command = [sys.executable, "-m", "gpt.train", "--config", str(write_yaml(config, tmp_path / "c.yaml")),
               "--data-dir", str(shards), "--run-dir", str(run)]
    full = subprocess.run(command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)

    line = one_line_error(full)
    assert line.startswith("error: no space left on the device holding") and str(run / "checkpoints") in line
    assert "free some space" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000010"]  # no step_000020, no temporary
    assert damaged_files(run / "checkpoints" / "step_000010") == []

    disk.resize("64m")
    again = subprocess.run(command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["start_iter"] == 10
    assert_same_run(uninterrupted, run)


def test_a_full_disk_during_tokenize_is_one_line_publishes_no_shard_and_the_next_run_succeeds(prefect_server, small_disk, tmp_path):
    disk = small_disk("1600k")  # the demo corpus, its download and profile (~1.1 MB) fit; its shards (~0.9 MB) do not
    root = tmp_path / "disk" / "artifacts"
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(root), OMP_NUM_THREADS="1")
    args = ["--config", "configs/demo.yaml", "--until", "tokenize"]
    process, _ = run_pipeline_cli(args, env, timeout=600)

    line = one_line_error(process)
    assert "no space left on the device holding" in line and str(root / "tokenize-file") in line
    for stage in ("tokenize-file", "tokenize"):  # no shard, no temporary folder
        assert not (root / stage).exists() or [p.name for p in (root / stage).iterdir()] == []
    store = ArtifactStore(root)
    for stage in ("download", "profile"):
        assert store.verify(stage, store.latest(stage)) == [], stage

    disk.resize("64m")
    process, summary = run_pipeline_cli(args, env, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert {stage: info["cache_hit"] for stage, info in summary["stages"].items()} == {
        "download": True, "profile": True, "tokenize": False}
    assert ArtifactStore(root).verify("tokenize", summary["stages"]["tokenize"]["version"]) == []
