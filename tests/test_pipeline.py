"""The whole pipeline end to end through its public entry point, against a real Prefect server."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.artifacts import ArtifactStore
from tests.conftest import PROJECT_ROOT, run_pipeline_cli

STAGES = ["download", "profile", "tokenize", "train", "evaluate", "sample"]
DATA_STAGES = ["download", "profile", "tokenize"]


@pytest.fixture(scope="module")
def demo_runs(prefect_server, tmp_path_factory):
    """The demo preset run twice under one storage root: (first summary, second summary, env)."""
    root = tmp_path_factory.mktemp("demo") / "artifacts"
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(root), PREFECT_LOGGING_LEVEL="INFO")
    first, first_summary = run_pipeline_cli(["--config", "configs/demo.yaml"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    second, second_summary = run_pipeline_cli(["--config", "configs/demo.yaml"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    return first_summary, second_summary, second.stdout + second.stderr, env


def test_demo_runs_every_stage_and_publishes_verified_artifacts(demo_runs):
    summary, _, _, env = demo_runs
    assert list(summary["stages"]) == STAGES
    assert summary["storage_root"] == str(Path(env["FWP_STORAGE_ROOT"]).resolve())
    store = ArtifactStore(summary["storage_root"])
    for stage in ["download", "profile", "tokenize", "evaluate", "sample"]:
        info = summary["stages"][stage]
        assert info["cache_hit"] is False
        manifest = json.loads((Path(info["path"]) / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["version"] == info["version"]
        assert manifest["files"], f"{stage} published no files"
        assert store.verify(stage, info["version"]) == []
    tokenize_dir = Path(summary["stages"]["tokenize"]["path"])
    assert sorted(p.name for p in tokenize_dir.glob("*.bin"))[0].startswith("train_")
    assert list(tokenize_dir.glob("val_*.bin"))
    assert (Path(summary["stages"]["profile"]["path"]) / "profile.json").exists()
    checkpoint = Path(summary["stages"]["train"]["path"])
    assert (checkpoint / "manifest.json").exists()
    assert summary["iterations"] == 120
    assert summary["tokens_trained"] == 120 * 8 * 128 * 2
    # trained: well below the loss of a uniform guess over GPT-2's vocabulary
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < math.log(50257) - 2
    samples = (Path(summary["stages"]["sample"]["path"]) / "samples.txt").read_text()
    assert samples.count("The module") == 2


def test_model_card_states_the_expected_epochs_over_the_training_tokens(demo_runs, prefect_server):
    import httpx

    summary, _, _, _ = demo_runs
    tokenize = json.loads((Path(summary["stages"]["tokenize"]["path"]) / "manifest.json").read_text())
    epochs = 120 * 8 * 128 * 2 / tokenize["metrics"]["tokens"]["train"]
    response = httpx.post(f"{prefect_server.api_url}/artifacts/latest/filter",
                          json={"artifacts": {"key": {"any_": ["demo-model-card"]}}})
    [card] = response.json()
    assert f"| expected epochs over the data | {epochs:.2f} |" in card["data"]


def test_second_run_is_served_from_the_cache_with_the_same_versions(demo_runs):
    first, second, output, _ = demo_runs
    for stage in DATA_STAGES + ["evaluate", "sample"]:
        assert second["stages"][stage]["cache_hit"] is True, stage
        assert second["stages"][stage]["version"] == first["stages"][stage]["version"]
        assert f"{stage}: cache hit" in output
    assert second["iterations"] == first["iterations"]  # already trained: nothing retrained
    assert second["stages"]["train"]["path"] == first["stages"]["train"]["path"]


def test_ui_artifacts_are_published_under_stable_keys(demo_runs, prefect_server):
    import httpx

    keys = {"demo-data-profile", "demo-tokenize-shards", "demo-model-card", "demo-loss-curve", "demo-evaluation", "demo-samples"}
    response = httpx.post(f"{prefect_server.api_url}/artifacts/latest/filter", json={"limit": 200})
    response.raise_for_status()
    published = {artifact["key"] for artifact in response.json()}
    assert keys <= published, keys - published


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_missing_source_fails_with_one_line_and_keeps_earlier_artifacts(demo_runs, tmp_path):
    summary, _, _, env = demo_runs
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--set", f"data.source={tmp_path}/nope.parquet"], env)
    assert process.returncode == 1
    line = _last_line(process.stderr)
    assert line.startswith("error:") and "nope.parquet" in line and "data.source" in line
    store = ArtifactStore(summary["storage_root"])
    for stage in DATA_STAGES:
        assert store.verify(stage, summary["stages"][stage]["version"]) == []


def test_parquet_without_text_column_is_rejected_by_name(demo_runs, tmp_path):
    _, _, _, env = demo_runs
    bad = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a document", "another"], "id": ["1", "2"]}), bad)
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--set", f"data.source=file://{bad}", "--until", "tokenize"], env)
    assert process.returncode == 1
    line = _last_line(process.stderr)
    assert line.startswith("error:") and "text" in line and "no_text.parquet" in line
    assert not any(p.name.startswith(".") and ".tmp" in p.name for p in Path(env["FWP_STORAGE_ROOT"]).rglob("*"))


def test_trainer_cli_finds_the_flows_tokenized_data_by_itself(demo_runs):
    summary, _, _, env = demo_runs
    trained = subprocess.run([sys.executable, "-m", "gpt.train", "--config", "configs/demo.yaml",
                              "--set", "train.run_name=cli", "--set", "train.max_iters=2"],
                             cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads(trained.stdout.strip().splitlines()[-1])["iterations"] == 2
    metrics = Path(summary["storage_root"]) / "runs" / "cli" / "metrics.jsonl"
    [start] = [json.loads(line) for line in metrics.read_text().splitlines() if '"start"' in line]
    assert start["data_dir"] == summary["stages"]["tokenize"]["path"]


def test_trainer_cli_without_data_names_the_command_that_makes_it(prefect_server, tmp_path):
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(tmp_path / "artifacts"))  # the session's server: no temporary one
    trainer = [sys.executable, "-m", "gpt.train", "--config", "configs/demo.yaml", "--set", "train.max_iters=1"]
    missing = subprocess.run(trainer, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    line = missing.stderr.strip()
    assert line.startswith("error: no tokenized data for this config under") and "\n" not in line
    command = line.split("make it with: ")[1].split("  (or pass --data-dir)")[0]
    assert command == "python -m flows.fineweb_pretrain --config configs/demo.yaml --set train.max_iters=1 --until tokenize"
    made = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    trained = subprocess.run(trainer, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0 and json.loads(trained.stdout.strip().splitlines()[-1])["iterations"] == 1


def test_cli_outside_make_prints_no_error_and_ends_with_its_summary(tmp_path):
    """No PREFECT_API_URL (a temporary server), no analytics settings, stdout and stderr in one stream."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), FWP_STORAGE_ROOT=str(tmp_path / "artifacts"))
    process = subprocess.run([sys.executable, "-m", "flows.fineweb_pretrain", "--config", "configs/demo.yaml", "--until", "tokenize"],
                             cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:]
    lines = process.stdout.strip().splitlines()
    assert [line for line in lines if "ERROR" in line] == []
    assert "Stopping temporary server" in process.stdout
    assert list(json.loads(lines[-1])["stages"]) == ["download", "profile", "tokenize"]


