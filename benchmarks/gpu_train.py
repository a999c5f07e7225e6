"""Training throughput and MFU of the real trainer on one GPU, on random tokens (no data needed).

    python -m benchmarks.gpu_train                                  # fineweb-40m and gpt2-124m, 20 timed steps
    python -m benchmarks.gpu_train --presets gpt2-124m --batch-size 32 --out gpu.json
    python -m benchmarks.gpu_train --device cpu --presets demo --steps 2 --warmup-steps 1 --no-compile   # smoke test

Each preset is built and stepped with the trainer's own functions (gpt/runtime.setup_runtime: TF32
on, bf16 autocast where supported; build_model: fused AdamW on CUDA; train_step and
optimizer_step), compiled with torch.compile unless --no-compile. A step is one optimizer
step over the preset's train.grad_accum_steps micro-batches (override with --grad-accum).
The first --warmup-steps steps (compilation, allocator and cuDNN warm-up) are not timed;
the timed steps are bracketed by torch.cuda.synchronize(). MFU divides the achieved
FLOP/s (ModelConfig.flops_per_token × tokens/s) by the detected GPU's dense bf16 peak
(gpt/flops.py), None on CPU or an unknown GPU (--peak-tflops sets it).

Per preset it prints parameters, tokens/iter, ms/iter, tokens/s, MFU and peak memory,
and --out writes all results as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from configs.errors import UserError
from configs.schema import ConfigError, load_config
from gpt.flops import mfu, peak_flops
from gpt.runtime import reuse_freed_memory, setup_runtime
from gpt.train import build_model, optimizer_step, train_step

DEFAULT_PRESETS = ["fineweb-40m", "gpt2-124m"]
GPT2_VOCAB = 50257  # random ids below GPT-2's real vocabulary, like real shards


class RandomTokens:
    """A stand-in for TrainLoader: `next_batch()` cycles through a few pre-drawn CPU
    batches of uniformly random token ids, so no data and almost no host work is needed."""

    def __init__(self, batch_size: int, block_size: int, seed: int = 0, distinct: int = 4):
        generator = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(distinct):
            tokens = torch.randint(0, GPT2_VOCAB, (batch_size, block_size + 1), generator=generator)
            self.batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        self.index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_preset(
    preset: str,
    device: str,
    steps: int,
    warmup_steps: int,
    compile_model: bool,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    dtype: str = "auto",
    peak_tflops: float | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train `preset` for warmup_steps + steps optimizer steps on random tokens; return the timings."""
    settings = {"train.device": device, "train.compile": compile_model, "train.dtype": dtype}
    if batch_size is not None:
        settings["train.batch_size"] = batch_size
    if grad_accum is not None:
        settings["train.grad_accum_steps"] = grad_accum
    if peak_tflops is not None:
        settings["train.peak_tflops"] = peak_tflops
    config = load_config(preset, [*(f"{k}={json.dumps(v)}" for k, v in settings.items()), *(overrides or [])])
    tc, mc = config.train, config.model
    runtime = setup_runtime(tc.device, tc.dtype, tc.num_threads)
    device_t = runtime.device
    if device_t.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device_t)

    with reuse_freed_memory(device_t.type == "cpu"):
        model, optimizer, scaler = build_model(config, runtime)
        train_model = torch.compile(model) if tc.compile else model
        loader = RandomTokens(tc.batch_size, mc.block_size, seed=tc.seed)
        for group in optimizer.param_groups:
            group["lr"] = tc.learning_rate

        def step() -> float:
            loss, _ = train_step(train_model, loader, tc.grad_accum_steps, runtime, scaler, optimizer, tc.grad_clip)
            optimizer_step(optimizer, scaler)
            return loss

        started = time.perf_counter()
        for _ in range(warmup_steps):
            step()
        synchronize(device_t)
        warmup_s = time.perf_counter() - started

        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        synchronize(device_t)
        timed_s = time.perf_counter() - started

    tokens_per_iter = config.tokens_per_iter()
    tokens_per_sec = tokens_per_iter * steps / timed_s
    peak = peak_flops(device_t, tc.peak_tflops)
    result = {
        "preset": preset,
        "params": model.get_num_params(),
        "n_layer": mc.n_layer,
        "n_embd": mc.n_embd,
        "block_size": mc.block_size,
        "batch_size": tc.batch_size,
        "grad_accum_steps": tc.grad_accum_steps,
        "tokens_per_iter": tokens_per_iter,
        "flops_per_token": mc.flops_per_token(),
        "device": str(device_t),
        "device_name": device_name(device_t),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "compile": tc.compile,
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "steps": steps,
        "warmup_steps": warmup_steps,
        "warmup_s": warmup_s,
        "ms_per_iter": 1000 * timed_s / steps,
        "tokens_per_sec": tokens_per_sec,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": mfu(mc.flops_per_token(), tokens_per_sec, peak),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device_t) if device_t.type == "cuda" else None,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_loss": loss,
    }
    del train_model, model, optimizer, loader
    gc.collect()
    torch._dynamo.reset()
    if device_t.type == "cuda":
        torch.cuda.empty_cache()
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def describe_result(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['preset']}: failed: {r['error']}"
    mfu_text = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
    memory = (f"{r['peak_memory_bytes'] / 2**30:.2f} GiB allocated" if r["peak_memory_bytes"] is not None
              else f"{r['max_rss_bytes'] / 2**30:.2f} GiB max RSS")
    return (
        f"{r['preset']}: {r['params'] / 1e6:.1f}M params, {r['tokens_per_iter']:,} tokens/iter "
        f"({r['batch_size']} x {r['block_size']} x {r['grad_accum_steps']}), {r['ms_per_iter']:.1f} ms/iter, "
        f"{r['tokens_per_sec']:,.0f} tokens/s, MFU {mfu_text}, peak memory {memory} "
        f"[{r['device_name']}, {r['dtype']}, compile={r['compile']}, warm-up {r['warmup_s']:.1f}s]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, help=f"default: {' '.join(DEFAULT_PRESETS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per preset (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    parser.add_argument("--batch-size", type=int, help="micro-batch sequences (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default: the preset's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (default on)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 autocast on GPUs that support it, float32 on CPU")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: looked up by GPU name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 1 and --warmup-steps >= 0")

    results = []
    for preset in args.presets:
        try:
            load_config(preset, args.set)
        except ConfigError as exc:
            parser.error(str(exc))
    for preset in args.presets:
        try:
            result = bench_preset(preset, args.device, args.steps, args.warmup_steps, args.compile, args.batch_size,
                                  args.grad_accum, args.dtype, args.peak_tflops, args.set)
        except torch.cuda.OutOfMemoryError as exc:  # report it and go on with the next preset
            result = {"preset": preset, "error": f"out of GPU memory ({str(exc).splitlines()[0]}); lower --batch-size"}
        except UserError as exc:  # e.g. --device cuda without a GPU
            result = {"preset": preset, "error": str(exc)}
        if "error" in result:  # the failed preset's tensors are free once the exception is gone
            gc.collect()
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        results.append(result)
        print(describe_result(result), flush=True)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else argv,
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.out}", flush=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
