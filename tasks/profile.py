"""Profile stage: DuckDB statistics of the downloaded parquet, saved and shown in the UI.

Two tasks: `profile_file` reads one parquet file once into its document table (`profile-file`,
cached by the file's sha256 and name, the text column and the code), one task run per file;
`profile` draws the statistics of the whole download from all the tables, so exact duplicate
texts are counted across files, and publishes the report. flows/dataset.py runs the first on
the configured task runner.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from configs import DataConfig, ProfileConfig
from storage.artifacts import ArtifactStore
from storage.markdown import human_bytes
from storage.profile import document_table, histogram_svg, profile_documents, profile_markdown
from storage.versions import stage_code_version
from tasks.charts import markdown_image
from tasks.common import ui_key, version_cache_key

STAGE = "profile"
FILE_STAGE = "profile-file"
DOCUMENTS = "documents.parquet"


@task(name=FILE_STAGE, task_run_name="profile {file_key}", cache_key_fn=version_cache_key, persist_result=True,
      result_serializer="json")
def profile_file(store: ArtifactStore, version: str, file: str, file_key: str, data: DataConfig,
                 config: ProfileConfig, code: str) -> dict[str, Any]:
    """One parquet file's document table (one small row per document, no text) as its own
    artifact; `code` is the stage's code version, read once by the caller for all the files."""
    store.check_reachable(file)  # a worker on another machine must see the same store

    def build(folder: Path) -> dict[str, Any]:
        with _spill_folder(folder) as spill:
            rows = document_table(file, folder / DOCUMENTS, data.text_column, config.memory_limit, spill)
        return {"rows": rows}

    store.publish(FILE_STAGE, version, build, inputs={"file": file_key}, config={"text_column": data.text_column}, code=code)
    return store.ref(FILE_STAGE, version).to_dict()


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def profile(store: ArtifactStore, version: str, download_ref: dict[str, Any], file_refs: list[tuple[str, dict[str, Any]]],
            data: DataConfig, config: ProfileConfig, ui_name: str) -> dict[str, Any]:
    """profile.json, profile.md and histogram SVGs of the whole download, from its files'
    document tables (`file_refs`: (file key, profile-file ref) in file order); publish
    markdown and tables to the UI."""
    files = [str(Path(download_ref["path"]) / "data" / key) for key, _ in file_refs]

    def build(folder: Path) -> dict[str, Any]:
        with _spill_folder(folder) as spill:
            report = profile_documents([Path(ref["path"]) / DOCUMENTS for _, ref in file_refs], files,
                                       text_column=data.text_column, short_doc_chars=config.short_doc_chars,
                                       top_domains=config.top_domains, memory_limit=config.memory_limit,
                                       spill_directory=spill)
        (folder / "profile.json").write_text(json.dumps(report, indent=2, default=str))
        (folder / "profile.md").write_text(profile_markdown(report))
        for name, histogram in report.get("histograms", {}).items():
            (folder / f"{name}_histogram.svg").write_text(histogram_svg(histogram, title=name.replace("_", " ")))
        return {key: report[key] for key in ("files", "rows", "bytes") if key in report}

    inputs = {"download": download_ref["version"], "files": {key: ref["version"] for key, ref in file_refs}}
    manifest = store.publish(STAGE, version, build, inputs=inputs, config=config.model_dump(), code=stage_code_version(STAGE))
    folder = store.path(STAGE, version)
    report = json.loads((folder / "profile.json").read_text())
    pictures = [markdown_image(svg.read_text(), svg.stem) for svg in sorted(folder.glob("*_histogram.svg"))]
    create_markdown_artifact(key=ui_key(ui_name, "data-profile"),
                             markdown="\n\n".join([(folder / "profile.md").read_text(), *pictures]),
                             description="DuckDB profile of the downloaded parquet")
    summary = [{"metric": k, "value": v} for k, v in report.items() if isinstance(v, (int, float, str))]
    create_table_artifact(key=ui_key(ui_name, "data-profile-summary"), table=summary,
                          description="profile figures, one per row")
    if report.get("top_domains"):
        create_table_artifact(key=ui_key(ui_name, "data-profile-domains"), table=report["top_domains"],
                              description="most frequent URL domains")
    create_table_artifact(key=ui_key(ui_name, "data-profile-files"),
                          table=[{**entry, "file": Path(entry["file"]).name, "bytes": human_bytes(entry["bytes"])}
                                 for entry in report["per_file"]],
                          description="documents, short texts and duplicates within each file")
    print(f"profile {version}: {manifest.metrics.get('rows')} rows in {manifest.metrics.get('files')} file(s)")
    return store.ref(STAGE, version).to_dict()


def _spill_folder(folder: Path) -> tempfile.TemporaryDirectory:
    """Where DuckDB may spill: beside, not inside, the artifact being built."""
    return tempfile.TemporaryDirectory(dir=folder.parent, prefix=".duckdb-spill-")
