"""The per-file work of a dataset, fanned out on the configured Prefect task runner.

`tokenize_dataset` is a subflow of fineweb-pretrain: one `tokenize-file` task run per parquet
file (each cached by the file's content, name, config and code, so a rerun after a crash
or a cancel redoes only unfinished files, and a file added to a glob is the only one
tokenized), then one `tokenize` task that assembles them into the dataset the trainer reads.
Which runner runs the files is `runner.kind` — speed only, never the bytes:

- `local`: threads of the flow's process (`runner.workers`, default one per core);
- `dask`: prefect-dask's DaskTaskRunner — a LocalCluster of `runner.workers` processes, or
  the existing scheduler at `runner.address`;
- `ray`: prefect-ray's RayTaskRunner on the cluster at `runner.address`.

Workers on other machines need the same code and virtualenv, and the store root on a
filesystem they all mount at the same path; a worker that cannot see it fails in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from configs import DataConfig, RunnerConfig, TokenizeConfig
from configs.errors import UserError
from storage.artifacts import ArtifactStore
from storage.versions import plan_tokenize_files, stage_code_version
from tasks.common import ProgressArtifact, run_cached_stage
from tasks.tokenize import FILE_STAGE, tokenize, tokenize_file


def task_runner(config: RunnerConfig) -> TaskRunner:
    """The Prefect task runner `runner` names (its package is an optional extra)."""
    workers = config.workers or os.cpu_count() or 1
    if config.kind == "local":
        return ThreadPoolTaskRunner(max_workers=workers)
    if config.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserError("runner.kind dask needs prefect-dask: pip install -e '.[dask]'") from None
        if config.address:
            return DaskTaskRunner(address=config.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise UserError("runner.kind ray needs prefect-ray: pip install -e '.[ray]'") from None
    return RayTaskRunner(address=config.address)


@flow(name="tokenize-dataset", flow_run_name="tokenize {ui_name}")
def tokenize_dataset(store: ArtifactStore, version: str, download_ref: dict[str, Any], data: DataConfig,
                     config: TokenizeConfig, ui_name: str) -> tuple[dict[str, Any], bool]:
    """Tokenize every file of the download (one task run each), then assemble the dataset;
    returns its ref and whether it was a cache hit (the calling flow says so in its log)."""
    files = store.manifest("download", download_ref["version"]).files
    parquet = sorted((entry for entry in files if entry.path.endswith(".parquet")), key=lambda entry: entry.path)
    progress = ProgressArtifact(f"tokenizing {len(parquet)} parquet file(s)")
    keys = [Path(entry.path).name for entry in parquet]
    versions = plan_tokenize_files([(key, entry.sha256) for key, entry in zip(keys, parquet)], data, config)
    code = stage_code_version("tokenize")
    submitted = []
    for key, entry, file_version in zip(keys, parquet, versions):
        fresh = not store.exists(FILE_STAGE, file_version)  # a deleted artifact is rebuilt, not trusted from the cache
        future = tokenize_file.with_options(refresh_cache=fresh).submit(
            store=store, version=file_version, file=str(Path(download_ref["path"]) / entry.path), file_key=key,
            data=data, config=config, code=code)
        submitted.append((key, future))
    file_refs = []
    for done, (key, future) in enumerate(submitted, start=1):
        file_refs.append((key, future.result()))
        progress.update(done, len(submitted))
    return run_cached_stage(tokenize, store, version, quiet=True, download_ref=download_ref, file_refs=file_refs,
                            config=config, ui_name=ui_name)
