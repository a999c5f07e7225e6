"""Download stage: copy the source parquet files into the artifact store through fsspec."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from configs import DataConfig
from storage.artifacts import ArtifactStore
from storage.download import download_sources
from storage.markdown import human_bytes, markdown_table
from storage.versions import stage_code_version
from tasks.common import ProgressArtifact, ui_key, version_cache_key

STAGE = "download"


# No Prefect retries: storage.download retries each request with backoff and resumes partial files.
@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def download(store: ArtifactStore, version: str, urls: list[str], fingerprints: list[dict[str, Any]],
             data: DataConfig, ui_name: str) -> dict[str, Any]:
    """Copy every source into `<root>/download/<version>/data/`; partial files survive a crash."""
    incoming = incoming_folder(store, STAGE, version)
    progress = ProgressArtifact(f"download of {len(urls)} file(s)", unit="bytes" if data.max_rows is None else "rows")

    def build(folder: Path) -> dict[str, Any]:
        files = download_into(folder / "data", incoming, urls, fingerprints, max_rows=data.max_rows, progress=progress.update)
        return {"files": files, "bytes": sum(f["bytes"] for f in files), "rows": sum(f.get("rows") or 0 for f in files)}

    manifest = store.publish(STAGE, version, build, inputs={"sources": fingerprints},
                             config=data.model_dump(), code=stage_code_version(STAGE))  # redacted by publish
    rows = [{"file": f["file"], "url": f["url"], "size": human_bytes(f["bytes"]), "rows": f.get("rows"), "sha256": f["sha256"][:16]}
            for f in manifest.metrics["files"]]
    create_markdown_artifact(
        key=ui_key(ui_name, "download"),
        markdown=f"# Downloaded data `{version}`\n\n{markdown_table(rows)}\n\nFolder: `{store.path(STAGE, version)}`\n",
        description="source parquet files copied into the artifact store",
    )
    print(f"download {version}: {len(rows)} file(s), {human_bytes(manifest.metrics['bytes'])} in {store.path(STAGE, version)}")
    return store.ref(STAGE, version).to_dict()


def incoming_folder(store: ArtifactStore, stage: str, version: str) -> Path:
    """Where a stage's download lands before it is published: the same for every attempt, so a
    retry (or the next run) resumes the bytes an earlier one fetched."""
    return store.root / stage / f".incoming-{version}"


def download_into(folder: Path, incoming: Path, urls: list[str], fingerprints: list[dict[str, Any]],
                  **options: Any) -> list[dict[str, Any]]:
    """storage.download.download_sources into `incoming`, then the files moved into `folder`
    (a stage's artifact folder being built); the entries name them relative to its parent."""
    files = download_sources(urls, incoming, fingerprints=fingerprints, **options)
    folder.mkdir(parents=True)
    for entry in files:
        name = Path(entry["file"]).name
        os.replace(incoming / name, folder / name)
        entry["file"] = f"{folder.name}/{name}"
    shutil.rmtree(incoming, ignore_errors=True)
    return files


def parquet_files(download_ref: dict[str, Any]) -> list[Path]:
    """The parquet files inside a download artifact, in a stable order."""
    return sorted((Path(download_ref["path"]) / "data").glob("*.parquet"))
