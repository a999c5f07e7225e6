"""Evaluate and sample stages: val loss/perplexity/bits-per-byte and fixed-seed completions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from configs import EvalConfig, SampleConfig
from gpt.evaluate import evaluate as evaluate_checkpoint
from gpt.sample import sample as sample_checkpoint
from storage.artifacts import ArtifactStore, code_version, sha256_file, stable_hash
from tasks.common import ui_key, version_cache_key

EVAL_CODE = ("gpt/evaluate.py", "gpt/model.py")
SAMPLE_CODE = ("gpt/sample.py", "gpt/model.py")


def checkpoint_identity(checkpoint: str | Path) -> str:
    """A checkpoint is identified by its manifest, which holds the checksum of every file."""
    return sha256_file(Path(checkpoint) / "manifest.json")[:16]


def plan_evaluate(checkpoint: str, tokenize_version: str, config: EvalConfig) -> str:
    return stable_hash({"checkpoint": checkpoint_identity(checkpoint), "tokenize": tokenize_version,
                        "eval": config.model_dump(), "code": code_version(EVAL_CODE)})


def plan_sample(checkpoint: str, config: SampleConfig) -> str:
    return stable_hash({"checkpoint": checkpoint_identity(checkpoint), "sample": config.model_dump(),
                        "code": code_version(SAMPLE_CODE)})


@task(name="evaluate", cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def evaluate(store: ArtifactStore, version: str, checkpoint: str, tokenize_ref: dict[str, Any],
             config: EvalConfig, ui_name: str) -> dict[str, Any]:
    """Score the checkpoint on the val shards; write eval.json; publish a table to the UI."""

    def build(folder: Path) -> dict[str, Any]:
        metrics = evaluate_checkpoint(checkpoint, tokenize_ref["path"], config)
        (folder / "eval.json").write_text(json.dumps(metrics, indent=2, default=str))
        return metrics

    manifest = store.publish("evaluate", version, build, code=code_version(EVAL_CODE),
                             inputs={"checkpoint": checkpoint, "tokenize": tokenize_ref["version"]},
                             config=config.model_dump())
    rows = [{"metric": k, "value": v} for k, v in manifest.metrics.items() if isinstance(v, (int, float))]
    create_table_artifact(key=ui_key(ui_name, "evaluation"), table=rows,
                          description=f"evaluation of {Path(checkpoint).name}")
    print("evaluate: " + ", ".join(f"{r['metric']} {r['value']:.4g}" for r in rows))
    return store.ref("evaluate", version).to_dict() | {"metrics": manifest.metrics}


@task(name="sample", cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def sample(store: ArtifactStore, version: str, checkpoint: str, config: SampleConfig, ui_name: str) -> dict[str, Any]:
    """Generate completions from a fixed seed; write samples.txt/.md; publish markdown to the UI."""

    def build(folder: Path) -> dict[str, Any]:
        texts = sample_checkpoint(checkpoint, config)
        (folder / "samples.txt").write_text("\n\n-----\n\n".join(texts) + "\n")
        (folder / "samples.md").write_text(samples_markdown(checkpoint, config, texts))
        return {"samples": len(texts)}

    store.publish("sample", version, build, code=code_version(SAMPLE_CODE),
                  inputs={"checkpoint": checkpoint}, config=config.model_dump())
    markdown = (store.path("sample", version) / "samples.md").read_text()
    create_markdown_artifact(key=ui_key(ui_name, "samples"), markdown=markdown,
                             description=f"completions of {config.prompt!r} from {Path(checkpoint).name}")
    print(markdown)
    return store.ref("sample", version).to_dict()


def samples_markdown(checkpoint: str, config: SampleConfig, texts: list[str]) -> str:
    header = (f"# Samples from `{Path(checkpoint).name}`\n\nPrompt `{config.prompt}`, temperature "
              f"{config.temperature}, top-k {config.top_k}, seed {config.seed}, {config.max_new_tokens} new tokens.\n")
    bodies = [f"## Sample {i + 1}\n\n```text\n{text}\n```\n" for i, text in enumerate(texts)]
    return "\n".join([header, *bodies])
