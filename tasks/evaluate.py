"""Evaluate stage: val loss, perplexity, bits per byte and HellaSwag of one checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from configs import EvalConfig
from gpt.checkpoint import read_state
from gpt.evaluate import evaluate as evaluate_checkpoint
from storage.artifacts import ArtifactStore
from storage.versions import stage_code_version
from tasks.common import ui_key, version_cache_key

STAGE = "evaluate"


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def evaluate(store: ArtifactStore, version: str, checkpoint: str, tokenize_ref: dict[str, Any],
             hellaswag_ref: dict[str, Any] | None, config: EvalConfig, ui_name: str) -> dict[str, Any]:
    """Score the checkpoint on the val shards (and the HellaSwag artifact's items); write eval.json;
    publish a table to the UI."""

    def build(folder: Path) -> dict[str, Any]:
        scoring = config.model_copy(update={"hellaswag_path": hellaswag_ref["file"] if hellaswag_ref else None})
        metrics = evaluate_checkpoint(checkpoint, tokenize_ref["path"], scoring)
        metrics["tokens_trained"] = read_state(checkpoint)["progress"]["tokens_trained"]
        (folder / "eval.json").write_text(json.dumps(metrics, indent=2, default=str))
        return metrics

    inputs = {"checkpoint": checkpoint, "tokenize": tokenize_ref["version"],
              "hellaswag": hellaswag_ref["version"] if hellaswag_ref else None}
    manifest = store.publish(STAGE, version, build, code=stage_code_version(STAGE), inputs=inputs, config=config.model_dump())
    rows = [{"metric": k, "value": v} for k, v in manifest.metrics.items() if isinstance(v, (int, float))]
    create_table_artifact(key=ui_key(ui_name, "evaluation"), table=rows,
                          description=f"evaluation of {Path(checkpoint).name}")
    print(f"evaluate {Path(checkpoint).name}: " + ", ".join(f"{r['metric']} {r['value']:.4g}" for r in rows))
    return store.ref(STAGE, version).to_dict() | {"metrics": manifest.metrics}
