"""FLOPs per token, GPU peak lookup and MFU."""

from __future__ import annotations

import pytest

from configs import load_config
from gpt.flops import lookup_peak_tflops, mfu, peak_flops


@pytest.mark.parametrize(
    ("device_name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),  # not the A10
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 4070 Ti", 80.2),
        ("NVIDIA GeForce RTX 4070", 58.3),
        ("NVIDIA GeForce RTX 3090", 71.0),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("Tesla T4", 65.0),
        ("NVIDIA RTX A4000", None),  # unknown: no MFU rather than a wrong one
    ],
)
def test_peak_lookup_by_device_name(device_name, tflops):
    assert lookup_peak_tflops(device_name) == tflops


def test_no_peak_on_cpu_unless_overridden():
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=100.0) == 100e12
    assert mfu(1e9, 1e3, None) is None


def test_mfu_of_the_seed_run():
    model = load_config("fineweb-40m").model
    assert model.flops_per_token() == 6 * 40_560_000 + 12 * 12 * 384 * 1024  # 6N + 12·L·d·T
    # the seed run's 524,288 tokens per 3.9 s on an RTX 4070 (58.3 TFLOP/s)
    assert mfu(299_983_104, 524_288 / 3.9, 58.3e12) == pytest.approx(0.6917, abs=1e-4)
