"""The two kinds of failure, end to end through the CLI and a real Prefect server: a user error
is one line and never retried; a transient one is retried where it happens (the downloader's
own attempts, not Prefect's on top; Prefect's retry of a killed trainer, which resumes, and of a
crashed tokenizer); a bug keeps its traceback and runs once. Faults are injected without editing
the project's code: a test's own process, or a few lines run before the pipeline's CLI in its
process. Retry counts are read from the Prefect API and the servers' logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from configs.errors import TransientError, UserError
from flows.stack import main as stack_main
from flows.stack import stack_from_env, start_server
from tasks.common import is_transient
from tests.conftest import PROJECT_ROOT, run_pipeline_cli
from tests.test_download import Server


@pytest.fixture(scope="module")
def prepared(prefect_server, tmp_path_factory) -> dict[str, str]:
    """An environment whose storage root already holds the demo's tokenized data."""
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(tmp_path_factory.mktemp("failures") / "artifacts"),
               PREFECT_LOGGING_LEVEL="INFO", OMP_NUM_THREADS="1")
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--until", "tokenize"], env)
    assert process.returncode == 0, process.stderr[-3000:]
    return env


def task_runs(prefect_server, flow_run_name: str) -> dict[str, dict]:
    """The task runs of the newest flow run of that name, by task name."""
    api = prefect_server.api_url
    flow_runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [flow_run_name]}},
                                                            "sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
    runs = httpx.post(f"{api}/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [flow_runs[0]["id"]]}}}).json()
    return {run["name"].split("-")[0]: run for run in runs}


def run_pipeline_cli_with(fault: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m flows.fineweb_pretrain ARGS`, with the Python source `fault` run first in the
    same process (it patches a function of the project, which is then run as `-m` runs it)."""
    program = f"{fault}\nimport runpy\nrunpy.run_module('flows.fineweb_pretrain', run_name='__main__', alter_sys=True)\n"
    return subprocess.run([sys.executable, "-c", program, *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_user_error_is_one_line_never_retried_and_has_no_traceback(prepared, prefect_server):
    settings = ["train.run_name=diverges", "train.learning_rate=1e30", "train.min_lr=0"]
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", *(f"--set={s}" for s in settings)], prepared)
    assert process.returncode == 1
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("error: TrainingDiverged: training diverged at iteration ") and "train.learning_rate" in last
    assert "Traceback" not in process.stderr + process.stdout  # not in Prefect's log lines either
    train = task_runs(prefect_server, "demo/diverges")["train"]
    assert train["state_type"] == "FAILED" and train["run_count"] == 1  # the task allows a retry; a user error gets none


def test_a_source_that_keeps_failing_is_retried_by_the_downloader_only(prepared, prefect_server, fineweb_parquet):
    server = Server()
    server.files["/flaky.parquet"] = fineweb_parquet
    server.fail["/flaky.parquet"] = [503] * 100
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = server.url("/flaky.parquet")
        process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--set", f"data.source={url}",
                                       "--set", "train.run_name=flaky"], prepared, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert process.returncode == 1
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: DownloadFailed: {url}: still failing after 5 attempts") and "run again later" in last
    assert sum(method == "GET" for method, *_ in server.log) == 5  # the downloader's five attempts, nothing on top
    download = task_runs(prefect_server, "dataset flaky")["download flaky.parquet"]  # the file's own task run
    assert download["state_type"] == "FAILED" and download["run_count"] == 1


def _trainer_rank(run_dir: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` training into run_dir, if it is running."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"gpt.train" in command and str(run_dir).encode() in command and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_a_killed_trainer_is_retried_by_prefect_and_resumes(prepared, prefect_server):
    run_dir = Path(prepared["FWP_STORAGE_ROOT"]) / "runs" / "killed"
    settings = ["train.run_name=killed", "train.nproc_per_node=2", "train.num_threads=1", "train.max_iters=40",
                "train.checkpoint_interval=10", "train.eval_interval=20"]
    command = [sys.executable, "-m", "flows.fineweb_pretrain", "--config", "configs/demo.yaml", *(f"--set={s}" for s in settings)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=prepared, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_checkpoint = run_dir / "checkpoints" / "step_000010" / "manifest.json"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _trainer_rank(run_dir, 1)
    assert victim is not None, "no trainer process to kill"
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 40 and summary["resumed"]
    assert "torchrun exited with status" in stderr and "resumed from iteration" in stdout + stderr
    train = task_runs(prefect_server, "demo/killed")["train"]
    assert train["state_type"] == "COMPLETED" and train["run_count"] == 2


A_BUG_IN_THE_TRAIN_TASK = """
import tasks.train

def model_card(*args, **kwargs):
    raise ZeroDivisionError("an injected bug")

tasks.train.model_card = model_card
"""


def test_a_bug_in_a_task_keeps_its_traceback_and_runs_once(prepared, prefect_server):
    """The train task allows one retry; a bug must not use it (it would only run again)."""
    process = run_pipeline_cli_with(A_BUG_IN_THE_TRAIN_TASK, ["--config", "configs/demo.yaml", "--set=train.run_name=buggy"],
                                    prepared)
    assert process.returncode != 0
    assert "Traceback (most recent call last)" in process.stderr
    assert process.stderr.strip().splitlines()[-1] == "ZeroDivisionError: an injected bug"
    train = task_runs(prefect_server, "demo/buggy")["train"]
    assert train["state_type"] == "FAILED" and train["run_count"] == 1


TOKENIZER_CRASHES_ONCE = """
import tasks.tokenize
from gpt.tokenizer import TokenizerCrashed

tokenize_parquet, attempts = tasks.tokenize.tokenize_parquet, []

def crashes_the_first_time(*args, **kwargs):
    attempts.append(None)
    if len(attempts) == 1:
        raise TokenizerCrashed("tokenizer worker process 1 exited with code -9 (injected); run again")
    return tokenize_parquet(*args, **kwargs)

tasks.tokenize.tokenize_parquet = crashes_the_first_time
"""


def test_a_crashed_tokenizer_is_retried_by_prefect(prepared, prefect_server):
    settings = ["train.run_name=tokenizer-crash", "tokenize.val_fraction=0.07"]  # a tokenize version not made yet
    process = run_pipeline_cli_with(TOKENIZER_CRASHES_ONCE, ["--config", "configs/demo.yaml", "--until", "tokenize",
                                                             *(f"--set={s}" for s in settings)], prepared)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "TokenizerCrashed" in process.stderr + process.stdout
    tokenize_file = task_runs(prefect_server, "dataset tokenizer-crash")["tokenize demo_corpus_python_docs.parquet"]
    assert tokenize_file["state_type"] == "COMPLETED" and tokenize_file["run_count"] == 2


def raised_from(error: Exception, cause: Exception) -> Exception:
    """`error` as `raise error from cause` leaves it."""
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(("error", "retried"), [
    (TransientError("a 503"), True),
    (raised_from(RuntimeError("while publishing"), TransientError("a 503")), True),
    (UserError("a bad value"), False),
    (raised_from(UserError("fix data.source"), TransientError("404 after retries")), False),
    (ZeroDivisionError("a bug"), False),
])
def test_only_a_transient_error_or_one_raised_from_it_is_retried(error, retried):
    assert is_transient(error) == retried


def test_a_stack_whose_port_is_taken_is_a_user_error_in_one_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        monkeypatch.setenv("PREFECT_SERVER_API_PORT", str(port))
        monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("FWP_STACK_DIR", str(tmp_path / "stack"))
        with pytest.raises(UserError, match=f"is port {port} in use"):
            start_server(stack_from_env())
        assert stack_main(["up"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: the Prefect server exited at start")


@pytest.mark.parametrize(("module", "reads_config"), [("flows.fineweb_pretrain", "flows.common"),
                                                     ("flows.fineweb_evaluate", "flows.common"), ("gpt.train", "gpt.train"),
                                                     ("gpt.sample", "gpt.sample")])
def test_a_bug_keeps_its_traceback(module, reads_config, monkeypatch):
    """A CLI turns only user and transient errors into one line; anything else propagates, so
    the interpreter prints its traceback for the bug report."""
    import importlib

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(importlib.import_module(reads_config), "load_config", broken)
    arguments = ["--config", "configs/demo.yaml"] + (["--run", "demo"] if module == "gpt.sample" else [])
    with pytest.raises(ZeroDivisionError, match="a bug"):
        importlib.import_module(module).main(arguments)
