"""Speed and memory benchmark of the project's evaluation, data path and training step (not a timed test).

    python benchmarks/bench.py --quick --json /tmp/bench.json     # a CPU run in under 5 minutes
    python benchmarks/bench.py --json bench_gpu.json              # on a GPU: 320 x 480, batch 32, plain/fast/compile

Sections, in the order they run (the one that can run long, with torch.compile, last), one module each:
 1. peak   (peak.py) GFLOP/s of a large fp32 (and bf16) matmul: the ceiling the train steps are compared with
 2. eval   (evaluation.py) full-resolution (375 x 500) prediction, images/s, with the predict scripts' default flags
 3. data   (data.py) samples/s and memory of the project's loader vs the book's, each in its own process, on a
           generated VOC-sized tree (300 images of 500 x 375, JPEG + palette PNG)
 4. train  (train_step.py) images/s of the plain fp32 loop of the original repository, the default ("fast": what
           training picks on this device with the auto flags; on CUDA also torch.compile, and peak memory) and any
           other variants asked for, in interleaved rounds, each beside the fastest; on the CPU the ceiling is then
           measured again and the higher value kept
 5. busy   (busy.py; CPU, only when asked for) the default train step quiet and while another process runs a 2-thread
           matmul loop, with OpenMP's default wait policy, with threads that always spin, with threads that sleep,
           and with the thread count chosen from the load as the scripts choose it
A failing section records its error and the next one runs; the JSON is rewritten after every section. The model
settings (optimizer, lr, wd, loss, void) are the training scripts' DEFAULTS. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from benchmarks import busy, data, evaluation, peak, train_step
from benchmarks.common import choose_threads, flags_json, short_error
from support.cli import ArgumentParser
from support.distributed import DistributedContext
from support.files import check_writable_dir, write_json

SECTIONS = ["peak", "eval", "data", "train", "busy"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags; defaults that depend on the device stay None until fill_defaults."""
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here (rewritten after every section)")
    p.add_argument("--quick", action="store_true",
                   help="128 x 128 crops, batch 8, fewer eval images on the CPU: a run in < 5 minutes")
    p.add_argument("--device", help="cuda, cpu, ... (default: the first that exists)")
    p.add_argument("--sections", nargs="+", default=SECTIONS[:4], choices=SECTIONS,
                   help="which to run (always in this order)")
    p.add_argument("--models", nargs="+", default=list(train_step.MODEL_DEFAULTS),
                   choices=list(train_step.MODEL_DEFAULTS))
    train_step.add_arguments(p)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--busy-policies", nargs="+", choices=busy.POLICY_NAMES, default=busy.POLICY_NAMES,
                   help="the busy section's thread settings: OpenMP's default, always spin, always sleep, threads "
                   "from the load (the scripts' default)")
    p.add_argument("--threads-for-load", action="store_true",
                   help="choose the thread count from the other programs' load, as the scripts do on the CPU")
    p.add_argument("--peak-n", type=int, help="matmul size (default: 2048 on the CPU, 8192 on a GPU)")
    p.add_argument("--eval-images", type=int)
    p.add_argument("--eval-batch", type=int)
    p.add_argument("--eval-rounds", type=int)
    p.add_argument("--data-images", type=int, default=300)
    p.add_argument("--data-crop", type=int, nargs=2, default=[320, 480])
    p.add_argument("--data-batch", type=int, default=32)
    p.add_argument("--data-passes", type=int, default=3)
    p.add_argument("--data-workers", type=int, default=0,
                   help="DataLoader workers on both sides (0, as training uses on the CPU; RSS is the main process's)")
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """The flags left unset get the defaults their --help names for this device."""
    train_step.fill_defaults(args, device, args.quick)
    cuda = device.type == "cuda"
    defaults = {"peak_n": 8192 if cuda else 2048, "eval_images": 64 if cuda else (4 if args.quick else 8),
                "eval_batch": 32 if cuda else 4, "eval_rounds": 3 if cuda else 1}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def describe_run(args: argparse.Namespace, device: torch.device) -> dict:
    """The head of the JSON: the machine, torch, the command and the default's flags."""
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "quick": args.quick, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "fast_path": flags_json(train_step.default_settings(device))}
    if device.type == "cpu":
        result["cpu_features"] = {f: bool(getattr(torch.cpu, f"_is_{f}_supported")())
                                  for f in ("amx_tile", "avx512_bf16", "avx512")}
        try:
            model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                         if line.startswith("model name"))
            result["device"] = f"cpu: {model}, {os.cpu_count()} cores"
        except (OSError, StopIteration):
            pass
        result["load_avg_start"] = os.getloadavg()
    return result


