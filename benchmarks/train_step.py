"""Section 4, train: images/s of the training step, the plain fp32 loop of the original repository beside the default
("fast": what training picks on this device with every speed flag at auto) and other variants, in interleaved rounds.

    python -m benchmarks.train_step MODEL [--device D] [--crop H W] [--batch N] [--variants ...] [--threads-for-load]

measures one model in this process and prints its JSON as the last line (the busy section runs it so).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

import my_train
import origin_train
import some_define as sd
from benchmarks.common import VOC_IMAGE_HW, choose_threads, flags_json, fmt, free_cuda_cache, short_error, sync
from support.cli import ArgumentParser
from support.distributed import DistributedContext, wrap_for_training
from support.errors import run_main
from support.steps import make_step
from support.speed import (bf16_peak_flops, use_cpu_kernels, resolve_speed,
                           train_flops_per_image)

MODEL_DEFAULTS = {d["model"]: d for d in (origin_train.DEFAULTS, my_train.DEFAULTS)}   # fcn, unet: as trained
VOC_TRAIN_BYTES = 1464 * VOC_IMAGE_HW[0] * VOC_IMAGE_HW[1] * 4   # the uint8 VOC train split: decides data_on_device
PLAIN = {"amp_dtype": None, "channels_last": False, "data_on_device": False, "compile": False}
# Explicit settings, to look for a better default. bf16_cl_tconv is bf16_cl with the FCN's transposed conv left in bf16
# too (every other variant keeps it in fp32 under CPU autocast, as training does); for the U-Net (which has none) and
# on a GPU the two are the same.
EXPLICIT = {"bf16": dict(amp_dtype=torch.bfloat16), "fp16": dict(amp_dtype=torch.float16),
            "cl": dict(channels_last=True), "bf16_cl": dict(amp_dtype=torch.bfloat16, channels_last=True),
            "bf16_cl_tconv": dict(amp_dtype=torch.bfloat16, channels_last=True)}
VARIANTS = ["plain", "fast", "compile", *EXPLICIT]
LABELS = {"fast": "default (fast)"}   # the printed table's name of a variant


def default_settings(device: torch.device) -> dict:
    """What training picks on this device for the VOC train split with every speed flag at 'auto'."""
    speed, data_on_device = resolve_speed("auto", "auto", "auto", device, VOC_TRAIN_BYTES)
    return {**speed._asdict(), "data_on_device": data_on_device}


def variant_settings(name: str, device: torch.device) -> dict:
    """plain: the original repository's loop (fp32, contiguous, batch from the CPU); fast: training's defaults here;
    compile: fast + torch.compile; the others: EXPLICIT."""
    if name == "plain":
        return dict(PLAIN)
    if name in ("fast", "compile"):
        return {**default_settings(device), "compile": name == "compile"}
    return {**PLAIN, "data_on_device": device.type == "cuda", **EXPLICIT[name]}


@dataclass
class VariantRun:
    """What was measured of one variant: its flags, warm-up, memory (CUDA) and the seconds per step of each round."""
    flags: dict
    warmup_s: float
    memory: dict
    times: list[float] = field(default_factory=list)


@dataclass
class ModelRun:
    """One model's train step: the setup, every variant's measurements, and the errors of those that failed."""
    head: dict
    steps: int
    rounds: int
    bf16_peak: float | None
    variants: dict[str, VariantRun] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def stats(self, peak: dict) -> dict[str, dict]:
        """Each timed variant's numbers; speedups are per-round ratios to plain, then their median (robust against
        load that drifts during the run); fractions are of the datasheet's bf16 peak and the measured ceilings."""
        batch, flops, out = self.head["batch_size"], self.head["flops_per_image"], {}
        plain = self.variants["plain"].times if "plain" in self.variants else []
        for name, run in self.variants.items():
            if not run.times:
                continue
            img_s = batch / statistics.median(run.times)
            s = out[name] = {"img_s": img_s, "best_img_s": batch / min(run.times), "step_s": run.times,
                             "gflops": img_s * flops / 1e9, "warmup_s": run.warmup_s, "flags": run.flags, **run.memory}
            if self.bf16_peak:
                s["fraction_of_bf16_peak"] = img_s * flops / self.bf16_peak
            if name != "plain" and plain and len(run.times) == len(plain):
                s["speedup"] = statistics.median(p / f for p, f in zip(plain, run.times))
            if peak.get("gflops"):
                s["fraction_of_peak"] = s["gflops"] / peak["gflops"]
            if peak.get("bf16_gflops"):
                s["fraction_of_bf16_matmul"] = s["gflops"] / peak["bf16_gflops"]
            # of the ceiling of the precision the step computes in: bf16 steps against the bf16 matmul
            bf16 = run.flags.get("amp_dtype") == "bfloat16"
            s["precision"] = "bf16" if bf16 else "fp32"
            s["fraction_of_precision_ceiling"] = s.get("fraction_of_bf16_matmul" if bf16 else "fraction_of_peak")
        return out

    def to_json(self, peak: dict) -> dict:
        """The JSON record: the setup, VARIANT_error and VARIANT_STAT for every stat, then the summary."""
        stats = self.stats(peak)
        out = {**self.head, **{f"{name}_error": e for name, e in self.errors.items()}}
        for name, s in stats.items():
            out.update({f"{name}_{key}": value for key, value in s.items()})
        fast = stats.get("fast", {})
        out.update({key: fast[key] for key in ("speedup", "fraction_of_peak", "fraction_of_precision_ceiling")
                    if key in fast})
        if stats:
            out["fastest_variant"] = fastest = max(stats, key=lambda name: stats[name]["img_s"])
            if fast:
                out["default_to_fastest"] = fast["img_s"] / stats[fastest]["img_s"]
        out["steps_per_round"], out["rounds"] = self.steps, self.rounds
        return out


