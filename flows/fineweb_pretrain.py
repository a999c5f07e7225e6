"""The `fineweb-pretrain` flow: download → profile → tokenize → (hellaswag) → train → evaluate → sample.

    python -m flows.fineweb_pretrain --config configs/demo.yaml [--set key=value ...] [--until STAGE]

Without PREFECT_API_URL, Prefect starts a temporary local server for the run. The last
line printed is a JSON summary: every stage's artifact version and path, whether it was a
cache hit, the final val loss and the tokens trained. The hellaswag stage (a copy of the
HellaSwag items) runs when `eval.hellaswag_path` is set; the last checkpoint is scored as
`fineweb-evaluate` scores any checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal, get_args

from prefect import flow

from configs import PipelineConfig, PipelineOverrides, describe, load_config
from configs.errors import UserError
from flows.common import config_arguments, flow_run_name, hellaswag_artifact, run_flow_cli, score_checkpoint
from flows.dataset import prepare_dataset, task_runner
from storage.artifacts import ArtifactStore
from tasks.train import checkpointed_iteration, train

Stage = Literal["download", "profile", "tokenize", "hellaswag", "train", "evaluate", "sample"]
STAGES: tuple[str, ...] = get_args(Stage)


@flow(name="fineweb-pretrain", flow_run_name=flow_run_name, log_prints=True)
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
        return until == stage

    dataset = prepare_dataset.with_options(task_runner=task_runner(cfg.runner))(
        store=store, data=cfg.data, profile_config=cfg.profile, tokenize_config=cfg.tokenize, ui_name=ui, until=until)
    for stage, (ref, hit) in dataset.items():
        if record(stage, ref, hit):
            return summary
    shards = dataset["tokenize"][0]

    hellaswag_ref, hit = hellaswag_artifact(cfg, store)
    if hellaswag_ref is not None:
        record("hellaswag", hellaswag_ref, hit)
    if until == "hellaswag":
        return summary

    trained = train(store=store, config=cfg, tokenize_ref=shards, hellaswag_ref=hellaswag_ref, ui_name=ui)
    checkpoint = trained["latest_checkpoint"]
    summary.update(val_loss=trained.get("val_loss"), tokens_trained=trained.get("tokens_trained"),
                   iterations=trained.get("iterations"), resumed=trained.get("resumed"))
    if record("train", {"version": cfg.run_name, "path": checkpoint}, None):
        return summary

    results = score_checkpoint(cfg, store, checkpoint, shards, hellaswag_ref, sample_it=until != "evaluate")
    summary["eval"] = results["evaluate"][0]["metrics"]
    for stage, (ref, hit) in results.items():
        record(stage, ref, hit)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.fineweb_pretrain", description=__doc__.split("\n\n")[0])
    config_arguments(parser)
    parser.add_argument("--until", choices=STAGES, help="stop after this stage")
    args = parser.parse_args(argv)
    return run_flow_cli(args, lambda overrides: fineweb_pretrain(config=args.config, overrides=overrides, until=args.until),
                        where_to_look=print_where_to_look)


def print_where_to_look(summary: dict[str, Any]) -> None:
    print("\nArtifacts (each folder has a manifest.json with versions, config, checksums, metrics):")
    for stage, info in summary["stages"].items():
        reused = " (cache hit)" if info.get("cache_hit") else ""
        print(f"  {stage:<9} {info['path']}{reused}")
    print("To browse them in the Prefect UI: `make up` then open http://127.0.0.1:4200/artifacts "
          "(flow runs started against that server keep their artifacts).")


if __name__ == "__main__":
    sys.exit(main())
