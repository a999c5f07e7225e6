"""The local Prefect stack: a server (SQLite, loopback), a process work pool, the deployments,
the automations of flows/automations.yaml (a flow run whose heartbeats stop is marked Crashed),
and a worker whose flow runs send heartbeats.

    python -m flows.stack up      # start everything in the background, print the UI URL
    python -m flows.stack down    # stop the worker (two SIGINTs) and the server
    python -m flows.stack ui      # print the UI URL
    python -m flows.stack status

Logs and PID files live in one folder, `$FWP_STACK_DIR` (default `.stack/`). The server
honours `PREFECT_HOME` and `PREFECT_SERVER_API_PORT` (default 4200) from the environment.
Tests use the same functions to start a real stack on a free port.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from configs.errors import TransientError, UserError
from flows import PREFECT_DEFAULTS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORK_POOL = "fineweb-local"
AUTOMATIONS = PROJECT_ROOT / "flows" / "automations.yaml"
# Flow runs the worker starts send a heartbeat this often (Prefect's minimum, in seconds); the
# automations in AUTOMATIONS mark a run Crashed when its heartbeats stop.
HEARTBEAT_DEFAULTS = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


class StackError(UserError):
    """The stack cannot come up as set: the server's port is taken, a Prefect command refuses;
    the message names the log or the command's last line."""


class ServerNotAnswering(TransientError):
    """The server started but has not answered yet (a first start migrates its database)."""


@dataclass
class Stack:
    folder: Path
    port: int
    env: dict[str, str]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def stack_from_env(folder: str | os.PathLike | None = None, port: int | None = None, extra_env: dict[str, str] | None = None) -> Stack:
    folder = Path(folder or os.environ.get("FWP_STACK_DIR", PROJECT_ROOT / ".stack")).resolve()
    port = port or int(os.environ.get("PREFECT_SERVER_API_PORT", "4200"))
    defaults = {**PREFECT_DEFAULTS, **HEARTBEAT_DEFAULTS}
    stack = Stack(folder=folder, port=port, env={**defaults, **os.environ, **(extra_env or {})})  # the user's settings win
    # loopback only, unless the user names another address to listen on (e.g. 0.0.0.0 for workers on other machines)
    stack.env.update(PREFECT_API_URL=stack.api_url, PREFECT_SERVER_API_PORT=str(port),
                     PREFECT_SERVER_API_HOST=os.environ.get("PREFECT_SERVER_API_HOST", "127.0.0.1"))
    return stack


def _prefect(stack: Stack, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "prefect", "--no-prompt", *args]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=stack.env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StackError(f"`prefect {' '.join(args)}` failed: {tail[0]}")
    return result


def _spawn(stack: Stack, name: str, *args: str) -> int:
    stack.folder.mkdir(parents=True, exist_ok=True)
    log = open(stack.folder / f"{name}.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=PROJECT_ROOT, env=stack.env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (stack.folder / f"{name}.pid").write_text(str(process.pid))
    return process.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of this process counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _pid(stack: Stack, name: str) -> int | None:
    file = stack.folder / f"{name}.pid"
    if not file.exists():
        return None
    pid = int(file.read_text().strip())
    return pid if _alive(pid) else None


def server_healthy(stack: Stack) -> bool:
    try:
        with urllib.request.urlopen(f"{stack.api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(stack: Stack, timeout: float = 90) -> None:
    if server_healthy(stack):
        return
    pid = _spawn(stack, "server", "server", "start", "--host", stack.env["PREFECT_SERVER_API_HOST"], "--port", str(stack.port), "--analytics-off")
    deadline = time.monotonic() + timeout
    while not server_healthy(stack):
        if not _alive(pid):
            raise StackError(f"the Prefect server exited at start (is port {stack.port} in use? set PREFECT_SERVER_API_PORT); "
                             f"see {stack.folder / 'server.log'}")
        if time.monotonic() > deadline:
            raise ServerNotAnswering(f"the Prefect server did not answer within {timeout:.0f}s; run the command again, "
                                     f"or see {stack.folder / 'server.log'}")
        time.sleep(0.5)


def deploy_all(stack: Stack) -> None:
    """Create the process work pool (idempotent) and deploy everything in prefect.yaml."""
    existing = _prefect(stack, "work-pool", "inspect", WORK_POOL, check=False)
    if existing.returncode:
        _prefect(stack, "work-pool", "create", WORK_POOL, "--type", "process")
    _prefect(stack, "deploy", "--all")


def create_automations(stack: Stack) -> None:
    """Create the automations of flows/automations.yaml that the server lacks (by name)."""
    request = urllib.request.Request(f"{stack.api_url}/automations/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        existing = {automation["name"] for automation in json.load(response)}
    for automation in yaml.safe_load(AUTOMATIONS.read_text())["automations"]:
        if automation["name"] not in existing:
            _prefect(stack, "automation", "create", "--from-json", json.dumps(automation))


def start_worker(stack: Stack) -> None:
    if _pid(stack, "worker"):
        return
    _spawn(stack, "worker", "worker", "start", "--pool", WORK_POOL, "--name", f"fineweb-worker-{stack.port}")


def stop(stack: Stack, name: str, signals: tuple[int, ...], timeout: float = 30) -> None:
    pid = _pid(stack, name)
    if pid is None:
        (stack.folder / f"{name}.pid").unlink(missing_ok=True)
        return
    for sig in signals:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout / len(signals)
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _alive(pid):
            break
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    (stack.folder / f"{name}.pid").unlink(missing_ok=True)


def up(stack: Stack) -> None:
    start_server(stack)
    deploy_all(stack)
    create_automations(stack)
    start_worker(stack)


def down(stack: Stack) -> None:
    stop(stack, "worker", (signal.SIGINT, signal.SIGINT, signal.SIGTERM))  # the worker needs two SIGINTs
    stop(stack, "server", (signal.SIGINT, signal.SIGTERM))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack", description="the local Prefect server + worker")
    parser.add_argument("command", choices=("up", "down", "ui", "status"))
    args = parser.parse_args(argv)
    stack = stack_from_env()
    try:
        if args.command == "up":
            up(stack)
            print(f"Prefect server, work pool {WORK_POOL!r}, deployments and worker are up; logs in {stack.folder}")
            print(f"UI: {stack.ui_url}   (export PREFECT_API_URL={stack.api_url} to use the CLI against it)")
        elif args.command == "down":
            down(stack)
            print("worker and server stopped")
        elif args.command == "ui":
            print(stack.ui_url)
        else:
            print(f"server {'up' if server_healthy(stack) else 'down'} at {stack.ui_url}; "
                  f"worker {'running' if _pid(stack, 'worker') else 'stopped'}; logs in {stack.folder}")
    except (UserError, TransientError) as exc:  # one line; anything else is a bug and keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
