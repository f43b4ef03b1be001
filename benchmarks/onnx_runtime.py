#!/usr/bin/env python3
"""ONNX Runtime against PyTorch: full-resolution CPU inference of both networks, images/s and peak RSS (not a timed
test; results in benchmarks/RESULTS.md).

    python -m benchmarks.onnx_runtime --json /tmp/onnx_runtime.json    # FCN and U-Net, 375x500 and 720x960

Random-init weights with VOC's 21 classes (speed and memory do not depend on the weights). Each network, size and
engine runs in its own process, so that its peak RSS (VmHWM of /proc/self/status: the whole process, imports, model
and inference) is its own: PyTorch in fp32 and with the predict scripts' default flags (support.speed.inference_speed
"auto"), both through some_define.predict_full_res, and ONNX Runtime (CPU execution provider) on the file
--export-onnx writes, in a process that imports numpy and onnxruntime only, with its CPU memory arena (the default)
and without (SessionOptions.enable_cpu_mem_arena = False). Every engine normalises the
uint8 image, runs the network and takes the argmax, one image at a time, after one warm-up image. All engines get
the same thread count: by default the one the predict scripts would take now from the other programs' load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ["pytorch-fp32", "pytorch-default", "onnxruntime", "onnxruntime-no-arena"]
MODELS = ["fcn", "unet"]
SIZES = ["375x500", "720x960"]   # VOC's usual photo, and a 0.7 Mpixel one


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    p.add_argument("--sizes", nargs="+", default=SIZES, metavar="HxW")
    p.add_argument("--images", type=int, default=6, help="timed images per network, size and engine (default: 6)")
    p.add_argument("--threads", type=int, help="intra-op threads of every engine (default: as many as cores "
                   "that other programs leave free, as the predict scripts choose)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--child", nargs=3, metavar=("ENGINE", "MODEL_OR_ONNX", "HxW"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def image_hw(size: str) -> tuple[int, int]:
    h, w = size.lower().split("x")
    return int(h), int(w)


def peak_rss_mb() -> float | None:
    """VmHWM in MB (Linux); None elsewhere. Not getrusage: its ru_maxrss survives exec, so a child started by a large
    parent reports the parent's peak. (benchmarks/data.py reads the same field, but imports torch.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def timed(run, images: list) -> dict:
    """One warm-up image, then images/s over the rest, one at a time; and the process's peak RSS."""
    run(images[:1])
    start = time.perf_counter()
    run(images[1:])
    seconds = time.perf_counter() - start
    return {"img_s": (len(images) - 1) / seconds, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def pytorch_child(engine: str, model: str, size: str, count: int, threads: int) -> dict:
    """PyTorch as the predict scripts run it: predict_full_res, batch 1, fp32 or the default flags of this CPU."""
    import torch
    import some_define as sd
    from support.speed import inference_speed, use_cpu_kernels
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    speed = sd.Speed() if engine == "pytorch-fp32" else inference_speed("auto", cpu)
    torch.manual_seed(0)
    net = use_cpu_kernels(sd.build_model(model, len(sd.VOC_CLASSES), "none")).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, *image_hw(size)), dtype=torch.uint8, generator=g) for _ in range(count + 1)]
    result = timed(lambda chunk: [p for _, p in sd.predict_full_res(net, chunk, cpu, 1, speed)], images)
    amp = str(speed.amp_dtype).replace("torch.", "") if speed.amp_dtype else "off"
    return {**result, "amp": amp, "channels_last": speed.channels_last}


def onnxruntime_child(onnx_path: str, size: str, count: int, threads: int, arena: bool) -> dict:
    """ONNX Runtime on the exported file, normalised with the mean and std its metadata gives, argmax in numpy."""
    import numpy as np
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_cpu_mem_arena = arena
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    mean, std = (np.array(json.loads(meta[k]), dtype=np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (1, 3, *image_hw(size)), dtype=np.uint8) for _ in range(count + 1)]

    def run(chunk: list) -> None:
        for image in chunk:
            x = (image.astype(np.float32) / 255 - mean) / std
            session.run(["logits"], {"image": x})[0].argmax(1)
    return {**timed(run, images), "onnxruntime": onnxruntime.__version__}


def export_networks(models: list[str], folder: Path) -> dict[str, str]:
    """Each network (seed 0, as the PyTorch processes build it) as the ONNX file --export-onnx writes."""
    import onnx
    import torch
    import some_define as sd
    from support import checkpoints, onnx_export
    paths = {}
    for model in models:
        torch.manual_seed(0)
        net = sd.build_model(model, len(sd.VOC_CLASSES), "none").eval()
        checkpoint = checkpoints.make_checkpoint(net, model, sd.VOC_CLASSES, sd.VOC_COLORMAP, {})
        paths[model] = str(folder / f"{model}.onnx")
        onnx.save(onnx_export.onnx_model(net, checkpoint), paths[model])
    return paths


def print_table(results: list[dict]) -> None:
    print(f"\n{'network':8} {'size':9} {'engine':21} {'images/s':>9} {'peak RSS':>10}")
    for r in results:
        speed = f"{r['img_s']:9.2f}" if "img_s" in r else f"{'-':>9}"
        rss = f"{r['peak_rss_mb']:7.0f} MB" if r.get("peak_rss_mb") else r.get("error", "-")
        print(f"{r['model']:8} {r['size']:9} {r['engine']:21} {speed} {rss:>10}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        engine, model, size = args.child
        result = onnxruntime_child(model, size, args.images, args.threads, engine == "onnxruntime") \
            if engine.startswith("onnxruntime") else pytorch_child(engine, model, size, args.images, args.threads)
        print(json.dumps(result))
        return
    import torch
    from benchmarks.common import choose_threads, run_child
    from support.files import write_json
    load = os.getloadavg()[0]
    choose_threads(args.threads, for_load=args.threads is None)
    args.threads = torch.get_num_threads()
    print(f"load average {load:.2f} at the start, {args.threads} threads, {args.images} images each")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        onnx_files = export_networks(args.models, Path(folder))
        for model in args.models:
            for size in args.sizes:
                for engine in ENGINES:
                    target = onnx_files[model] if engine.startswith("onnxruntime") else model
                    child = ["--child", engine, target, size, "--images", str(args.images), "--threads",
                             str(args.threads)]
                    result = {"model": model, "size": size, "engine": engine, **run_child("onnx_runtime", child, 1800)}
                    print(json.dumps(result), flush=True)
                    results.append(result)
    print_table(results)
    if args.json:
        write_json({"threads": args.threads, "images": args.images, "load_average_start": load,
                    "results": results}, args.json)


if __name__ == "__main__":
    sys.exit(main())
