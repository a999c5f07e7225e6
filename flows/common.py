"""What the flows share: their run names, the scoring of a checkpoint, and the CLI around them.

`fineweb-pretrain` ends by scoring its last checkpoint the way `fineweb-evaluate` scores any
(`score_checkpoint`: the evaluate and sample stages, then the run's report). A flow CLI
validates the config before Prefect starts, runs the flow (a temporary Prefect server starts
when PREFECT_API_URL is unset), and prints one line for a user or transient error (exit 1)
or, on success, the JSON summary as the very last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from configs import PipelineConfig, PipelineOverrides, load_config, nest_overrides, parse_overrides
from configs.errors import TransientError, UserError
from gpt.checkpoint import checkpoint_identity, read_state
from storage.artifacts import ArtifactStore
from storage.versions import plan_download, plan_evaluate, plan_hellaswag, plan_sample, plan_tokenize
from tasks.common import run_cached_stage
from tasks.evaluate import evaluate
from tasks.hellaswag import hellaswag
from tasks.report import publish_run_report
from tasks.sample import sample


def flow_run_name() -> str:
    """Flow run names say what they are: `<preset>/<run name>`."""
    parameters = flow_run.get_parameters()
    try:
        config = load_config(parameters.get("config", "demo"), parameters.get("overrides"))
        return f"{config.name}/{config.run_name}"
    except Exception:
        return f"{parameters.get('config', 'demo')}/invalid-config"


def hellaswag_artifact(cfg: PipelineConfig, store: ArtifactStore) -> tuple[dict[str, Any] | None, bool | None]:
    """The HellaSwag artifact of `eval.hellaswag_path` (fetched once, then a cache hit), and
    whether it was one; (None, None) when HellaSwag is off."""
    if not cfg.eval.hellaswag_path:
        return None, None
    planned = plan_hellaswag(cfg.eval.hellaswag_path, store.root)
    return run_cached_stage(hellaswag, store, planned.version, url=planned.urls[0], fingerprint=planned.fingerprints[0],
                            ui_name=cfg.run_name)


def score_checkpoint(cfg: PipelineConfig, store: ArtifactStore, checkpoint: str, tokenize_ref: dict[str, Any],
                     hellaswag_ref: dict[str, Any] | None, sample_it: bool = True) -> dict[str, tuple[dict[str, Any], bool]]:
    """The evaluate and (unless told not to) sample stages of one checkpoint, then the run's
    report rebuilt: {stage: (its artifact ref, whether it was a cache hit)}."""
    identity, ui = checkpoint_identity(checkpoint), cfg.run_name
    version = plan_evaluate(identity, tokenize_ref["version"], hellaswag_ref and hellaswag_ref["version"], cfg.eval)
    results = {"evaluate": run_cached_stage(evaluate, store, version, checkpoint=checkpoint, tokenize_ref=tokenize_ref,
                                            hellaswag_ref=hellaswag_ref, config=cfg.eval, ui_name=ui)}
    if sample_it:
        results["sample"] = run_cached_stage(sample, store, plan_sample(identity, cfg.sample), checkpoint=checkpoint,
                                             config=cfg.sample, ui_name=ui)
    publish_run_report(store, cfg.run_name, ui)
    return results


def training_data(cfg: PipelineConfig, store: ArtifactStore, checkpoint: Path) -> dict[str, Any]:
    """The tokenize artifact the checkpoint was trained on (its val split is what is scored):
    the one its state names, else the one this config makes."""
    recorded = read_state(checkpoint).get("data_dir")
    if recorded and store.exists("tokenize", Path(recorded).name):
        return store.ref("tokenize", Path(recorded).name).to_dict()
    version = plan_tokenize(plan_download(cfg.data, store.root).version, cfg.data, cfg.tokenize)
    if not store.exists("tokenize", version):
        raise UserError(f"the tokenized data of {checkpoint} is not in {store.root}; make it with "
                        f"python -m flows.fineweb_pretrain --config {cfg.name} --until tokenize")
    return store.ref("tokenize", version).to_dict()


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
        summary = run(PipelineOverrides.model_validate(overrides))  # recorded by Prefect with credentials redacted
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
