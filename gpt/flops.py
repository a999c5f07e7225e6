"""FLOPs per token and model FLOPs utilization (MFU).

MFU = achieved FLOP/s (FLOPs per token × tokens per second) / the device's peak. The
FLOPs per token are `ModelConfig.flops_per_token()` (6N + 12·L·d·T, PaLM appendix B).

The peak is the dense bf16 tensor-core number with fp32 accumulation, which is what
mixed-precision training uses; GeForce cards run fp32 accumulation at half the rate
they advertise for fp16 accumulation, and "with sparsity" numbers are twice the dense
ones. nanoGPT's estimate_mfu always divides by the A100's 312 TFLOP/s whatever the GPU,
so its MFU on other cards is not comparable to the numbers reported here.
"""

from __future__ import annotations

import re

import torch

# Dense bf16 (fp16 where the card has no bf16: V100, T4) tensor TFLOP/s, fp32 accumulate,
# from NVIDIA's datasheets and architecture whitepapers (GeForce numbers are SM count ×
# boost clock × 512 FLOPs/clock). Looked up in torch.cuda.get_device_name() as whole words,
# case-insensitive, longest fragment first: "NVIDIA A100-SXM4" is an a100, not an a10.
PEAK_TFLOPS: dict[str, float] = {
    "b200": 2250.0,
    "h200": 989.0,
    "gh200": 989.0,
    "h100": 989.0,  # SXM; torch names it "NVIDIA H100 80GB HBM3"
    "h100 pcie": 756.0,
    "h100 nvl": 835.0,
    "h800": 989.0,
    "a100": 312.0,
    "a800": 312.0,
    "a40": 149.7,
    "a30": 165.0,
    "a10": 125.0,
    "a10g": 70.0,  # approximate: NVIDIA publishes no datasheet for this AWS part
    "l40s": 362.0,
    "l40": 181.0,
    "l4": 121.0,
    "rtx a6000": 154.8,
    "rtx 6000 ada": 364.2,
    "rtx 4090": 165.2,
    "rtx 4080 super": 104.4,
    "rtx 4080": 97.5,
    "rtx 4070 ti super": 88.2,
    "rtx 4070 ti": 80.2,
    "rtx 4070 super": 70.9,
    "rtx 4070": 58.3,
    "rtx 4060 ti": 44.1,
    "rtx 3090 ti": 80.0,
    "rtx 3090": 71.0,
    "rtx 3080 ti": 68.2,
    "rtx 3080": 59.5,
    "v100": 125.0,
    "t4": 65.0,
}


def lookup_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s for a GPU name, or None when the name is not in the table."""
    name = device_name.lower()
    matches = [f for f in PEAK_TFLOPS if re.search(rf"(?<![a-z0-9]){re.escape(f)}(?![a-z0-9])", name)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def peak_flops(device: torch.device | str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override (train.peak_tflops) if given, else the
    table for CUDA GPUs; None on CPU or for an unknown GPU (MFU is then not reported)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    tflops = lookup_peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops is not None else None


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None) -> float | None:
    """Model FLOPs utilization as a fraction (0.4 = 40%), or None without a known peak.

    For a multi-GPU job pass the job's tokens/s and the peak of all its GPUs together.
    """
    if not peak:
        return None
    return flops_per_token * tokens_per_sec / peak
