"""Tokenize stage: GPT-2 tokens in llm.c `.bin` shards, train/val split by document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from configs import DataConfig, TokenizeConfig
from gpt.tokenizer import tokenize_parquet
from storage.artifacts import ArtifactStore
from storage.markdown import markdown_table
from storage.profile import histogram_svg
from storage.versions import stage_code_version
from tasks.charts import markdown_image
from tasks.common import ProgressArtifact, retry_if_transient, ui_key, version_cache_key
from tasks.download import parquet_files

STAGE = "tokenize"


# One Prefect retry for a transient failure (a crashed encoder process: TokenizerCrashed); a
# failed attempt publishes nothing, so the retry starts clean.
@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True,
      retries=1, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def tokenize(store: ArtifactStore, version: str, download_ref: dict[str, Any], data: DataConfig,
             config: TokenizeConfig, ui_name: str) -> dict[str, Any]:
    """Write the shards and tokenize.json; publish the shard table to the UI."""
    progress = ProgressArtifact("tokenizing documents")

    def build(folder: Path) -> dict[str, Any]:
        report = tokenize_parquet(parquet_files(download_ref), folder, config, text_column=data.text_column,
                                  progress=progress.update)
        (folder / "tokenize.json").write_text(json.dumps(report, indent=2, default=str))
        return report

    manifest = store.publish(STAGE, version, build, inputs={"download": download_ref["version"]},
                             config=config.model_dump(), code=stage_code_version(STAGE))
    report = manifest.metrics
    shards = [{k: shard.get(k) for k in ("name", "split", "tokens", "documents")} for shard in report["shards"]]
    totals = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
    create_table_artifact(key=ui_key(ui_name, "tokenize-shards"), table=shards, description="llm.c token shards")
    lengths = report["doc_tokens"]
    length_rows = [{k: lengths[k] for k in ("p1", "p50", "p99", "max", "mean")}]
    histogram = markdown_image(histogram_svg(lengths["histogram"], title="tokens per document"), "tokens per document")
    create_markdown_artifact(
        key=ui_key(ui_name, "tokenize-manifest"),
        markdown=f"# Tokenized `{version}`\n\n{markdown_table([totals])}\n\n## Shards\n\n{markdown_table(shards)}\n\n"
        f"## Tokens per document\n\n{markdown_table(length_rows)}\n\n{histogram}\n",
        description="GPT-2 tokenization summary: throughput, shards, per-document token lengths",
    )
    print(f"tokenize {version}: " + ", ".join(f"{s['name']} {s['tokens']:,} tokens" for s in shards))
    return store.ref(STAGE, version).to_dict()