def to_json(run: ModelRun | dict, peak: dict) -> dict:
    """A model's JSON record (a section that failed is its error)."""
    return run.to_json(peak) if isinstance(run, ModelRun) else run


def prepare_variant(variant: str, base: torch.nn.Module, setup: dict, images: torch.Tensor, labels: torch.Tensor,
                    ctx: DistributedContext, warmup: int) -> tuple[Callable[[], tuple], VariantRun]:
    """One variant's network, optimizer and batch, set up as training does: its step function, after the warm-up."""
    device, flags = ctx.device, variant_settings(variant, ctx.device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    net = copy.deepcopy(base)
    if variant != "bf16_cl_tconv":
        use_cpu_kernels(net)   # as training does
    net = wrap_for_training(net, ctx, flags["channels_last"], False, flags["compile"])
    net.train()
    optimizer = sd.make_optimizer(setup["optimizer"], net.parameters(), setup["lr"], setup["wd"])
    scaler = torch.amp.GradScaler(device.type) if flags["amp_dtype"] == torch.float16 else None
    x, y = (images.to(device), labels.to(device)) if flags["data_on_device"] else (images, labels)
    train_step = make_step(sd.SegmentationLoss(setup["loss"], setup["void"]),
                           sd.Speed(flags["amp_dtype"], flags["channels_last"]), scaler, 1, ctx.world_size)

    def step():
        torch.backends.cudnn.benchmark = variant != "plain"   # the original loop used cuDNN's default heuristics
        return train_step(net, optimizer, x, y)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(warmup + (2 if flags["compile"] else 0)):
        step()
    sync(device)
    memory = {}
    if device.type == "cuda":   # this variant's own: its weights, optimizer state, batch and activations
        memory = {"peak_mem_gib": (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30,
                  "peak_mem_total_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
    return step, VariantRun(flags_json(flags), time.perf_counter() - t, memory)


def time_rounds(steps: dict[str, Callable[[], tuple]], run: ModelRun, device: torch.device) -> None:
    """Interleaved rounds, every variant in each, so that all see the same background load; the order reverses every
    other round (ABBA), so that a load drift cancels out."""
    for r in range(run.rounds):
        order = list(steps.items())
        for variant, step in (order if r % 2 == 0 else order[::-1]):
            if variant in run.errors:
                continue
            try:
                sync(device)
                t = time.perf_counter()
                for _ in range(run.steps):
                    step()
                sync(device)
                run.variants[variant].times.append((time.perf_counter() - t) / run.steps)
            except Exception as e:
                run.errors[variant] = short_error(e)
                free_cuda_cache(device)


def bench_train_model(name: str, args: argparse.Namespace, ctx: DistributedContext) -> ModelRun:
    """Every variant of one model's train step on a random batch, with the model settings training uses."""
    device, setup = ctx.device, MODEL_DEFAULTS[name]
    crop, batch, cuda = tuple(args.crop), args.batch, ctx.device.type == "cuda"
    torch.manual_seed(0)
    base = sd.build_model(name, len(sd.VOC_CLASSES), "none")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *crop), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(sd.VOC_CLASSES), (batch, *crop), dtype=torch.uint8, generator=g)
    labels[:, : crop[0] // 8] = sd.VOID       # some void pixels, as in VOC
    t = time.perf_counter()
    flops = train_flops_per_image(base.to(device), crop, device)
    base = base.cpu()
    head = {"crop": list(crop), "batch_size": batch, **{k: setup[k] for k in ("optimizer", "lr", "wd", "loss", "void")},
            "flops_per_image": flops, "gflop_per_step": flops * batch / 1e9, "flop_count_s": time.perf_counter() - t}
    # Fewer U-Net steps on the CPU (each is slow).
    run = ModelRun(head, args.steps or (5 if cuda else {"fcn": 3}.get(name, 1)),
                   args.rounds or (5 if cuda or name == "fcn" else 3), bf16_peak_flops(device))
    steps = {}
    for variant in args.variants:
        try:
            steps[variant], run.variants[variant] = prepare_variant(variant, base, setup, images, labels, ctx,
                                                                    args.warmup)
        except Exception as e:   # e.g. torch.compile failing on this machine: record it, keep the others
            traceback.print_exc()
            run.errors[variant] = short_error(e)
            free_cuda_cache(device)
    time_rounds(steps, run, device)
    del steps   # the networks, optimizers and batches: the next model starts from a clean GPU
    free_cuda_cache(device)
    return run


def print_train(runs: dict[str, ModelRun | dict], peak: dict) -> None:
    """Per model its setup, then a row per variant, with its ratio to the fastest one."""
    print("\ntrain step (images/s, median of interleaved rounds; ratio to the fastest variant; GFLOP/s; fraction of "
          "the matmul ceiling of the precision the step computes in):")
    for name, run in runs.items():
        if not isinstance(run, ModelRun):
            print(f"  {name}: error: {run['error']}")
            continue
        h, stats = run.head, run.stats(peak)
        print(f"  {name} {h['crop'][0]}x{h['crop'][1]} batch {h['batch_size']}, {h['flops_per_image'] / 1e9:.1f} "
              f"GFLOP/image (fwd+bwd), {h['optimizer']} lr {h['lr']:g}, loss {h['loss']}, void {h['void']}:")
        fastest = max((s["img_s"] for s in stats.values()), default=None)
        for variant, s in stats.items():
            print(f"    {LABELS.get(variant, variant):<14} {s['img_s']:8.2f} img/s  {s['img_s'] / fastest:5.2f} of "
                  f"fastest  {s['gflops']:9.1f} GFLOP/s  {fmt(s.get('fraction_of_precision_ceiling'), '.1%'):>6} of "
                  f"the {s['precision']} ceiling"
                  + (f"  x{s['speedup']:.2f} vs plain" if "speedup" in s else "")
                  + (f"  {s['fraction_of_bf16_peak']:.1%} of bf16 peak" if "fraction_of_bf16_peak" in s else "")
                  + (f"  peak mem {s['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in s else ""))
        for variant, error in run.errors.items():
            print(f"    {variant} error: {error}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train step's flags (the runner's and this module's own command line)."""
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                   help="train-step crop (default: 320 480; 128 128 with --quick on the CPU)")
    p.add_argument("--batch", type=int, help="train-step batch (default: 32 on a GPU, 4 on the CPU, 8 with --quick)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help="train-step variants (default: plain fast, + compile on CUDA or with --compile)")
    p.add_argument("--compile", action="store_true", help="add the compile variant off CUDA")
    p.add_argument("--warmup", type=int, help="warm-up steps per variant")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default: 5; 3 for the UNet on the CPU)")
    p.add_argument("--steps", type=int,
                   help="steps per variant per round (default: 5 on a GPU; on the CPU 3 for the FCN, 1 for the UNet)")


def fill_defaults(args: argparse.Namespace, device: torch.device, quick: bool) -> None:
    """The train-step flags left unset get the defaults their --help names."""
    cuda = device.type == "cuda"
    defaults = {"crop": [128, 128] if quick and not cuda else [320, 480],
                "batch": 32 if cuda else (8 if quick else 4),
                "variants": ["plain", "fast", "compile"] if cuda or args.compile else ["plain", "fast"],
                "warmup": 3 if cuda else 1}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def main(argv: list[str] | None = None) -> None:
    """One model's train step in this process, its JSON (without the ceiling fractions) on the last line."""
    p = ArgumentParser(description="one model's train step, in this process (JSON on stdout)")
    p.add_argument("model", choices=list(MODEL_DEFAULTS))
    p.add_argument("--device", help="cuda, cpu, ... (default: the first that exists)")
    p.add_argument("--quick", action="store_true", help="bench.py's smaller CPU defaults")
    add_arguments(p)
    p.add_argument("--threads-for-load", action="store_true",
                   help="choose the thread count from the other programs' load, as the scripts do on the CPU")
    args = p.parse_args(argv)
    choose_threads(None, args.threads_for_load)
    ctx = DistributedContext(args.device)
    fill_defaults(args, ctx.device, args.quick)
    print(json.dumps(bench_train_model(args.model, args, ctx).to_json({})))


if __name__ == "__main__":
    run_main(main)
