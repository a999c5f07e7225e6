"""Download stage: copy the source parquet files into the artifact store through fsspec.

Two tasks: `download_file` copies one source into its own artifact (`download-file`, cached by
the source's fingerprint, its name, the rows it may hold and the code), one task run per file
so a rerun fetches only what is missing; `download` assembles the copies, hard-linked, into
the download artifact that profile and tokenize read. flows/dataset.py runs the first on the
configured task runner.
"""

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
FILE_STAGE = "download-file"


# No Prefect retries: storage.download retries each request with backoff and resumes partial files.
@task(name=FILE_STAGE, task_run_name="download {name}", cache_key_fn=version_cache_key, persist_result=True,
      result_serializer="json", log_prints=True)
def download_file(store: ArtifactStore, version: str, url: str, fingerprint: dict[str, Any], name: str,
                  max_rows: int | None, code: str) -> dict[str, Any]:
    """Copy one source into `<root>/download-file/<version>/data/<name>` (only its first row
    groups holding `max_rows` rows, when set); a partial copy survives a crash and is resumed.
    Returns the artifact's ref with the file's entry (url, bytes, rows, sha256)."""
    store.check_reachable()  # a worker on another machine must see the same store
    progress = ProgressArtifact(f"download of {name}", unit="bytes" if max_rows is None else "rows")

    def build(folder: Path) -> dict[str, Any]:
        [entry] = download_into(folder / "data", incoming_folder(store, FILE_STAGE, version), [url], [fingerprint],
                                names=[name], max_rows=max_rows, progress=progress.update)
        return entry

    manifest = store.publish(FILE_STAGE, version, build, inputs={"source": fingerprint}, config={"max_rows": max_rows},
                             code=code)  # redacted by publish
    return store.ref(FILE_STAGE, version).to_dict() | {"entry": manifest.metrics}


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def download(store: ArtifactStore, version: str, file_refs: list[dict[str, Any]], fingerprints: list[dict[str, Any]],
             data: DataConfig, ui_name: str) -> dict[str, Any]:
    """The download of every source: the per-file copies (`file_refs`, in source order)
    hard-linked into `<root>/download/<version>/data/`; publish the file table to the UI."""

    def build(folder: Path) -> dict[str, Any]:
        (folder / "data").mkdir()
        files = []
        for ref in file_refs:
            entry = dict(ref["entry"])
            os.link(Path(ref["path"]) / entry["file"], folder / entry["file"])  # same store, same bytes: no copy
            files.append(entry)
        return {"files": files, "bytes": sum(f["bytes"] for f in files), "rows": sum(f.get("rows") or 0 for f in files)}

    inputs = {"sources": fingerprints, "files": [ref["version"] for ref in file_refs]}
    manifest = store.publish(STAGE, version, build, inputs=inputs, config=data.model_dump(),
                             code=stage_code_version(STAGE))  # redacted by publish
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
                  names: list[str] | None = None, **options: Any) -> list[dict[str, Any]]:
    """storage.download.download_sources into `incoming`, then the files moved into `folder`
    (a stage's artifact folder being built) under `names` (default: their own); the entries
    name them relative to its parent."""
    files = download_sources(urls, incoming, fingerprints=fingerprints, **options)
    folder.mkdir(parents=True)
    for entry, name in zip(files, names or [Path(entry["file"]).name for entry in files]):
        os.replace(incoming / Path(entry["file"]).name, folder / name)
        entry["file"] = f"{folder.name}/{name}"
    shutil.rmtree(incoming, ignore_errors=True)
    return files

