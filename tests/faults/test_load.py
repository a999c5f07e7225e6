"""Load on one store: two flows of different runs at once, then twenty cached re-runs in a row.
Afterwards every manifest's checksums verify and no run saw another's files. (`make faults`)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.checkpoint import damaged_files, list_checkpoints, read_state
from storage.artifacts import MANIFEST, ArtifactStore
from tests.conftest import PROJECT_ROOT, run_pipeline_cli

SETTINGS = ["--config", "configs/demo.yaml", "--set", "train.max_iters=40", "--set", "train.checkpoint_interval=20"]


def every_artifact(root: Path) -> list[tuple[str, str]]:
    return [(folder.parent.name, folder.name) for folder in sorted(root.glob("*/*")) if (folder / MANIFEST).is_file()
            and folder.parent.name != "runs"]


def test_two_runs_at_once_then_twenty_cached_reruns_leave_every_file_verified_and_apart(prefect_server, tmp_path):
    root = tmp_path / "artifacts"
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(root), OMP_NUM_THREADS="1")
    runs = {name: subprocess.Popen([sys.executable, "-m", "flows.fineweb_pretrain", *SETTINGS, "--set", f"train.run_name={name}"],
                                   cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("left", "right")}
    summaries = {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        summaries[name] = json.loads(out.strip().splitlines()[-1])
    data_stages = ("download", "profile", "tokenize")
    for stage in data_stages:  # both trained on the same data: one artifact each (the version lock serialises the builds)
        assert summaries["left"]["stages"][stage]["version"] == summaries["right"]["stages"][stage]["version"]
        assert len([v for s, v in every_artifact(root) if s == stage]) == 1

    for attempt in range(20):
        name = ("left", "right")[attempt % 2]
        process, summary = run_pipeline_cli([*SETTINGS, "--set", f"train.run_name={name}"], env, timeout=600)
        assert process.returncode == 0, process.stderr[-3000:]
        assert all(info["cache_hit"] for stage, info in summary["stages"].items() if stage != "train"), summary
        assert {s: i["version"] for s, i in summary["stages"].items()} == {s: i["version"] for s, i in summaries[name]["stages"].items()}
        assert summary["iterations"] == 40 and summary["val_loss"] == summaries[name]["val_loss"]

    store = ArtifactStore(root)
    for stage, version in every_artifact(root):
        assert store.verify(stage, version) == [], (stage, version)
    for name in runs:
        run = store.run_dir(name)
        checkpoints = list_checkpoints(run)
        assert [c.name for c in checkpoints] == ["step_000020", "step_000040"]
        assert all(damaged_files(c) == [] and read_state(c)["config"]["train"]["run_name"] == name for c in checkpoints)
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert {e["run_dir"] for e in events if e["event"] == "start"} == {str(run)}  # only this run wrote here
        assert [e["iter"] for e in events if e["event"] == "train"] == sorted({e["iter"] for e in events if e["event"] == "train"})
    leftovers = [p for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    assert leftovers == []
