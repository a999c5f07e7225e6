"""Where a process computes: its device, its precision, its place in a DDP job, and CPU memory tuning.

Training, evaluation, sampling and the GPU benchmark all start here: `setup_runtime` joins
a torchrun job when launched by one, picks the device (`auto`: CUDA when available) and
the autocast dtype (`auto`: bf16 on GPUs that have it and on CPUs with bf16 instructions,
AMX or AVX512-BF16), and applies the thread count.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from configs.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RuntimeSetupError(UserError):
    """A device or precision this machine does not have; the message is one line."""


@dataclass
class Runtime:
    """Where this process trains: its device, precision and place in a DDP job."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Runtime:
        """One process on `device` (evaluation, sampling): no DDP."""
        return cls(device=torch.device(device), dtype=dtype)

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for forward passes (a no-op in float32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return tuple(t.to(self.device) for t in batch)


def setup_runtime(device_setting: str, dtype_setting: str, num_threads: int | None) -> Runtime:
    """Join the DDP job when launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), pick
    the device and precision, and apply the thread count."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if num_threads:
        torch.set_num_threads(num_threads)
    device = resolve_device(device_setting, local_rank if world_size > 1 else None)
    owns_process_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_process_group = True
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in float32
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(
        device=device,
        dtype=resolve_dtype(dtype_setting, device),
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        owns_process_group=owns_process_group,
    )


def resolve_device(setting: str, local_rank: int | None = None) -> torch.device:
    """`auto` → CUDA when available, else CPU. Under DDP a bare `cuda` means this process's GPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise RuntimeSetupError(f"device {setting!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeSetupError(f"device {setting} was asked for but no CUDA GPU is visible; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
    return device


def resolve_dtype(setting: str, device: torch.device, cpu_flags: Iterable[str] | None = None) -> torch.dtype:
    """`auto` → bfloat16 autocast on GPUs that support it (float16 on older ones) and on CPUs with
    bf16 matmul instructions (`cpu_has_bf16`; `cpu_flags` as there), float32 on other CPUs and devices."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16(cpu_flags):
        return torch.bfloat16
    return torch.float32


def trained_dtype(state: dict) -> str:
    """The train.dtype setting of a checkpoint's state (auto for checkpoints that predate it):
    evaluation and sampling run under the autocast the weights were trained with."""
    return state.get("config", {}).get("train", {}).get("dtype", "auto")


# CPU flags (Linux /proc/cpuinfo names) of instructions that multiply bf16 matrices at least twice as
# fast as float32 ones: Intel AMX (Sapphire Rapids on) and AVX512-BF16 (Cooper Lake, AMD Zen 4 on).
# Measured on a 2-core Zen 4 VM: a 2048 × 256 @ 256 × 50304 matmul takes 267 ms in bf16, 634 ms in float32.
# Without them bf16 is emulated and slower than float32.
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_has_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether this CPU (or one with these /proc/cpuinfo `flags`) has AMX or AVX512-BF16."""
    if flags is None:
        flags = _cpu_flags()
    if flags is None:  # not Linux: ask torch's own CPU detection
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return not CPU_BF16_FLAGS.isdisjoint(flags)


def _cpu_flags() -> set[str] | None:
    """The flags of the first processor in /proc/cpuinfo, or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


# glibc's mallopt() parameters and their defaults (malloc.h, mallopt(3)).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Keep freed memory in the process while training on CPU (glibc only; else a no-op).

    PyTorch's CPU allocator is plain malloc, and glibc serves every block above 32 MiB
    with a fresh mmap and gives it back with munmap on free. The logits of a 50304-wide
    head are such blocks (8 × 128 tokens × 50304 × 4 bytes = 206 MB, and cross-entropy's
    forward and backward make three more), so each micro-step faulted in and zeroed about
    1.6 GB of new pages: ~400k page faults and most of the system time of an iteration.
    Here large blocks come from the heap and the heap is not trimmed, so the same pages
    are reused every step; on exit the defaults are restored and the memory handed back.
    Only where memory comes from changes, not what is computed.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc
