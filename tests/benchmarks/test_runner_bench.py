"""The dataset subflow's per-file task runs (`make bench`): what one task run per file and stage
costs against doing the same work directly, and tokens/s on a Dask cluster of 1 and 2
worker processes against the single-process work.

Input: six parquet files cut from the FineWeb sample (../shared), else from the demo corpus.
Every round runs download → profile → tokenize into a fresh store (no cache hit). Each file
gets one encoder process (`tokenize.num_workers=1`), so the runner's workers are the only
parallelism. The Dask cluster is started once, before the rounds, and reached by its
address (`runner.address`), as a cluster that is already running would be: what is measured
is the work and the task runs, not starting a cluster.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import DataConfig, ProfileConfig, RunnerConfig, TokenizeConfig
from flows.dataset import prepare_dataset, task_runner
from gpt.tokenizer import tokenize_parquet
from storage.artifacts import ArtifactStore
from storage.profile import document_table, profile_documents

FILES = 6
TOKENIZE = TokenizeConfig(num_workers=1, shard_tokens=1 << 22)
PROFILE = ProfileConfig()


@pytest.fixture(scope="module")
def files(fineweb_parquet, tmp_path_factory) -> list[Path]:
    table = pq.read_table(pa.BufferReader(fineweb_parquet))
    folder, step = tmp_path_factory.mktemp("runner-bench"), table.num_rows // FILES
    for index in range(FILES):
        pq.write_table(table.slice(index * step, step), folder / f"000_{index:05d}.parquet", row_group_size=100)
    return sorted(folder.glob("*.parquet"))


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        yield


def run_dataset(files: list[Path], root: Path, runner: RunnerConfig) -> dict:
    """The dataset subflow over `files` into a fresh store; its seconds and the tokens it wrote."""
    store = ArtifactStore(root / uuid.uuid4().hex[:8])
    data = DataConfig(source=f"{files[0].parent}/*.parquet")
    started = time.perf_counter()
    stages = prepare_dataset.with_options(task_runner=task_runner(runner))(
        store=store, data=data, profile_config=PROFILE, tokenize_config=TOKENIZE, ui_name="bench")
    seconds = time.perf_counter() - started
    tokens = store.manifest("tokenize", stages["tokenize"][0]["version"]).metrics["tokens"]
    return {"seconds": seconds, "tokens": sum(tokens.values())}


def direct_seconds(files: list[Path], root: Path) -> float:
    """The same work with no Prefect, one file after another: copy, document table, tokens;
    then the profile of all the tables."""
    started = time.perf_counter()
    folder = root / uuid.uuid4().hex[:8]
    folder.mkdir()
    tables = []
    for file in files:
        copy = Path(shutil.copyfile(file, folder / file.name))
        tables.append(folder / f"{file.stem}.documents.parquet")
        document_table(copy, tables[-1])
        tokenize_parquet([copy], folder / f"{file.stem}.tokens", TOKENIZE, file_keys=[file.name], require_both_splits=False)
    profile_documents(tables, files)
    return time.perf_counter() - started


def test_per_file_overhead_of_the_task_runs(benchmark, files, api, tmp_path):
    direct = sorted(direct_seconds(files, tmp_path) for _ in range(3))[1]
    result = benchmark.pedantic(run_dataset, args=(files, tmp_path, RunnerConfig(kind="local", workers=1)), rounds=3)
    through_prefect = benchmark.stats.stats.median
    benchmark.extra_info.update(files=FILES, tokens=result["tokens"], direct_seconds_median=round(direct, 3),
                                overhead_ms_per_file=round(1000 * (through_prefect - direct) / FILES, 1),
                                note="3 task runs per file (download, profile, tokenize) + 3 assemblies")


@pytest.fixture(scope="module", params=[1, 2], ids=lambda workers: f"{workers}-workers")
def dask_cluster(request):
    """A Dask cluster of N single-threaded worker processes, started once for its rounds."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=request.param, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield request.param, cluster.scheduler_address


def test_dask_cluster_tokens_per_second(benchmark, files, api, tmp_path, dask_cluster):
    workers, address = dask_cluster
    direct = direct_seconds(files, tmp_path)
    runner = RunnerConfig(kind="dask", address=address)
    result = benchmark.pedantic(run_dataset, args=(files, tmp_path, runner), rounds=2, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(workers=workers, tokens=result["tokens"], tokens_per_second=round(result["tokens"] / seconds),
                                single_process_tokens_per_second=round(result["tokens"] / direct),
                                note="download + profile + tokenize; the cluster was running before the rounds")
