"""benchmarks/gpu_train.py runs end to end on CPU (the smoke test of the GPU benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_script_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks.gpu_train", "--device", "cpu", "--presets", "demo",
               "--steps", "2", "--warmup-steps", "1", "--no-compile", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "demo: 3.3M params, 2,048 tokens/iter" in process.stdout

    report = json.loads(out.read_text())
    assert report["torch"] == __import__("torch").__version__
    [result] = report["results"]
    from gpt.runtime import resolve_dtype

    auto = str(resolve_dtype("auto", __import__("torch").device("cpu"))).removeprefix("torch.")  # bfloat16 on CPUs with AMX/AVX512-BF16
    assert result["preset"] == "demo" and result["device"] == "cpu" and result["dtype"] == auto
    assert result["steps"] == 2 and result["warmup_steps"] == 1 and result["compile"] is False
    assert result["params"] == 3_318_080 and result["tokens_per_iter"] == 8 * 128 * 2
    assert result["mfu"] is None and result["peak_tflops"] is None  # no peak known for a CPU
    assert result["tokens_per_sec"] > 0 and result["ms_per_iter"] > 0
    assert result["tokens_per_sec"] == pytest.approx(result["tokens_per_iter"] * 1000 / result["ms_per_iter"])
    assert result["peak_memory_bytes"] is None and result["max_rss_bytes"] > 0
    assert 0 < result["final_loss"] < 12  # random tokens: about ln(50257) = 10.8
