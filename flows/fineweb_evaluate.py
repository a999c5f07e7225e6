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
from typing import Any

from prefect import flow

from configs import PipelineOverrides, load_config
from configs.errors import UserError
from flows.common import config_arguments, flow_run_name, hellaswag_artifact, run_flow_cli, score_checkpoint, training_data
from gpt.checkpoint import list_checkpoints, select_checkpoint
from storage.artifacts import ArtifactStore


@flow(name="fineweb-evaluate", flow_run_name=flow_run_name, log_prints=True)
def fineweb_evaluate(config: str = "demo", overrides: PipelineOverrides | None = None,
                     checkpoint: str | int = "latest") -> dict[str, Any]:
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
    hellaswag_ref, _ = hellaswag_artifact(cfg, store)
    scored = []
    for folder in folders:
        results = score_checkpoint(cfg, store, str(folder), training_data(cfg, store, folder), hellaswag_ref)
        scored.append({"checkpoint": str(folder), **{stage: ref["version"] for stage, (ref, _) in results.items()},
                       "metrics": results["evaluate"][0]["metrics"]})
    return {"preset": cfg.name, "run_name": cfg.run_name, "storage_root": str(store.root), "checkpoints": scored}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.fineweb_evaluate", description=__doc__.split("\n\n")[0])
    config_arguments(parser)
    parser.add_argument("--checkpoint", default="latest", help="latest (default), best, all, or a step number")
    args = parser.parse_args(argv)
    which = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    return run_flow_cli(args, lambda overrides: fineweb_evaluate(config=args.config, overrides=overrides, checkpoint=which))


if __name__ == "__main__":
    sys.exit(main())
