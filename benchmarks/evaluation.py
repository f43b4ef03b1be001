"""Section 2, eval: full-resolution (375 x 500) prediction, images/s, with the predict scripts' default flags."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import some_define as sd
from benchmarks.common import VOC_IMAGE_HW, dtype_name, sync
from support.speed import inference_speed, use_cpu_kernels


def bench_eval(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Random VOC-sized images through predict_full_res with the flags and model setup the predict scripts use."""
    speed = inference_speed("auto", device)
    torch.backends.cudnn.benchmark = False   # prediction does not autotune (photos come in many sizes)
    torch.manual_seed(0)
    net = use_cpu_kernels(sd.build_model(name, len(sd.VOC_CLASSES), "none")).to(device)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, *VOC_IMAGE_HW), dtype=torch.uint8, generator=g)
              for _ in range(args.eval_images)]

    def run(imgs) -> int:
        n = 0
        for _, pred in sd.predict_full_res(net, imgs, device, args.eval_batch, speed):
            pred.cpu()
            n += 1
        sync(device)
        return n
    run(images[:args.eval_batch])      # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.eval_rounds):
        t = time.perf_counter()
        n = run(images)
        times.append(time.perf_counter() - t)
    out = {"img_s": n / statistics.median(times), "images": n, "image_hw": list(VOC_IMAGE_HW),
           "batch_size": args.eval_batch, "seconds": times,
           "amp": dtype_name(speed.amp_dtype) if speed.amp_dtype else "off", "channels_last": speed.channels_last}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def headline(per_model: dict) -> dict:
    """The section's own img_s and model: the project's model (the U-Net) when it was measured, else the first."""
    measured = [m for m in per_model if "img_s" in per_model[m]]
    if not measured:
        return {}
    chosen = "unet" if "unet" in measured else measured[0]
    return {"img_s": per_model[chosen]["img_s"], "model": chosen}


def print_eval(result: dict) -> None:
    """One line per model."""
    print(f"\nfull-resolution eval ({VOC_IMAGE_HW[0]}x{VOC_IMAGE_HW[1]}):")
    for name, e in result.get("per_model", {}).items():
        if "error" in e:
            print(f"  {name}: error: {e['error']}")
            continue
        memory = f", peak mem {e['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in e else ""
        print(f"  {name:<5} {e['img_s']:8.2f} img/s  (batch {e['batch_size']}, amp {e['amp']}, "
              f"channels_last {e['channels_last']}{memory})")
