"""Profile stage: one DuckDB pass over the downloaded parquet, saved and shown in the UI."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from configs import DataConfig, ProfileConfig
from storage.artifacts import ArtifactStore
from storage.profile import histogram_svg, profile_markdown, profile_parquet
from storage.versions import stage_code_version
from tasks.charts import markdown_image
from tasks.common import ui_key, version_cache_key
from tasks.download import parquet_files

STAGE = "profile"


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def profile(store: ArtifactStore, version: str, download_ref: dict[str, Any], data: DataConfig,
            config: ProfileConfig, ui_name: str) -> dict[str, Any]:
    """Write profile.json, profile.md and histogram SVGs; publish markdown + tables to the UI."""

    def build(folder: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".duckdb-spill-") as spill:  # beside, not inside, the artifact
            report = profile_parquet(parquet_files(download_ref), text_column=data.text_column,
                                     short_doc_chars=config.short_doc_chars, top_domains=config.top_domains,
                                     memory_limit=config.memory_limit, spill_directory=spill)
        (folder / "profile.json").write_text(json.dumps(report, indent=2, default=str))
        (folder / "profile.md").write_text(profile_markdown(report))
        for name, histogram in report.get("histograms", {}).items():
            (folder / f"{name}_histogram.svg").write_text(histogram_svg(histogram, title=name.replace("_", " ")))
        return {key: report[key] for key in ("files", "rows", "bytes") if key in report}

    manifest = store.publish(STAGE, version, build, inputs={"download": download_ref["version"]},
                             config=config.model_dump(), code=stage_code_version(STAGE))
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
    print(f"profile {version}: {manifest.metrics.get('rows')} rows in {manifest.metrics.get('files')} file(s)")
    return store.ref(STAGE, version).to_dict()
