"""The `fineweb-pretrain` flow: download → profile → tokenize → train → evaluate → sample.

    python -m flows.fineweb_pretrain --config configs/demo.yaml [--set key=value ...] [--until STAGE]

Without PREFECT_API_URL, Prefect starts a temporary local server for the run. The last
line printed is a JSON summary: every stage's artifact version and path, whether it was a
cache hit, the final val loss and the tokens trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Literal, get_args

from prefect import flow
from prefect.runtime import flow_run

from configs import PipelineConfig, PipelineOverrides, describe, load_config, nest_overrides, parse_overrides
from configs.errors import TransientError, UserError
from gpt.checkpoint import checkpoint_identity
from storage.artifacts import ArtifactStore
from storage.versions import plan_download, plan_evaluate, plan_profile, plan_sample, plan_tokenize
from tasks.common import run_cached_stage
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.profile import profile
from tasks.sample import sample
from tasks.tokenize import tokenize
from tasks.train import checkpointed_iteration, train

Stage = Literal["download", "profile", "tokenize", "train", "evaluate", "sample"]
STAGES: tuple[str, ...] = get_args(Stage)


def _run_name() -> str:
    """Flow run names say what they are: `<preset>/<run name>`."""
    parameters = flow_run.get_parameters()
    try:
        config = load_config(parameters.get("config", "demo"), parameters.get("overrides"))
        return f"{config.name}/{config.run_name}"
    except Exception:
        return f"{parameters.get('config', 'demo')}/invalid-config"


@flow(name="fineweb-pretrain", flow_run_name=_run_name, log_prints=True)
def fineweb_pretrain(config: str = "demo", overrides: PipelineOverrides | None = None, until: Stage | None = None,
                     continue_run: bool = False) -> dict[str, Any]:
    """Run the pipeline for a preset name or YAML path, with dotted-key overrides.

    Args:
        config: a preset name (`demo`, `fineweb-40m`, `gpt2-124m`) or a YAML path.
        overrides: config values to change, by section, e.g. `{"train": {"max_iters": 20000}}`;
            each is typed and bounded like the config itself.
        until: stop after this stage.
        continue_run: only continue an existing run from its last checkpoint: fail when it
            has none, do nothing when it is already at `train.max_iters`.
    """
    cfg = load_config(config, overrides)
    print(describe(cfg))
    return run_pipeline(cfg, until, continue_run)


def run_pipeline(cfg: PipelineConfig, until: Stage | None = None, continue_run: bool = False) -> dict[str, Any]:
    """Chain the stage tasks; each hands the next a versioned artifact."""
    store = ArtifactStore(cfg.storage.root)
    store.ensure_writable()
    ui = cfg.run_name
    summary: dict[str, Any] = {"preset": cfg.name, "run_name": cfg.run_name, "storage_root": str(store.root), "stages": {}}
    if continue_run:
        reached = checkpointed_iteration(store, cfg)
        if reached is None:
            raise UserError(f"run {cfg.run_name} has no checkpoint under {store.root / 'runs'} to continue; "
                            "run the pipeline once without continue_run first")
        if reached >= cfg.train.max_iters:
            print(f"run {cfg.run_name} is already at iteration {reached} (train.max_iters {cfg.train.max_iters}); nothing to do")
            summary.update(already_complete=True, iterations=reached)
            return summary

    def record(stage: str, ref: dict[str, Any], cache_hit: bool | None) -> bool:
        summary["stages"][stage] = {"version": ref.get("version"), "path": ref.get("path"), "cache_hit": cache_hit}
        if cache_hit:
            print(f"{stage}: cache hit, artifact {ref['version']} reused ({ref['path']})")
        return until == stage

    planned = plan_download(cfg.data, store.root)
    raw, hit = run_cached_stage(download, store, planned.version, urls=planned.urls, fingerprints=planned.fingerprints,
                                data=cfg.data, ui_name=ui)
    if record("download", raw, hit):
        return summary

    profiled, hit = run_cached_stage(profile, store, plan_profile(raw["version"], cfg.data, cfg.profile),
                                     download_ref=raw, data=cfg.data, config=cfg.profile, ui_name=ui)
    if record("profile", profiled, hit):
        return summary

    shards, hit = run_cached_stage(tokenize, store, plan_tokenize(raw["version"], cfg.data, cfg.tokenize),
                                   download_ref=raw, data=cfg.data, config=cfg.tokenize, ui_name=ui)
    if record("tokenize", shards, hit):
        return summary

    trained = train(store=store, config=cfg, tokenize_ref=shards, ui_name=ui)
    checkpoint = trained["latest_checkpoint"]
    summary.update(val_loss=trained.get("val_loss"), tokens_trained=trained.get("tokens_trained"),
                   iterations=trained.get("iterations"), resumed=trained.get("resumed"))
    if record("train", {"version": cfg.run_name, "path": checkpoint}, None):
        return summary

    scored, hit = run_cached_stage(evaluate, store, plan_evaluate(checkpoint_identity(checkpoint), shards["version"], cfg.eval),
                                   checkpoint=checkpoint, tokenize_ref=shards, config=cfg.eval, ui_name=ui)
    summary["eval"] = scored["metrics"]
    if record("evaluate", scored, hit):
        return summary

    samples, hit = run_cached_stage(sample, store, plan_sample(checkpoint_identity(checkpoint), cfg.sample),
                                    checkpoint=checkpoint, config=cfg.sample, ui_name=ui)
    record("sample", samples, hit)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.fineweb_pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="preset name or YAML path (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_iters=200 (repeatable)")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage")
    args = parser.parse_args(argv)
    try:
        overrides = nest_overrides(parse_overrides(args.overrides))
        cfg = load_config(args.config, overrides)  # fail fast on a bad config or storage root, before Prefect starts
        ArtifactStore(cfg.storage.root).ensure_writable()
        summary = fineweb_pretrain(config=args.config, overrides=overrides, until=args.until)
    except (UserError, TransientError) as exc:  # one line; anything else is a bug and keeps its traceback
        stop_temporary_server()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    stop_temporary_server()
    print_where_to_look(summary)
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


def print_where_to_look(summary: dict[str, Any]) -> None:
    print("\nArtifacts (each folder has a manifest.json with versions, config, checksums, metrics):")
    for stage, info in summary["stages"].items():
        reused = " (cache hit)" if info.get("cache_hit") else ""
        print(f"  {stage:<9} {info['path']}{reused}")
    print("To browse them in the Prefect UI: `make up` then open http://127.0.0.1:4200/artifacts "
          "(flow runs started against that server keep their artifacts).")


if __name__ == "__main__":
    sys.exit(main())
