"""The trainer on tiny real models: learning, exact resume after SIGKILL, NaN guard,
continuation, compile, DDP, and the errors users meet."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from configs import describe
from gpt.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from gpt.data import DataError
from gpt.schedule import Schedule
from gpt.runtime import reuse_freed_memory
from gpt.train import TrainError, TrainingDiverged, train
from tests.gpt_fixtures import tiny_config, tiny_tree, with_model, write_tiny_shards, write_yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_events(run_dir: Path) -> dict[int, dict]:
    return {e["iter"]: e for e in read_metrics(run_dir) if e["event"] == "train"}


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}


def test_tiny_run_learns_and_records_everything(shards, tmp_path):
    events = []
    result = train(tiny_config(max_iters=20), shards, tmp_path / "run", on_event=events.append)

    assert result["iterations"] == 20 and result["start_iter"] == 0 and not result["resumed"]
    assert not result["already_complete"]
    assert result["tokens_trained"] == 20 * 4 * 16 * 2
    assert result["params"] == tiny_config().model.num_params()
    assert result["latest_checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step_000020")
    assert [e["event"] for e in events] == [e["event"] for e in read_metrics(tmp_path / "run")]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[0]["params"] == result["params"] and events[0]["flops_per_token"] == tiny_config().model.flops_per_token()

    trained = [e for e in events if e["event"] == "train"]
    assert [e["iter"] for e in trained] == list(range(1, 21))  # iterations completed
    assert trained[-1]["loss"] < trained[0]["loss"] - 2.0
    assert all(e["mfu"] is None and e["tokens_per_sec"] > 0 for e in trained)  # no MFU on CPU
    evals = {e["iter"]: e["val_loss"] for e in events if e["event"] == "eval"}
    assert list(evals) == [0, 10, 20] and evals[20] < evals[0] - 2.0
    assert result["val_loss"] == evals[20] and result["best_val_loss"] == min(evals.values())
    assert [e["iter"] for e in events if e["event"] == "checkpoint"] == [10, 20]


def test_resume_after_sigkill_is_bit_identical(shards, tmp_path):
    config = with_model(
        tiny_config(max_iters=120, batch_size=2, checkpoint_interval=10, eval_interval=40, log_interval=10),
        dropout=0.1,  # dropout masks must be reproduced too
    )
    uninterrupted = train(config, shards, tmp_path / "a")

    command = [sys.executable, "-m", "gpt.train", "--config", str(write_yaml(config, tmp_path / "b.yaml")),
               "--data-dir", str(shards), "--run-dir", str(tmp_path / "b")]
    first_checkpoint = tmp_path / "b" / "checkpoints" / "step_000010" / "manifest.json"
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(latest_checkpoint(tmp_path / "b")).iteration
    assert 10 <= killed_at < 120

    restarted = subprocess.run(command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr
    lines = restarted.stdout.strip().splitlines()
    assert lines[0] == describe(config)  # the parameter count comes first
    summary = json.loads(lines[-1])  # and a JSON summary last
    assert summary["resumed"] and summary["start_iter"] == killed_at and summary["iterations"] == 120

    a = load_checkpoint(uninterrupted["latest_checkpoint"])
    b = load_checkpoint(summary["latest_checkpoint"])
    assert a.model.keys() == b.model.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    for index, saved in a.optimizer["state"].items():
        for name, tensor in saved.items():
            assert torch.equal(tensor, b.optimizer["state"][index][name]), (index, name)
    assert a.state["loader"] == b.state["loader"]
    assert train_events(tmp_path / "a").keys() == train_events(tmp_path / "b").keys()  # killed history trimmed
    assert [e["loss"] for e in train_events(tmp_path / "a").values()] == [e["loss"] for e in train_events(tmp_path / "b").values()]


def test_divergence_names_the_iteration_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=4, checkpoint_interval=4), shards, run)
    good = latest_checkpoint(run)
    manifest = (good / "manifest.json").read_text()

    exploding = tiny_config(max_iters=12, checkpoint_interval=4, learning_rate=1e30, rewarm_iters=0)
    with pytest.raises(TrainingDiverged, match=rf"iteration 5\b.*{good}"):
        train(exploding, shards, run)
    assert latest_checkpoint(run) == good
    assert (good / "manifest.json").read_text() == manifest
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000004"]


def test_continuing_a_finished_run_resumes_without_an_lr_jump(shards, tmp_path):
    run = tmp_path / "run"
    first = train(tiny_config(max_iters=10, warmup_iters=2, batch_size=2), shards, run)
    assert first["iterations"] == 10

    done_events = []
    again = train(tiny_config(max_iters=10, warmup_iters=2, batch_size=2), shards, run, on_event=done_events.append)
    assert again["already_complete"] and again["iterations"] == 10 and again["val_loss"] == first["val_loss"]
    assert [e["event"] for e in done_events] == ["done"]

    continued = train(tiny_config(max_iters=40, warmup_iters=2, batch_size=2, rewarm_iters=10), shards, run)
    assert continued["resumed"] and continued["start_iter"] == 10 and continued["iterations"] == 40
    metrics = read_metrics(run)
    lrs = [e["lr"] for e in metrics if e["event"] == "train"]
    assert [e["iter"] for e in metrics if e["event"] == "train"] == list(range(1, 41))  # nothing retrained
    peak = 1e-2
    assert lrs[10] == pytest.approx(lrs[9] + (peak - lrs[9]) / 11)  # the first rewarm step
    later_steps = [abs(b - a) for a, b in zip(lrs[10:], lrs[11:])]
    assert abs(lrs[10] - lrs[9]) <= max(later_steps) * (1 + 1e-9)  # the boundary is no bigger than any step after it
    assert lrs[20] == pytest.approx(peak) and lrs[39] == pytest.approx(1e-3, rel=0.1)
    schedule_events = [e for e in metrics if e["event"] == "schedule"]
    assert len(schedule_events) == 1 and schedule_events[0]["at_iter"] == 10 and not schedule_events[0]["is_jump"]
    schedule = Schedule.from_state_dict(load_checkpoint(latest_checkpoint(run)).state["schedule"])
    assert schedule.max_iters == 40 and schedule.lr_at(40) == 1e-3  # min_lr at the new end


def test_a_different_model_in_the_same_run_dir_is_refused(shards, tmp_path):
    train(tiny_config(max_iters=2), shards, tmp_path / "run")
    with pytest.raises(TrainError, match=r"n_embd 16 there, 32 requested.*train\.run_name"):
        train(with_model(tiny_config(max_iters=4), n_embd=32), shards, tmp_path / "run")


def test_unusable_data_gives_one_line_errors(shards, tmp_path):
    with pytest.raises(DataError, match=r"no train_\*\.bin shards in .*--data-dir"):
        train(tiny_config(), tmp_path, tmp_path / "run")
    short = write_tiny_shards(tmp_path / "short", val_tokens=10)
    with pytest.raises(DataError, match=r"val split has 10 tokens.*block_size\+1=17.*tokenize\.val_fraction"):
        train(tiny_config(), short, tmp_path / "run")


def test_compiled_training_matches_eager(shards, tmp_path):
    losses = {}
    for compiled in (False, True):
        config = tiny_config(max_iters=2, compile=compiled, grad_accum_steps=1, batch_size=2, eval_iters=1)
        run = tmp_path / f"compile-{compiled}"
        result = train(config, shards, run)
        losses[compiled] = [e["loss"] for e in train_events(run).values()] + [result["val_loss"]]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert "_orig_mod" not in "".join(load_checkpoint(tmp_path / "compile-True" / "checkpoints" / "step_000002").model)


def test_ddp_two_processes_match_one(shards, tmp_path):
    config = tiny_config(max_iters=6, grad_accum_steps=2, batch_size=2, eval_interval=3, checkpoint_interval=3)
    train(config, shards, tmp_path / "single")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gpt.train", "--config", str(write_yaml(config, tmp_path / "ddp.yaml")),
               "--data-dir", str(shards), "--run-dir", str(tmp_path / "ddp")]
    process = subprocess.run(command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]

    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [e for e in ddp if e["event"] == "start"][0]["world_size"] == 2
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        expected = [e[key] for e in single if e["event"] == kind]
        got = [e[key] for e in ddp if e["event"] == kind]
        assert len(got) == len(expected) > 0
        assert all(math.isclose(g, x, rel_tol=1e-5) for g, x in zip(got, expected)), (kind, got, expected)


def test_train_task_launches_torchrun_and_returns_the_in_process_summary(shards, tmp_path, monkeypatch):
    """tasks.train with train.nproc_per_node=2: two gloo processes, the same summary as gpt.train.train."""
    from tasks.train import _train_with_torchrun  # imports Prefect, which the other tests here do not need

    monkeypatch.chdir(PROJECT_ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tiny_config(max_iters=4, nproc_per_node=2, eval_interval=2, checkpoint_interval=2, log_interval=2)
    in_process = train(config, shards, tmp_path / "single")
    launched = _train_with_torchrun(config, shards, tmp_path / "ddp")

    assert launched.keys() == in_process.keys()
    assert launched["run_dir"] == str(tmp_path / "ddp")
    assert launched["latest_checkpoint"] == str(tmp_path / "ddp" / "checkpoints" / "step_000004")
    for key in ("iterations", "start_iter", "resumed", "tokens_trained", "params", "already_complete"):
        assert launched[key] == in_process[key], key
    assert launched["val_loss"] == pytest.approx(in_process["val_loss"], rel=1e-5)
    assert [e["world_size"] for e in read_metrics(tmp_path / "ddp") if e["event"] == "start"] == [2]


def _page_faults_of_a_200mb_tensor() -> int:
    torch.ones(50_000_000).sum()  # allocated and freed once, so a reusing allocator has the pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(50_000_000).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    outside = _page_faults_of_a_200mb_tensor()
    if outside < 10_000:
        pytest.skip(f"this allocator/kernel already reuses big blocks ({outside} page faults); nothing to measure")
    with reuse_freed_memory():
        inside = _page_faults_of_a_200mb_tensor()
    assert inside < outside / 10, (inside, outside)
    assert _page_faults_of_a_200mb_tensor() > outside / 2  # glibc's defaults are back after training


def _rewrite_state(checkpoint: Path, change) -> None:
    """Edit a checkpoint's state.json and record the new checksum in its manifest, as if written so."""
    import hashlib

    state_file, manifest_file = checkpoint / "state.json", checkpoint / "manifest.json"
    state_file.write_text(json.dumps(change(json.loads(state_file.read_text()))))
    manifest = json.loads(manifest_file.read_text())
    for entry in manifest["files"]:
        if entry["path"] == "state.json":
            entry.update(bytes=state_file.stat().st_size, sha256=hashlib.sha256(state_file.read_bytes()).hexdigest())
    manifest_file.write_text(json.dumps(manifest))


