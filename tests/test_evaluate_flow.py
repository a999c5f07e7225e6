"""HellaSwag as a versioned artifact, and `fineweb-evaluate` scoring any checkpoint of a run that
exists — through the CLIs and a real Prefect server: the run's score table grows, its progress
pictures and its sample gallery follow, and a checkpoint scored before is a cache hit."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from storage.artifacts import ArtifactStore
from tests.conftest import PROJECT_ROOT, run_pipeline_cli
from tests.test_download import Server

SCORED_RUN = ["--config", "configs/demo.yaml", "--set", "train.run_name=scored", "--set", "train.max_iters=30",
              "--set", "train.checkpoint_interval=10", "--set", "train.eval_interval=10", "--set", "train.keep_last_checkpoints=3",
              "--set", "eval.hellaswag_max_items=20", "--set", "eval.max_batches=2"]


def run_evaluate_cli(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict | None]:
    process = subprocess.run([sys.executable, "-m", "flows.fineweb_evaluate", *args], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    lines = process.stdout.strip().splitlines()
    return process, json.loads(lines[-1]) if process.returncode == 0 and lines else None


@pytest.fixture(scope="module")
def scored_run(prefect_server, hellaswag_file, tmp_path_factory):
    """The demo preset trained 30 iterations (checkpoints 10, 20, 30) with HellaSwag from a local file."""
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(tmp_path_factory.mktemp("scored") / "artifacts"),
               PREFECT_LOGGING_LEVEL="INFO")
    process, summary = run_pipeline_cli([*SCORED_RUN, "--set", f"eval.hellaswag_path={hellaswag_file}"], env)
    assert process.returncode == 0, process.stderr[-3000:]
    return env, summary


def latest_artifact(prefect_server, key: str) -> dict:
    [artifact] = httpx.post(f"{prefect_server.api_url}/artifacts/latest/filter",
                            json={"artifacts": {"key": {"any_": [key]}}}).json()
    return artifact


def test_the_pipeline_copies_hellaswag_into_the_store_and_scores_it(scored_run, hellaswag_file):
    env, summary = scored_run
    assert list(summary["stages"]) == ["download", "profile", "tokenize", "hellaswag", "train", "evaluate", "sample"]
    copy = Path(summary["stages"]["hellaswag"]["path"])
    manifest = json.loads((copy / "manifest.json").read_text())
    data = hellaswag_file.read_bytes()
    assert manifest["metrics"]["sha256"] == hashlib.sha256(data).hexdigest() and manifest["metrics"]["items"] == 200
    assert (copy / manifest["metrics"]["file"]).read_bytes() == data
    assert summary["eval"]["hellaswag_items"] == 20 and 0 <= summary["eval"]["hellaswag_acc_norm"] <= 1


def test_hellaswag_comes_the_same_from_file_and_https_urls(scored_run, hellaswag_file, tmp_path):
    env, summary = scored_run
    server = Server()
    server.files["/rowanz/hellaswag/master/data/hellaswag_val.jsonl"] = hellaswag_file.read_bytes()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        https_like = server.url("/rowanz/hellaswag/master/data/hellaswag_val.jsonl")
        for source in (hellaswag_file.as_uri(), https_like):
            process, other = run_pipeline_cli([*SCORED_RUN, "--set", f"eval.hellaswag_path={source}", "--until", "hellaswag"], env)
            assert process.returncode == 0, process.stderr[-2000:]
            copy = Path(other["stages"]["hellaswag"]["path"])
            assert (copy / "data" / "hellaswag_val.jsonl").read_bytes() == hellaswag_file.read_bytes()
    finally:
        server.shutdown()
        server.server_close()
    bad = tmp_path / "not_hellaswag.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["only one"], "label": 0}\n')
    process, _ = run_pipeline_cli([*SCORED_RUN, "--set", f"eval.hellaswag_path={bad}", "--until", "hellaswag"], env)
    assert process.returncode == 1
    assert process.stderr.strip().splitlines()[-1] == (
        f"error: EvalError: {bad} line 1 is not a HellaSwag item (ctx, 4 endings, label); "
        "point eval.hellaswag_path at HellaSwag's hellaswag_val.jsonl")


def test_evaluate_flow_scores_every_kept_checkpoint_and_the_table_grows(scored_run, prefect_server, hellaswag_file):
    env, summary = scored_run
    args = ["--config", "configs/demo.yaml", "--set", "train.run_name=scored", "--set", "eval.hellaswag_max_items=20",
            "--set", "eval.max_batches=2", "--set", f"eval.hellaswag_path={hellaswag_file}"]
    before = latest_artifact(prefect_server, "scored-checkpoint-scores")
    assert [row["step"] for row in json.loads(before["data"])] == [30]  # the pipeline scored its last checkpoint

    process, every = run_evaluate_cli([*args, "--checkpoint", "all"], env)
    assert process.returncode == 0, process.stderr[-3000:]
    assert [Path(c["checkpoint"]).name for c in every["checkpoints"]] == ["step_000010", "step_000020", "step_000030"]
    assert "evaluate: cache hit" in process.stdout + process.stderr  # step 30 was scored by the pipeline
    rows = json.loads(latest_artifact(prefect_server, "scored-checkpoint-scores")["data"])
    assert [row["step"] for row in rows] == [10, 20, 30]
    assert [row["tokens"] for row in rows] == [10 * 2048, 20 * 2048, 30 * 2048]
    assert all(row["hellaswag_items"] == 20 for row in rows) and rows[-1]["val_loss"] < rows[0]["val_loss"]

    progress = latest_artifact(prefect_server, "scored-progress")["data"]
    assert progress.count("data:image/svg+xml;base64,") == 2  # val loss and HellaSwag against tokens seen
    gallery = latest_artifact(prefect_server, "scored-samples-gallery")["data"]
    assert [line for line in gallery.splitlines() if line.startswith("## Step")] == ["## Step 10", "## Step 20", "## Step 30"]

    store = ArtifactStore(summary["storage_root"])
    checkpoints = Path(summary["storage_root"]) / "runs" / "scored" / "checkpoints"
    measured = {int(p.name.removeprefix("step_")): json.loads((p / "state.json").read_text())["val_loss"]
                for p in checkpoints.glob("step_*")}
    best = min(measured, key=measured.get)  # "best" is the val loss measured when the checkpoint was taken
    process, chosen = run_evaluate_cli([*args, "--checkpoint", "best"], env)
    assert process.returncode == 0 and Path(chosen["checkpoints"][0]["checkpoint"]).name == f"step_{best:06d}"
    assert store.exists("evaluate", chosen["checkpoints"][0]["evaluate"])

    process, _ = run_evaluate_cli([*args, "--checkpoint", "25"], env)
    assert process.returncode == 1
    assert process.stderr.strip().splitlines()[-1].endswith("has no 25 checkpoint (steps there: 10, 20, 30); "
                                                            "name one of those steps, or train the run first")


def test_an_unreachable_hellaswag_url_uses_the_copy_fetched_before(scored_run, tmp_path):
    """Offline, a preset's HellaSwag URL cannot be fingerprinted: the copy from that URL already in
    the store is used, with a warning, instead of failing the run."""
    import warnings

    from storage.versions import plan_hellaswag

    env, summary = scored_run
    store = ArtifactStore(summary["storage_root"])
    [fetched] = [m for m in store.manifests("hellaswag") if m.inputs["source"]["url"].startswith("http://")]
    dead = fetched.inputs["source"]["url"]  # the loopback server of the earlier test is gone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_hellaswag(dead, store.root)
    assert plan.version == fetched.version and "cannot be reached" in str(caught[-1].message)
    with pytest.raises(Exception, match="cannot reach"):
        plan_hellaswag(dead.replace("hellaswag_val", "never_fetched"), store.root)