def test_flows_turn_prefect_telemetry_off_unless_the_user_chose(tmp_path):
    probe = "import flows, os; print(os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'], os.environ['DO_NOT_TRACK'])"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    quiet = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert quiet.stdout.split() == ["false", "1"]
    chosen = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env=dict(env, PREFECT_SERVER_ANALYTICS_ENABLED="true", DO_NOT_TRACK="0"))
    assert chosen.stdout.split() == ["true", "0"]


def test_invalid_config_value_fails_before_anything_runs(tmp_path):
    root = tmp_path / "artifacts"
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--set", "train.max_iters=-5", "--set", f"storage.root={root}"],
                                  dict(os.environ), timeout=120)
    assert process.returncode == 1
    line = _last_line(process.stderr)
    assert "train.max_iters" in line and "greater than or equal to 1" in line
    assert not root.exists()


def test_unwritable_storage_root_is_one_line_error_naming_the_fix(tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--set", f"storage.root={in_the_way}/artifacts"],
                                  dict(os.environ), timeout=120)
    assert process.returncode == 1
    line = _last_line(process.stderr)
    assert f"storage root {in_the_way}/artifacts is not writable" in line and "--set storage.root=" in line
    assert "Traceback" not in process.stderr
    assert in_the_way.read_text() == "not a folder" and list(tmp_path.iterdir()) == [in_the_way]
