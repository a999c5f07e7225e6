"""Tokenize stage: GPT-2 tokens in llm.c `.bin` shards, train/val split by document.

Two tasks: `tokenize_file` tokenizes one parquet file into its own artifact (`tokenize-file`,
cached by the file's sha256 and name, the config and the code), one task run per file so a
rerun redoes only unfinished files; `tokenize` assembles them, in file order, into the dataset
the trainer reads. flows/dataset.py runs the first on the configured task runner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from configs import DataConfig, TokenizeConfig
from gpt.tokenizer import assemble_dataset, tokenize_parquet
from storage.artifacts import ArtifactStore
from storage.markdown import markdown_table
from storage.profile import histogram_svg
from storage.versions import stage_code_version
from tasks.charts import markdown_image
from tasks.common import retry_if_transient, ui_key, version_cache_key

STAGE = "tokenize"
FILE_STAGE = "tokenize-file"
REPORT = "tokenize.json"


# One Prefect retry for a transient failure (a crashed encoder process: TokenizerCrashed); a
# failed attempt publishes nothing, so the retry starts clean.
@task(name=FILE_STAGE, task_run_name="tokenize {file_key}", cache_key_fn=version_cache_key, persist_result=True,
      result_serializer="json", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def tokenize_file(store: ArtifactStore, version: str, file: str, file_key: str, data: DataConfig,
                  config: TokenizeConfig, code: str) -> dict[str, Any]:
    """One parquet file's shards, doc lengths and report, as its own artifact; `code` is the
    stage's code version, read once by the caller for all the files."""
    store.check_reachable(file)  # a worker on another machine must see the same store

    def build(folder: Path) -> dict[str, Any]:
        report = tokenize_parquet([Path(file)], folder, config, text_column=data.text_column, file_keys=[file_key],
                                  require_both_splits=False)
        (folder / REPORT).write_text(json.dumps(report, indent=2, default=str))
        return report

    store.publish(FILE_STAGE, version, build, inputs={"file": file_key}, config=config.model_dump(), code=code)
    return store.ref(FILE_STAGE, version).to_dict()


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def tokenize(store: ArtifactStore, version: str, download_ref: dict[str, Any], file_refs: list[tuple[str, dict[str, Any]]],
             config: TokenizeConfig, ui_name: str) -> dict[str, Any]:
    """The dataset of the download: every file's shards (`file_refs`: (file key, its
    tokenize-file ref) in file order) hard-linked into one folder with one tokenize.json;
    publish the shard table to the UI."""

    def build(folder: Path) -> dict[str, Any]:
        parts = [(key, Path(ref["path"]), json.loads((Path(ref["path"]) / REPORT).read_text())) for key, ref in file_refs]
        report = assemble_dataset(parts, folder)
        (folder / REPORT).write_text(json.dumps(report, indent=2, default=str))
        return report

    inputs = {"download": download_ref["version"], "files": {key: ref["version"] for key, ref in file_refs}}
    manifest = store.publish(STAGE, version, build, inputs=inputs, config=config.model_dump(), code=stage_code_version(STAGE))
    report = manifest.metrics
    shards = [{k: shard.get(k) for k in ("name", "split", "tokens", "documents", "file")} for shard in report["shards"]]
    totals = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
    totals["engines"] = ", ".join(report.get("engines", []))  # which BPE engine encoded the shards (tiktoken referees it)
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
