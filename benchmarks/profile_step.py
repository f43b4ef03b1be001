"""Where a training step's time goes: torch.profiler over default train steps of each network on this device, the
operators by self time with their share, beside the step's FLOP count and the matmul ceiling of its precision.

    python -m benchmarks.profile_step [--models fcn unet] [--crop H W] [--batch N] [--steps N] [--variant fast]
                                      [--json PATH]

The step is the benchmark's (benchmarks/train_step.prepare_variant: the network, optimizer, loss and speed settings
that training picks here), on a random batch.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import some_define as sd
from benchmarks.common import choose_threads, sync
from benchmarks.peak import bench_peak, keep_higher
from benchmarks.train_step import MODEL_DEFAULTS, VARIANTS, prepare_variant
from support.cli import ArgumentParser
from support.distributed import DistributedContext
from support.errors import run_main
from support.speed import train_flops_per_image


def random_batch(batch: int, crop: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *crop), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(sd.VOC_CLASSES), (batch, *crop), dtype=torch.uint8, generator=g)
    return images, labels


def operator_table(prof: profile, steps: int, top: int) -> list[dict]:
    """The operators by self time (per step), with their share of the profiled time and their calls."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events[:top]]


def profile_model(name: str, args: argparse.Namespace, ctx: DistributedContext, peak: dict) -> dict:
    """Timed steps first (no profiler: its overhead is not the step's), then the profiled ones."""
    torch.manual_seed(0)
    base = sd.build_model(name, len(sd.VOC_CLASSES), "none")
    crop = tuple(args.crop)
    flops = train_flops_per_image(base, crop, ctx.device)
    images, labels = random_batch(args.batch, crop)
    step, run = prepare_variant(args.variant, base, MODEL_DEFAULTS[name], images, labels, ctx, warmup=2)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync(ctx.device)
        times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    bf16 = run.flags.get("amp_dtype") == "bfloat16"
    gflops = args.batch * flops / seconds / 1e9
    return {"model": name, "variant": args.variant, "crop": list(crop), "batch_size": args.batch,
            "flags": run.flags, "gflop_per_image": flops / 1e9, "step_s": seconds, "img_s": args.batch / seconds,
            "gflops": gflops, "precision": "bf16" if bf16 else "fp32",
            "operators": operator_table(prof, args.steps, args.top)}


def print_profile(result: dict) -> None:
    r = result
    print(f"\n{r['model']} {r['crop'][0]}x{r['crop'][1]} batch {r['batch_size']} ({r['variant']}, {r['precision']}): "
          f"{r['img_s']:.2f} img/s, {r['gflops']:.0f} GFLOP/s = {r['fraction_of_ceiling']:.0%} of the "
          f"{r['precision']} matmul ceiling ({r['ceiling_gflops']:.0f}); {r['gflop_per_image']:.1f} GFLOP/image")
    print(f"  {'operator':<44} {'ms/step':>9} {'share':>7} {'calls':>6}")
    for op in r["operators"]:
        print(f"  {op['op'][:44]:<44} {op['self_ms_per_step']:9.1f} {op['share']:7.1%} {op['calls_per_step']:6.0f}")


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="where a training step's time goes, operator by operator")
    p.add_argument("--models", nargs="+", choices=list(MODEL_DEFAULTS), default=list(MODEL_DEFAULTS))
    p.add_argument("--device", help="cuda, cpu, ... (default: the first that exists)")
    p.add_argument("--crop", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps, then as many profiled ones")
    p.add_argument("--variant", choices=VARIANTS, default="fast", help="fast: what training picks here")
    p.add_argument("--top", type=int, default=15, help="operators shown")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    choose_threads(args.threads, False)
    ctx = DistributedContext(args.device)
    peak = bench_peak(ctx.device, 2048)
    results = [profile_model(name, args, ctx, peak) for name in args.models]
    keep_higher(peak, bench_peak(ctx.device, 2048))   # a shared CPU can hide its ceiling for a second: ask twice
    for result in results:
        ceiling = peak["bf16_gflops" if result["precision"] == "bf16" else "gflops"]
        result.update(ceiling_gflops=ceiling, fraction_of_ceiling=result["gflops"] / ceiling)
    for result in results:
        print_profile(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "peak": peak, "results": results}, f, indent=1)


if __name__ == "__main__":
    run_main(main)