def _as_format_1(state: dict) -> dict:
    """state.json as the trainer wrote it before its stateful objects: progress at the top level."""
    progress = state.pop("progress")
    del state["format"]
    return {**state, "tokens_trained": progress["tokens_trained"], "last_val_loss": progress["val_loss"],
            "last_val_loss_iter": progress["val_loss_iter"], "best_val_loss": progress["best_val_loss"]}


def test_a_checkpoint_of_the_previous_format_resumes_bit_identically(shards, tmp_path):
    config = tiny_config(max_iters=10, checkpoint_interval=5)
    uninterrupted = train(config, shards, tmp_path / "a")
    train(config, shards, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000010")
    _rewrite_state(tmp_path / "b" / "checkpoints" / "step_000005", _as_format_1)

    resumed = train(config, shards, tmp_path / "b")
    assert resumed["start_iter"] == 5 and resumed["tokens_trained"] == uninterrupted["tokens_trained"]
    assert resumed["best_val_loss"] == uninterrupted["best_val_loss"]
    a, b = load_checkpoint(uninterrupted["latest_checkpoint"]), load_checkpoint(resumed["latest_checkpoint"])
    assert all(torch.equal(a.model[key], b.model[key]) for key in a.model)


def test_a_checkpoint_of_an_unknown_format_is_refused_in_one_line(shards, tmp_path):
    train(tiny_config(max_iters=2, checkpoint_interval=2), shards, tmp_path / "run")
    _rewrite_state(tmp_path / "run" / "checkpoints" / "step_000002", lambda state: {**state, "format": 3})
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(max_iters=4, checkpoint_interval=2), shards, tmp_path / "run")
    assert "checkpoint format 3" in str(error.value) and "reads formats 1 to 2" in str(error.value)
    assert "\n" not in str(error.value)


