"""A worker killed with SIGKILL in the middle of a training flow run, as when its machine dies:
the run ends Crashed (heartbeats stop; the automation `make up` creates marks it), a new
worker takes the next run, and re-running the deployment resumes training with the data
stages served from the cache. (`make faults`: waiting out the missed heartbeats takes minutes.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from flows.stack import _pid, _prefect, down, stack_from_env, start_worker, up
from gpt.checkpoint import latest_checkpoint
from tests.conftest import free_port

RUN = "killed-worker"
OVERRIDES = json.dumps({"train": {"max_iters": 200, "checkpoint_interval": 20, "eval_interval": 40, "run_name": RUN}})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home, root = tmp_path_factory.mktemp("crash-home"), tmp_path_factory.mktemp("crash-artifacts")
    stack = stack_from_env(folder=home / "stack", port=free_port(),
                           extra_env={"PREFECT_HOME": str(home), "FWP_STORAGE_ROOT": str(root), "PREFECT_LOGGING_LEVEL": "INFO",
                                      "OMP_NUM_THREADS": "2"})
    up(stack)
    yield stack, root
    down(stack)


def api(stack, method: str, path: str, **kwargs):
    response = httpx.request(method, f"{stack.api_url}{path}", timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def descendants(pid: int) -> list[int]:
    """pid's child processes, their children, and so on (from ps)."""
    table = [line.split() for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines()]
    children = {}
    for child, parent in table:
        children.setdefault(int(parent), []).append(int(child))
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        found += children.get(current, [])
        frontier += children.get(current, [])
    return found


def deployment_run(stack, *params: str, watch: bool) -> str:
    command = ["deployment", "run", "fineweb-pretrain/demo", "--param", f"overrides={OVERRIDES}", *params]
    result = _prefect(stack, *command, *(["--watch"] if watch else []), check=False, timeout=900)
    assert "Created flow run" in result.stdout, result.stdout + result.stderr
    return result.stdout.split("UUID:")[1].split()[0].strip()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_a_killed_worker_leaves_a_crashed_run_and_the_rerun_resumes(stack):
    stack, root = stack
    run_dir = root / "runs" / RUN
    first = deployment_run(stack, watch=False)
    wait_for(lambda: latest_checkpoint(run_dir), 600, "the first checkpoint")

    worker = _pid(stack, "worker")
    doomed = [worker, *descendants(worker)]
    assert len(doomed) >= 2, "the flow run's process is not the worker's child"
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    killed_at = latest_checkpoint(run_dir)
    assert api(stack, "GET", f"/flow_runs/{first}")["state"]["type"] == "RUNNING"  # the server cannot know yet

    crashed = wait_for(lambda: (run := api(stack, "GET", f"/flow_runs/{first}"))["state"]["type"] == "CRASHED" and run,
                       300, "the silent flow run to be marked Crashed")
    assert "no heartbeat" in crashed["state"]["message"]

    start_worker(stack)
    rerun = deployment_run(stack, watch=True)
    flow_run = api(stack, "GET", f"/flow_runs/{rerun}")
    logs = "\n".join(e["message"] for e in api(stack, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [rerun]}}, "limit": 200}))
    assert flow_run["state"]["type"] == "COMPLETED", logs[-3000:]
    for stage in ("download", "profile", "tokenize"):
        assert f"{stage}: cache hit" in logs
    resumed_from = int(killed_at.name.removeprefix("step_"))
    assert f"resumed from iteration {resumed_from}" in logs
    assert latest_checkpoint(run_dir).name == "step_000200"