class Run:
    """The result being built: each section runs (its failure becomes its error), then the JSON is rewritten."""

    def __init__(self, result: dict, json_path: str | None):
        self.result, self.json_path, self.started = result, json_path, time.perf_counter()

    def section(self, name: str, fn: Callable[[], object]) -> object:
        """``fn()``, timed and announced; an exception is printed and becomes {"error": ...}."""
        t = time.perf_counter()
        print(f"[{t - self.started:6.1f}s] {name} ...", flush=True)
        try:
            value = fn()
        except Exception as e:
            traceback.print_exc()
            value = {"error": short_error(e)}
        print(f"[{time.perf_counter() - self.started:6.1f}s] {name} done in {time.perf_counter() - t:.1f}s",
              flush=True)
        return value

    def save(self) -> None:
        """Rewrite the JSON (atomically), so that a run cut short keeps what it measured."""
        if self.json_path:
            write_json(self.result, self.json_path)


def run_train(run: Run, args: argparse.Namespace, ctx: DistributedContext, ceiling: dict) -> dict:
    """Section 4 for every model, then (CPU) the ceiling again; the models' runs, for the printed table."""
    runs = {}
    result = run.result["train_step"] = {}
    for name in args.models:
        runs[name] = run.section(f"train step {name}", lambda: train_step.bench_train_model(name, args, ctx))
        result[name] = train_step.to_json(runs[name], ceiling)
        run.save()
    if "gflops" in ceiling and ctx.device.type == "cpu":
        peak.keep_higher(ceiling, run.section("peak again", lambda: peak.bench_peak(ctx.device, args.peak_n)))
        run.result["peak_gflops"] = ceiling["gflops"]
        result.update({name: train_step.to_json(r, ceiling) for name, r in runs.items()})
        run.save()
    return runs


def run_sections(run: Run, args: argparse.Namespace, ctx: DistributedContext) -> dict:
    """Every section asked for, in order, into run.result; the train section's runs, for the printed table."""
    device, result, ceiling, runs = ctx.device, run.result, {}, {}
    if "peak" in args.sections or "train" in args.sections:
        ceiling = result["peak"] = run.section("peak (matmul ceiling)", lambda: peak.bench_peak(device, args.peak_n))
        result["peak_gflops"] = ceiling.get("gflops")
        run.save()
    if "eval" in args.sections:
        per_model = {}
        result["eval"] = {"per_model": per_model}
        for name in args.models:
            per_model[name] = run.section(f"eval {name}", lambda: evaluation.bench_eval(name, args, device))
            run.save()
        result["eval"].update(evaluation.headline(per_model))
        run.save()
    if "data" in args.sections:
        result["data"] = run.section("data", lambda: data.bench_data(args))
        run.save()
    if "train" in args.sections:
        runs = run_train(run, args, ctx, ceiling)
    if "busy" in args.sections:
        result["busy"] = run.section("busy CPU", lambda: busy.bench_busy(args))
        run.save()
    return runs


def print_table(result: dict, runs: dict, ceiling: dict) -> None:
    """Every section's numbers, after the run."""
    print(f"\ndevice: {result['device']}  (torch {result['torch']}, {result['threads']} threads)")
    peak.print_peak(ceiling)
    if "eval" in result:
        evaluation.print_eval(result["eval"])
    if "data" in result:
        data.print_data(result["data"])
    if runs:
        train_step.print_train(runs, ceiling)
    print()


def main(argv: list[str] | None = None) -> None:
    """Run the sections asked for, write the JSON, print the table."""
    args = parse_args(argv)
    if args.json:
        check_writable_dir(Path(args.json).resolve().parent, "--json")
    choose_threads(args.threads, args.threads_for_load)
    ctx = DistributedContext(args.device)   # one process: the device, and what wrap_for_training needs
    fill_defaults(args, ctx.device)
    run = Run(describe_run(args, ctx.device), args.json)
    print(f"bench on {run.result['device']}; train crop {args.crop}, batch {args.batch}, variants {args.variants}",
          flush=True)
    runs = run_sections(run, args, ctx)
    run.result["seconds"] = time.perf_counter() - run.started
    if ctx.device.type == "cpu":
        run.result["load_avg_end"] = os.getloadavg()
    run.save()
    print_table(run.result, runs, run.result.get("peak", {}))
    if args.json:
        print(f"wrote {args.json}")