def test_hellaswag_is_scored_on_a_fixed_subset_during_training(shards, tmp_path, hellaswag_file):
    events = []
    config = tiny_config(max_iters=12, hellaswag_interval=5, hellaswag_items=8)
    train(config, shards, tmp_path / "run", on_event=events.append, hellaswag_file=hellaswag_file)
    scored = [e for e in events if e["event"] == "hellaswag"]
    assert [e["iter"] for e in scored] == [0, 5, 10, 12]  # the start, every 5 iterations, the end
    assert all(e["items"] == 8 and 0 <= e["acc_norm"] <= 1 and 0 <= e["acc"] <= 1 for e in scored)
    from gpt.encoding import gpt2_encoding
    from gpt.evaluate import read_hellaswag, score_hellaswag
    from gpt.model import GPT, GPTConfig

    torch.manual_seed(config.train.seed)  # as the trainer seeds its model: the weights scored at iteration 0
    untrained = GPT(GPTConfig.from_model_config(config.model))
    subset = read_hellaswag(hellaswag_file, 8)  # 8 items spread over the file
    assert score_hellaswag(untrained, subset, gpt2_encoding(), "cpu")["hellaswag_acc_norm"] == scored[0]["acc_norm"]
    assert [e["iter"] for e in read_metrics(tmp_path / "run") if e["event"] == "hellaswag"] == [0, 5, 10, 12]


