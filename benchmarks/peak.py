"""Section 1, peak: GFLOP/s of a large fp32 (and bf16) matmul, the ceiling the train steps are compared with."""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import dtype_name, fmt, sync
from support.speed import bf16_peak_flops


def matmul_gflops(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> dict:
    """GFLOP/s of an n x n x n matmul on random data: warm-up, then the best and the median of ``reps`` timings."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    inner = 10 if device.type == "cuda" else 1      # several products per timing on a GPU (launches are async)
    for _ in range(2):
        torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)
        times.append((time.perf_counter() - t) / inner)
    flop = 2 * n ** 3
    return {"n": n, "dtype": dtype_name(dtype), "gflops": flop / min(times) / 1e9,
            "median_gflops": flop / statistics.median(times) / 1e9}


def bench_peak(device: torch.device, n: int) -> dict:
    """The fp32 ceiling, and the bf16 one that autocast can reach (tensor cores; AMX or AVX512-BF16 on CPUs)."""
    reps = 10 if device.type == "cuda" else 20
    peak = matmul_gflops(device, n, torch.float32, reps)
    peak["bf16_gflops"] = matmul_gflops(device, n, torch.bfloat16, reps)["gflops"]
    if device.type == "cuda":
        peak["tf32_allowed_for_matmul"] = torch.backends.cuda.matmul.allow_tf32
        peak["tf32_allowed_for_cudnn"] = torch.backends.cudnn.allow_tf32
        bf16 = bf16_peak_flops(device)
        peak["bf16_datasheet_gflops"] = bf16 / 1e9 if bf16 else None
    return peak


def keep_higher(peak: dict, again: dict) -> None:
    """Both measurements of each ceiling go in ``peak`` as ``*_runs``, and the higher one is kept: a shared CPU can
    hide its ceiling during a one-second measurement (the fractions of the ceiling then only get more
    conservative)."""
    for key in ("gflops", "bf16_gflops"):
        peak[f"{key}_runs"] = [peak.get(key), again.get(key)]
        peak[key] = max(v for v in peak[f"{key}_runs"] if v)


def print_peak(peak: dict) -> None:
    """The ceilings in one line."""
    if "error" in peak:
        print(f"matmul ceiling: error: {peak['error']}")
    elif peak:
        datasheet = peak.get("bf16_datasheet_gflops")
        print(f"matmul ceiling: fp32 {fmt(peak['gflops'])} GFLOP/s (n={peak['n']}), bf16 {fmt(peak['bf16_gflops'])} "
              "GFLOP/s" + (f", bf16 datasheet {datasheet:.0f} GFLOP/s" if datasheet else ""))
