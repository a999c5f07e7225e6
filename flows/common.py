"""What the flows share: their run names, and the CLI around them.

A flow CLI validates the config before Prefect starts, runs the flow (a temporary Prefect
server starts when PREFECT_API_URL is unset), and prints one line for a user or transient
error (exit 1) or, on success, the JSON summary as the very last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from prefect.runtime import flow_run

from configs import load_config, nest_overrides, parse_overrides
from configs.errors import TransientError, UserError
from storage.artifacts import ArtifactStore


def flow_run_name() -> str:
    """Flow run names say what they are: `<preset>/<run name>`."""
    parameters = flow_run.get_parameters()
    try:
        config = load_config(parameters.get("config", "demo"), parameters.get("overrides"))
        return f"{config.name}/{config.run_name}"
    except Exception:
        return f"{parameters.get('config', 'demo')}/invalid-config"


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.yaml", help="preset name or YAML path (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_iters=200 (repeatable)")


def run_flow_cli(args: argparse.Namespace, run: Callable[[dict[str, Any]], dict[str, Any]],
                 where_to_look: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Check the config and storage root, then `run(overrides)` (which calls the flow); print
    the outcome. User and transient errors are one line; anything else keeps its traceback."""
    try:
        overrides = nest_overrides(parse_overrides(args.overrides))
        cfg = load_config(args.config, overrides)  # fail fast on a bad config or storage root, before Prefect starts
        ArtifactStore(cfg.storage.root).ensure_writable()
        summary = run(overrides)
    except (UserError, TransientError) as exc:
        stop_temporary_server()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    stop_temporary_server()
    if where_to_look:
        where_to_look(summary)
    print(json.dumps(summary, default=str), flush=True)
    return 0


def stop_temporary_server() -> None:
    """Send the last logs and events, then stop the temporary Prefect server this process
    started (if it did), so that its goodbye line comes before the summary, not after it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)
    for server in list(SubprocessASGIServer._instances.values()):  # Prefect keeps one per port; atexit stops them otherwise
        server.stop()