def test_hellaswag_interval_without_items_trains_without_them(shards, tmp_path, caplog):
    events = []
    with caplog.at_level("WARNING"):
        train(tiny_config(max_iters=2, hellaswag_interval=1), shards, tmp_path / "run", on_event=events.append)
    assert not [e for e in events if e["event"] == "hellaswag"]
    assert "train.hellaswag_interval is set but no HellaSwag items were given" in caplog.text


PREVIOUS_RELEASE = "78f0da8"  # the last commit before checkpoint format 2 and metrics format 2


def test_a_run_started_by_the_previous_release_resumes_bit_identically(shards, tmp_path):
    """The real old writer: the project at PREVIOUS_RELEASE trains, its last checkpoint is lost, and this
    one resumes from the one before it: the same weights (to float32 rounding) and history as an uninterrupted run."""
    archive = subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", "--format=tar", PREVIOUS_RELEASE], capture_output=True)
    if archive.returncode:
        pytest.skip(f"no git history holding {PREVIOUS_RELEASE} here (an exported tree, not a clone)")
    old = tmp_path / "previous-release"
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    config_file = tmp_path / "tiny.yaml"
    # float32 pinned: the previous release's `auto` is float32 on every CPU, today's is bf16 on CPUs that have it
    config_file.write_text(yaml.safe_dump(tiny_tree(max_iters=10, checkpoint_interval=5, eval_interval=5, dtype="float32")))
    env = {**subprocess_env(), "PYTHONPATH": str(old)}
    trained = subprocess.run([sys.executable, "-m", "gpt.train", "--config", str(config_file), "--data-dir", str(shards),
                              "--run-dir", str(tmp_path / "run")], cwd=old, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "format" not in json.loads((tmp_path / "run" / "checkpoints" / "step_000005" / "state.json").read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000010")  # as if killed before it was written

    config = tiny_config(max_iters=10, checkpoint_interval=5, eval_interval=5, dtype="float32")
    resumed = train(config, shards, tmp_path / "run")
    uninterrupted = train(config, shards, tmp_path / "new")
    assert resumed["start_iter"] == 5 and resumed["tokens_trained"] == uninterrupted["tokens_trained"]
    a, b = load_checkpoint(uninterrupted["latest_checkpoint"]), load_checkpoint(resumed["latest_checkpoint"])
    # Not bitwise since the loss is computed in chunks (iterations 1-5 ran the previous release's F.cross_entropy,
    # whose float32 sums are ordered differently): float32 rounding apart (~3e-6 of the largest weight). A resume
    # that lost any state (cursor, schedule, moments) is off by orders of magnitude more.
    assert all((a.model[key] - b.model[key]).abs().max() <= 2e-5 * a.model[key].abs().max() for key in a.model)
    from gpt.metrics import read_metrics as read_events

    def trained_iterations(run: Path) -> list[int]:  # as the project reads them: one meaning of iter, whatever wrote it
        return [e["iter"] for e in read_events(run / "metrics.jsonl") if e["event"] == "train"]

    assert trained_iterations(tmp_path / "run") == trained_iterations(tmp_path / "new") == list(range(1, 11))


def test_metrics_of_the_previous_format_are_read_and_trimmed_with_one_meaning(tmp_path):
    from gpt.metrics import read_metrics as read_events, trim_metrics

    path = tmp_path / "metrics.jsonl"
    old = [{"event": "start"}, *({"event": "train", "iter": i} for i in range(8)), {"event": "eval", "iter": 4},
           {"event": "checkpoint", "iter": 4}, {"event": "eval", "iter": 8}, {"event": "checkpoint", "iter": 8}]
    path.write_text("".join(json.dumps(event) + "\n" for event in old))
    trim_metrics(path, 4)
    kept = read_events(path)
    assert [e["iter"] for e in kept if e["event"] == "train"] == [1, 2, 3, 4]  # the 0-based 0..3, as iterations completed
    assert [(e["event"], e["iter"]) for e in kept if e["event"] != "train" and "iter" in e] == [("eval", 4), ("checkpoint", 4)]


def test_resuming_on_other_data_than_the_checkpoint_was_trained_on_is_a_warning(shards, tmp_path):
    run, moved = tmp_path / "run", tmp_path / "new-tokenize-version"
    train(tiny_config(max_iters=10), shards, run)
    shutil.copytree(shards, moved)
    train(tiny_config(max_iters=10), shards, run)  # the same data: nothing to say
    result = train(tiny_config(max_iters=20), moved, run)
    assert result["start_iter"] == 10
    warnings = [e["message"] for e in read_metrics(run) if e["event"] == "warning"]
    assert len(warnings) == 1 and str(moved) in warnings[0] and str(shards) in warnings[0] and "train.run_name" in warnings[0]
