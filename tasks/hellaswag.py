"""HellaSwag stage: the validation jsonl copied into the artifact store once, versioned like a download.

The source is `eval.hellaswag_path`: the canonical `hellaswag_val.jsonl` of rowanz/hellaswag
on GitHub in the real presets (fetched through fsspec, resumable, retried), or a local
path or file:// URL offline. The artifact records the file's size and sha256, and how
many items it holds; evaluation reads the copy, never the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from gpt.evaluate import read_hellaswag
from storage.artifacts import ArtifactStore
from storage.versions import stage_code_version
from tasks.common import version_cache_key
from tasks.download import download_into, incoming_folder

STAGE = "hellaswag"


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def hellaswag(store: ArtifactStore, version: str, url: str, fingerprint: dict[str, Any], ui_name: str) -> dict[str, Any]:
    """Copy the HellaSwag jsonl into `<root>/hellaswag/<version>/data/`; return its ref and the file."""

    def build(folder: Path) -> dict[str, Any]:
        [entry] = download_into(folder / "data", incoming_folder(store, STAGE, version), [url], [fingerprint],
                                check=check_hellaswag_file)
        return entry

    manifest = store.publish(STAGE, version, build, inputs={"source": fingerprint}, code=stage_code_version(STAGE))
    file = store.path(STAGE, version) / manifest.metrics["file"]
    print(f"hellaswag {version}: {manifest.metrics['items']:,} items, sha256 {manifest.metrics['sha256'][:16]}… ({file})")
    return store.ref(STAGE, version).to_dict() | {"file": str(file)}


def check_hellaswag_file(url: str, path: Path) -> dict[str, Any]:
    """A HellaSwag jsonl: one item a line, each with a context, four endings and a label."""
    return {"items": len(read_hellaswag(path, None, shown_as=url))}
