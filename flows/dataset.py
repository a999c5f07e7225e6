"""The dataset of a run — download, profile, tokenize — one task run per parquet file, fanned
out on the configured Prefect task runner.

`prepare_dataset` is a subflow of fineweb-pretrain. Each stage's per-file work is its own
cached task run (`download-file`, `profile-file`, `tokenize-file`: cached by the file, the
config slice that shapes it and the code, so a rerun after a crash or a cancel redoes only
unfinished files, and a file added to a glob is the only one fetched and tokenized), then
one task assembles the stage's artifact from them: the download (files hard-linked), the
profile of the whole download (duplicates counted across files), the dataset the trainer
reads (shards hard-linked, in file order). A stage whose assembled artifact exists is one
cache hit, its files not visited. Which runner runs the files is `runner.kind` — speed only,
never the bytes:

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
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from configs import DataConfig, ProfileConfig, RunnerConfig, TokenizeConfig
from configs.errors import UserError
from storage.artifacts import ArtifactStore
from storage.versions import (
    plan_download,
    plan_download_file,
    plan_profile,
    plan_profile_files,
    plan_tokenize,
    plan_tokenize_files,
    stage_code_version,
)
from tasks.common import ProgressArtifact, run_cached_stage, submit_cached_stage
from tasks.download import download, download_file
from tasks.profile import profile, profile_file
from tasks.tokenize import tokenize, tokenize_file

StageResult = tuple[dict[str, Any], bool]  # the stage artifact's ref, and whether it was a cache hit


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


@flow(name="dataset", flow_run_name="dataset {ui_name}", log_prints=True)
def prepare_dataset(store: ArtifactStore, data: DataConfig, profile_config: ProfileConfig, tokenize_config: TokenizeConfig,
                    ui_name: str, until: str | None = None) -> dict[str, StageResult]:
    """download → profile → tokenize, each file a task run; stops after the stage `until`
    names. Returns {stage: (ref, cache hit)} for the stages run."""
    store.ensure_writable()  # created here, so a worker that cannot see it fails in one line
    stages = {"download": download_dataset(store, data, ui_name)}
    if until == "download":
        return stages
    raw = stages["download"][0]
    parquet = sorted((entry for entry in store.manifest("download", raw["version"]).files if entry.path.endswith(".parquet")),
                     key=lambda entry: entry.path)
    files = [(Path(entry.path).name, entry.sha256) for entry in parquet]
    profile_version = plan_profile(raw["version"], data, profile_config)
    tokenize_version = plan_tokenize(raw["version"], data, tokenize_config)

    def per_file(stage: str, file_task: Any, versions: list[str], config: Any) -> list[tuple[str, PrefectFuture]]:
        code = stage_code_version(stage)  # read once for all the files
        return [(key, submit_cached_stage(file_task, store, version, file=str(Path(raw["path"]) / "data" / key), file_key=key,
                                          data=data, config=config, code=code))
                for (key, _), version in zip(files, versions)]

    # Both stages' files go to the runner before either is awaited, so they share its workers.
    profiling = [] if store.exists("profile", profile_version) else per_file(
        "profile", profile_file, plan_profile_files(files, data), profile_config)
    tokenizing = [] if until == "profile" or store.exists("tokenize", tokenize_version) else per_file(
        "tokenize", tokenize_file, plan_tokenize_files(files, data, tokenize_config), tokenize_config)
    stages["profile"] = run_cached_stage(profile, store, profile_version, download_ref=raw,
                                         file_refs=collect(profiling, f"profiling {len(files)} parquet file(s)"),
                                         data=data, config=profile_config, ui_name=ui_name)
    if until == "profile":
        return stages
    stages["tokenize"] = run_cached_stage(tokenize, store, tokenize_version, download_ref=raw,
                                          file_refs=collect(tokenizing, f"tokenizing {len(files)} parquet file(s)"),
                                          config=tokenize_config, ui_name=ui_name)
    return stages


def download_dataset(store: ArtifactStore, data: DataConfig, ui_name: str) -> StageResult:
    """Every source copied by its own task run (all at once; one after another with
    `data.max_rows`, as each file's share of the rows is what the files before it left),
    then assembled into the download artifact."""
    planned = plan_download(data, store.root)
    refs: list[dict[str, Any]] = []
    if not store.exists("download", planned.version):
        code = stage_code_version("download")
        sources = list(zip(planned.urls, planned.fingerprints, planned.names))

        def submit(url: str, fingerprint: dict[str, Any], name: str, max_rows: int | None) -> PrefectFuture:
            version = plan_download_file(fingerprint, name, max_rows, code)
            return submit_cached_stage(download_file, store, version, url=url, fingerprint=fingerprint, name=name,
                                       max_rows=max_rows, code=code)

        if data.max_rows is None:
            submitted = [(name, submit(url, fingerprint, name, None)) for url, fingerprint, name in sources]
            refs = [ref for _, ref in collect(submitted, f"downloading {len(sources)} file(s)")]
        else:
            progress = ProgressArtifact(f"downloading the first {data.max_rows:,} rows of {len(sources)} file(s)")
            remaining = data.max_rows
            for url, fingerprint, name in sources:
                if remaining <= 0:
                    break
                refs.append(submit(url, fingerprint, name, remaining).result())
                remaining -= refs[-1]["entry"]["rows"]
                progress.update(data.max_rows - max(remaining, 0), data.max_rows)
    return run_cached_stage(download, store, planned.version, file_refs=refs, fingerprints=planned.fingerprints,
                            data=data, ui_name=ui_name)


def collect(futures: list[tuple[str, PrefectFuture]], description: str) -> list[tuple[str, dict[str, Any]]]:
    """(file key, result) of each future, in the order given; a progress artifact counts files done."""
    if not futures:
        return []
    progress = ProgressArtifact(description)
    results = []
    for done, (key, future) in enumerate(futures, start=1):
        results.append((key, future.result()))
        progress.update(done, len(futures))
    return results
