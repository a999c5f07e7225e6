"""Per-file work on a real task runner: one cached task run per parquet file and stage
(download, profile, tokenize), the same shards and profile from the local runner and a Dask
LocalCluster of two worker processes, and reruns that redo only the files a crash left
unfinished, or a file new to the glob."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import ConfigError, load_config
from tests.conftest import PROJECT_ROOT, run_pipeline_cli

pytestmark = pytest.mark.integration
FILES = 6


@pytest.fixture(scope="module")
def parquet_folder(fineweb_parquet, tmp_path_factory) -> Path:
    """Six FineWeb parquet files (slices of the sample), and a seventh kept aside."""
    table = pq.read_table(pa.BufferReader(fineweb_parquet))
    folder, aside = tmp_path_factory.mktemp("dump"), tmp_path_factory.mktemp("aside")
    step = table.num_rows // (FILES + 1)
    for index in range(FILES + 1):
        target = folder if index < FILES else aside
        pq.write_table(table.slice(index * step, step), target / f"000_{index:05d}.parquet", row_group_size=100)
    return folder


def tokenize_args(folder: Path, run: str, *settings: str) -> list[str]:
    return ["--config", "configs/demo.yaml", "--until", "tokenize", "--set", f"data.source={folder}/*.parquet",
            "--set", f"train.run_name={run}", *(f"--set={s}" for s in settings)]


def shard_bytes(summary: dict) -> dict[str, bytes]:
    folder = Path(summary["stages"]["tokenize"]["path"])
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.bin"))}


def file_task_states(prefect_server, run: str, verb: str = "tokenize") -> list[str]:
    """States of the per-file task runs (`<verb> <file>.parquet`: download, profile or tokenize)
    in the newest `dataset <run>` subflow run."""
    api = prefect_server.api_url
    [subflow] = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [f"dataset {run}"]}},
                                                           "sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
    runs = httpx.post(f"{api}/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [subflow["id"]]}}}).json()
    return sorted(r["state_name"] for r in runs if r["name"].startswith(f"{verb} ") and r["name"].endswith(".parquet"))


def profile_report(summary: dict) -> dict:
    report = json.loads((Path(summary["stages"]["profile"]["path"]) / "profile.json").read_text())
    return {**report, "seconds": None, "file_bytes": None, "per_file": [{**f, "file": Path(f["file"]).name} for f in report["per_file"]]}


def test_dask_cluster_of_two_workers_writes_the_local_runners_shards(prefect_server, parquet_folder, tmp_path):
    env = dict(prefect_server.env, OMP_NUM_THREADS="1")
    local, local_summary = run_pipeline_cli(tokenize_args(parquet_folder, "local", f"storage.root={tmp_path / 'a'}",
                                                          "runner.workers=2"), env, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    dask, dask_summary = run_pipeline_cli(tokenize_args(parquet_folder, "dask", f"storage.root={tmp_path / 'b'}",
                                                        "runner.kind=dask", "runner.workers=2", "tokenize.num_workers=1"),
                                          env, timeout=600)
    assert dask.returncode == 0, dask.stderr[-3000:]
    assert "LocalCluster" in dask.stdout + dask.stderr  # prefect-dask started the cluster the files ran on
    for verb in ("download", "profile", "tokenize"):
        assert file_task_states(prefect_server, "dask", verb) == ["Completed"] * FILES, verb
    assert profile_report(dask_summary) == profile_report(local_summary)
    assert profile_report(dask_summary)["rows"] == sum(f["rows"] for f in profile_report(dask_summary)["per_file"]) > 0
    assert dask_summary["stages"]["tokenize"]["version"] == local_summary["stages"]["tokenize"]["version"]
    local_shards, dask_shards = shard_bytes(local_summary), shard_bytes(dask_summary)
    assert len(local_shards) == 2 * FILES and local_shards == dask_shards  # a train and a val shard per file, same bytes


def test_a_killed_run_redoes_only_unfinished_files_and_a_new_file_is_the_only_one_tokenized(
    prefect_server, parquet_folder, tmp_path
):
    env = dict(prefect_server.env, OMP_NUM_THREADS="1")
    args = tokenize_args(parquet_folder, "crash", f"storage.root={tmp_path}", "runner.workers=1", "tokenize.num_workers=1")
    killed = subprocess.run([sys.executable, "-m", "tests.kill_flow", "4", "--", *args], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = len(list((tmp_path / "tokenize-file").glob("*/manifest.json")))
    assert finished == 3

    rerun, summary = run_pipeline_cli(args, env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert file_task_states(prefect_server, "crash") == ["Cached"] * 3 + ["Completed"] * 3
    assert summary["stages"]["download"]["cache_hit"] and summary["stages"]["profile"]["cache_hit"]
    assert file_task_states(prefect_server, "crash", "download") == file_task_states(prefect_server, "crash", "profile") == []

    os.link(next(parquet_folder.parent.glob("aside*/000_00006.parquet")), parquet_folder / "000_00006.parquet")
    try:
        grown, grown_summary = run_pipeline_cli(args, env, timeout=600)
    finally:
        (parquet_folder / "000_00006.parquet").unlink()
    assert grown.returncode == 0, grown.stderr[-3000:]
    for verb in ("download", "profile", "tokenize"):  # only the new file is fetched, profiled and tokenized
        assert file_task_states(prefect_server, "crash", verb) == ["Cached"] * FILES + ["Completed"], verb
    grown_profile = profile_report(grown_summary)
    assert grown_profile["files"] == FILES + 1 and grown_profile["rows"] == profile_report(summary)["rows"] + grown_profile["per_file"][-1]["rows"]
    before, after = shard_bytes(summary), shard_bytes(grown_summary)
    assert all(after[name] == data for name, data in before.items() if name.startswith("train"))  # the old files' tokens, in place


def test_a_ray_runner_needs_an_address_and_prefect_ray():
    with pytest.raises(ConfigError, match="runner.address"):
        load_config("demo", ["runner.kind=ray"])
    from configs.errors import UserError
    from flows.dataset import task_runner

    config = load_config("demo", ["runner.kind=ray", "runner.address=ray://127.0.0.1:10001"]).runner
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install -e '\.\[ray\]'"):
            task_runner(config)
    else:
        assert type(task_runner(config)).__name__ == "RayTaskRunner"
