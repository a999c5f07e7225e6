"""The `fineweb-evaluate` flow: score the checkpoints of a run that exists, without training.

    python -m flows.fineweb_evaluate --config configs/fineweb-40m.yaml [--checkpoint latest|best|all|STEP] [--set key=value ...]

Each chosen checkpoint gets the evaluate stage (val loss, perplexity, bits per byte, and
HellaSwag when `eval.hellaswag_path` is set) and the sample stage (the same prompts every
time), both cached by the checkpoint's content; then the run's score table, its pictures
against tokens seen, and its sample gallery are rebuilt in the UI. The last line printed
is a JSON summary. `fineweb-pretrain` ends with the same scoring of its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from configs import PipelineConfig, PipelineOverrides, load_config
from configs.errors import UserError
from flows.common import config_arguments, flow_run_name, run_flow_cli
from gpt.checkpoint import checkpoint_identity, list_checkpoints, read_state, select_checkpoint
from storage.artifacts import ArtifactStore
from storage.versions import plan_download, plan_evaluate, plan_hellaswag, plan_sample, plan_tokenize
from tasks.common import run_cached_stage
from tasks.evaluate import evaluate
from tasks.hellaswag import hellaswag
from tasks.report import publish_run_report
from tasks.sample import sample


@flow(name="fineweb-evaluate", flow_run_name=flow_run_name, log_prints=True)
def fineweb_evaluate(config: str = "demo", overrides: PipelineOverrides | None = None, checkpoint: str = "latest") -> dict[str, Any]:
    """Evaluate and sample checkpoints of the run `train.run_name` (default: the preset's name).

    Args:
        config: a preset name or a YAML path: the run's config (its eval and sample sections apply).
        overrides: config values to change, by section, e.g. `{"eval": {"hellaswag_max_items": 500}}`.
        checkpoint: `latest`, `best` (lowest val loss among the kept checkpoints), `all` (every
            kept checkpoint), or a step number.
    """
    cfg = load_config(config, overrides)
    store = ArtifactStore(cfg.storage.root)
    run_dir = store.run_dir(cfg.run_name)
    folders = list_checkpoints(run_dir) if checkpoint == "all" else [select_checkpoint(run_dir, checkpoint)]
    if not folders:
        raise UserError(f"run {cfg.run_name} has no checkpoints under {run_dir}; train it first (python -m flows.fineweb_pretrain)")
    hellaswag_ref, _ = hellaswag_items(cfg, store)
    scored = []
    for folder in folders:
        results = score_checkpoint(cfg, store, str(folder), training_data(cfg, store, folder), hellaswag_ref)
        scored.append({"checkpoint": str(folder), **{stage: ref["version"] for stage, (ref, _) in results.items()},
                       "metrics": results["evaluate"][0]["metrics"]})
    return {"preset": cfg.name, "run_name": cfg.run_name, "storage_root": str(store.root), "checkpoints": scored}


def hellaswag_items(cfg: PipelineConfig, store: ArtifactStore) -> tuple[dict[str, Any] | None, bool | None]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.fineweb_evaluate", description=__doc__.split("\n\n")[0])
    config_arguments(parser)
    parser.add_argument("--checkpoint", default="latest", help="latest (default), best, all, or a step number")
    args = parser.parse_args(argv)
    return run_flow_cli(args, lambda overrides: fineweb_evaluate(config=args.config, overrides=overrides,
                                                                   checkpoint=args.checkpoint))


if __name__ == "__main__":
    sys.exit(main())
