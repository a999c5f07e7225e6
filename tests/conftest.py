"""Shared fixtures: a real Prefect server on a free loopback port, and paths to real data."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
FINEWEB_SAMPLE = SHARED_DATA / "fineweb-sample" / "fineweb_sample_2800.parquet"
HELLASWAG_VAL = SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl"
FINEWEB_REPO = "HuggingFaceFW/fineweb"
FINEWEB_FOLDER = "data/CC-MAIN-2013-20"
FINEWEB_FILES = ("000_00000.parquet", "000_00001.parquet")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` (SQLite) with its own PREFECT_HOME, stopped at the end."""
    from flows.stack import down, stack_from_env, start_server

    home = tmp_path_factory.mktemp("prefect-home")
    stack = stack_from_env(folder=home / "stack", port=free_port(), extra_env={"PREFECT_HOME": str(home)})
    start_server(stack)
    yield stack
    down(stack)


@pytest.fixture(scope="session")
def fineweb_parquet(tmp_path_factory) -> bytes:
    """A FineWeb-shaped parquet with several row groups: the real FineWeb sample of ../shared
    when it is there, else the demo corpus (real English text) written for the test."""
    if FINEWEB_SAMPLE.exists():
        return FINEWEB_SAMPLE.read_bytes()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.demo_corpus import demo_documents

    rows = [{**row, "id": f"{row['id']}-{copy}"} for copy in range(3) for row in demo_documents()]  # ~4.5 MB of text
    path = tmp_path_factory.mktemp("fineweb-like") / "fineweb_like.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100, compression="none")
    return path.read_bytes()


@pytest.fixture(scope="session")
def hellaswag_file(tmp_path_factory) -> Path:
    """A HellaSwag validation jsonl of 200 items: the real ones of ../shared when it is there, else
    items made from the demo corpus (the true continuation of a sentence against three others)."""
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    if HELLASWAG_VAL.exists():
        with open(HELLASWAG_VAL) as source:
            path.write_text("".join(line for _, line in zip(range(200), source)))
        return path
    import random

    from storage.demo_corpus import demo_documents

    sentences = [s.strip() for row in demo_documents() for s in row["text"].split(". ") if 40 < len(s.strip()) < 200]
    rng = random.Random(0)
    items = []
    for i in range(200):
        endings = [sentences[2 * i + 1]] + rng.sample(sentences, 3)
        order = rng.sample(range(4), 4)
        items.append({"ind": i, "ctx": sentences[2 * i], "endings": [endings[j] for j in order], "label": order.index(0)})
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="session")
def loopback_hub(fineweb_parquet):
    """A loopback Hugging Face Hub (tests/hub_server.py) holding FineWeb's CC-MAIN-2013-20 files
    000_00000 and 000_00001, for the whole session."""
    from tests.hub_server import LoopbackHub

    with LoopbackHub() as hub:
        for name in FINEWEB_FILES:
            hub.add_file("datasets", FINEWEB_REPO, f"{FINEWEB_FOLDER}/{name}", fineweb_parquet)
        yield hub


def run_pipeline_cli(args: list[str], env: dict[str, str], timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run `python -m flows.fineweb_pretrain ARGS`; return the process and its JSON summary (last line)."""
    process = subprocess.run([sys.executable, "-m", "flows.fineweb_pretrain", *args], cwd=PROJECT_ROOT,
                             env=env, capture_output=True, text=True, timeout=timeout)
    lines = process.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if process.returncode == 0 and lines else None
    return process, summary
