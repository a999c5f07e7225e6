"""Per-file tokenizing through Prefect (`make bench`): what one task run per file costs against
calling the tokenizer directly, and tokens/s on a Dask LocalCluster of 1 and 2 worker
processes against the single-process stage.

Input: six parquet files cut from the FineWeb sample (../shared), else from the demo corpus.
Every round tokenizes into a fresh store (no cache hit). Each file gets one encoder process
(`tokenize.num_workers=1`), so the runner's workers are the only parallelism.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import DataConfig, RunnerConfig, TokenizeConfig
from flows.dataset import task_runner, tokenize_dataset
from gpt.tokenizer import tokenize_parquet
from storage.artifacts import ArtifactStore

FILES = 6
CONFIG = TokenizeConfig(num_workers=1, shard_tokens=1 << 22)
DATA = DataConfig(source="unused")


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


def fresh_download(files: list[Path], root: Path) -> tuple[ArtifactStore, dict]:
    """A new store holding a download artifact of `files` (what the download stage would publish)."""
    store = ArtifactStore(root / uuid.uuid4().hex[:8])

    def build(folder: Path) -> dict:
        (folder / "data").mkdir()
        for file in files:
            shutil.copyfile(file, folder / "data" / file.name)
        return {}

    store.publish("download", "bench", build)
    return store, store.ref("download", "bench").to_dict()


def run_stage(files: list[Path], root: Path, runner: RunnerConfig) -> dict:
    store, download_ref = fresh_download(files, root)
    started = time.perf_counter()
    ref, _ = tokenize_dataset.with_options(task_runner=task_runner(runner))(
        store=store, version=uuid.uuid4().hex[:16], download_ref=download_ref, data=DATA, config=CONFIG, ui_name="bench")
    seconds = time.perf_counter() - started
    manifest = store.manifest("tokenize", Path(ref["path"]).name)
    return {"seconds": seconds, "tokens": sum(manifest.metrics["tokens"].values())}


def direct_seconds(files: list[Path], root: Path) -> float:
    """The same files through tokenize_parquet one by one, no Prefect: the work itself."""
    started = time.perf_counter()
    for file in files:
        out = root / uuid.uuid4().hex[:8]
        tokenize_parquet([file], out, CONFIG, file_keys=[file.name], require_both_splits=False)
    return time.perf_counter() - started


def test_per_file_overhead_of_one_task_run_per_file(benchmark, files, api, tmp_path):
    direct = [direct_seconds(files, tmp_path) for _ in range(3)]
    result = benchmark.pedantic(run_stage, args=(files, tmp_path, RunnerConfig(kind="local", workers=1)), rounds=3)
    through_prefect = benchmark.stats.stats.median
    benchmark.extra_info.update(files=FILES, tokens=result["tokens"], direct_seconds_median=sorted(direct)[1],
                                overhead_ms_per_file=round(1000 * (through_prefect - sorted(direct)[1]) / FILES, 1))


@pytest.mark.parametrize("workers", [1, 2])
def test_dask_local_cluster_tokens_per_second(benchmark, files, api, tmp_path, workers):
    direct = direct_seconds(files, tmp_path)
    result = benchmark.pedantic(run_stage, args=(files, tmp_path, RunnerConfig(kind="dask", workers=workers)), rounds=2)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(workers=workers, tokens=result["tokens"], tokens_per_second=round(result["tokens"] / seconds),
                                single_process_tokens_per_second=round(result["tokens"] / direct),
                                note="includes starting the LocalCluster")
