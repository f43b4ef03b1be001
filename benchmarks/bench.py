#!/usr/bin/env python3
"""Speed and memory benchmark of the project's evaluation, data path and training step (not a timed test).

    python benchmarks/bench.py --quick --json /tmp/bench.json     # a CPU run in under 5 minutes
    python benchmarks/bench.py --json bench_gpu.json              # on a GPU: 320 x 480, batch 32, plain/fast/compile

Sections, in the order they run (the one that can run long, with torch.compile, last):
 1. peak   GFLOP/s of a large fp32 (and bf16) matmul: the ceiling the train steps are compared with
 2. eval   full-resolution (375 x 500) prediction, images/s, with the predict scripts' default flags
 3. data   samples/s and memory of the project's loader vs the book's, each in its own process, on a generated
           VOC-sized tree (300 images of 500 x 375, JPEG + palette PNG)
 4. train  images/s of the plain fp32 loop of the original repository vs the fast path that training picks on this
           device with the auto flags (on CUDA also torch.compile, and peak memory), in interleaved rounds; on the
           CPU the ceiling is then measured again and the higher value kept
 5. busy   (CPU, only when asked for) the fast train step quiet and while another process runs a 2-thread matmul
           loop, with OpenMP's default wait policy, with threads that always spin, with threads that sleep, and with
           the thread count chosen from the load as the scripts choose it
A failing section records its error and the next one runs; the JSON is rewritten after every section. The model
settings (optimizer, lr, wd, loss, void) are the training scripts' DEFAULTS. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import my_train  # noqa: E402
import origin_train  # noqa: E402
import some_define as sd  # noqa: E402
from support.distributed import DistributedContext, wrap_for_training  # noqa: E402
from support.data import read_split, voc_palette  # noqa: E402
from support.files import write_json  # noqa: E402
from support.speed import (bf16_peak_flops, inference_flags, keep_transposed_convs_fp32_on_cpu,  # noqa: E402
                           resolve_speed_flags, threads_for_load, train_flops_per_image)
from support.training import training_batches  # noqa: E402

MODEL_DEFAULTS = {d["model"]: d for d in (origin_train.DEFAULTS, my_train.DEFAULTS)}   # fcn, unet: as trained
VOC_IMAGE_HW = (375, 500)                                       # the usual VOC image (height, width)
VOC_TRAIN_BYTES = 1464 * VOC_IMAGE_HW[0] * VOC_IMAGE_HW[1] * 4  # the uint8 VOC train split: decides data_on_device


# --- Helpers ---------------------------------------------------------------------------------------------------------

def proc_status_mb(key: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cuda_cache(device: torch.device) -> None:
    """After a variant is done or failed (e.g. out of memory), so that the next one starts from a clean GPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def flags_json(flags: dict) -> dict:
    return {k: str(v).replace("torch.", "") if k == "amp_dtype" else v for k, v in flags.items()}


# --- 1. peak: the machine's ceiling, a large matmul ------------------------------------------------------------------

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
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "gflops": flop / min(times) / 1e9,
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


# --- 2. eval: full-resolution prediction -----------------------------------------------------------------------------

def bench_eval(name: str, args, device: torch.device) -> dict:
    """Random VOC-sized images through predict_full_res with the flags and model setup the predict scripts use."""
    flags = inference_flags("auto", device)
    torch.backends.cudnn.benchmark = False   # prediction does not autotune (photos come in many sizes)
    torch.manual_seed(0)
    net = keep_transposed_convs_fp32_on_cpu(sd.build_model(name, len(sd.VOC_CLASSES), "none")).to(device)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, *VOC_IMAGE_HW), dtype=torch.uint8, generator=g)
              for _ in range(args.eval_images)]

    def run(imgs) -> int:
        n = 0
        for _, pred in sd.predict_full_res(net, imgs, device, args.eval_batch, **flags):
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
           "amp": str(flags["amp_dtype"]).replace("torch.", "") if flags["amp_dtype"] else "off",
           "channels_last": flags["channels_last"]}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


# --- 3. data: a generated VOC-sized tree, read by the project's loader and by the book's -----------------------------

def make_bench_tree(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` photo-like JPEGs (smooth shading, shapes, mild noise) with VOC palette PNG labels."""
    voc_dir = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    h, w = VOC_IMAGE_HW
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    names = [f"bench_{k:04d}" for k in range(count)]
    for name in names:
        image = rng.uniform(40, 200, 3).astype(np.float32) \
            + 40 * np.sin(xx[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3)) \
            + 30 * np.cos(yy[..., None] / rng.uniform(20, 80)) + rng.normal(0, 6, (h, w, 3))
        image_im = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        label_im = Image.new("L", (w, h), 0)
        image_draw, label_draw = ImageDraw.Draw(image_im), ImageDraw.Draw(label_im)
        for _ in range(rng.randint(1, 4)):
            cls = int(rng.randint(1, len(sd.VOC_CLASSES)))
            x0, y0 = int(rng.randint(0, w - 60)), int(rng.randint(0, h - 60))
            x1, y1 = x0 + int(rng.randint(40, w // 2)), y0 + int(rng.randint(40, h // 2))
            color = tuple(int(c) for c in rng.randint(0, 256, 3))
            shape = "ellipse" if rng.rand() < 0.5 else "rectangle"
            getattr(image_draw, shape)([x0, y0, x1, y1], fill=color)
            getattr(label_draw, shape)([x0 - 2, y0 - 2, x1 + 2, y1 + 2], fill=sd.VOID)   # a void boundary
            getattr(label_draw, shape)([x0, y0, x1, y1], fill=cls)
        label_im.putpalette(voc_palette())     # 'L' + palette -> 'P', as VOC ships its labels
        image_im.save(voc_dir / "JPEGImages" / f"{name}.jpg", quality=90)
        label_im.save(voc_dir / "SegmentationClass" / f"{name}.png")
    (voc_dir / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return voc_dir


# The baseline: the book's loader (d2l, "Semantic Segmentation and the Dataset"), as the book writes it, except for
# voc_rand_crop, which some_define has as the book's. The book's own reader stays: torchvision decodes to channels-last
# strided tensors, the book's float32 images keep that layout, and it is part of their speed (see RESULTS.md).

def ref_read_voc_images(voc_dir, is_train=True):
    """Read all VOC feature and label images (labels as RGB)."""
    txt_fname = os.path.join(voc_dir, 'ImageSets', 'Segmentation', 'train.txt' if is_train else 'val.txt')
    mode = torchvision.io.image.ImageReadMode.RGB
    with open(txt_fname, 'r') as f:
        images = f.read().split()
    features, labels = [], []
    for fname in images:
        features.append(torchvision.io.read_image(os.path.join(voc_dir, 'JPEGImages', f'{fname}.jpg')))
        labels.append(torchvision.io.read_image(os.path.join(voc_dir, 'SegmentationClass', f'{fname}.png'), mode))
    return features, labels


def ref_voc_colormap2label():
    """Build the mapping from RGB to class indices for VOC labels (256**3 int64 entries, 128 MB)."""
    colormap2label = torch.zeros(256 ** 3, dtype=torch.long)
    for i, colormap in enumerate(sd.VOC_COLORMAP):
        colormap2label[(colormap[0] * 256 + colormap[1]) * 256 + colormap[2]] = i
    return colormap2label


def ref_voc_label_indices(colormap, colormap2label):
    """Map any RGB values in VOC labels to their class indices."""
    colormap = colormap.permute(1, 2, 0).numpy().astype('int32')
    idx = ((colormap[:, :, 0] * 256 + colormap[:, :, 1]) * 256 + colormap[:, :, 2])
    return colormap2label[idx]


class RefVOCSegDataset(torch.utils.data.Dataset):
    """A customized dataset to load the VOC dataset (the book's: float32 normalised images in memory)."""

    def __init__(self, is_train, crop_size, voc_dir):
        self.transform = torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        self.crop_size = crop_size
        features, labels = ref_read_voc_images(voc_dir, is_train=is_train)
        self.features = [self.normalize_image(feature) for feature in self.filter(features)]
        self.labels = self.filter(labels)
        self.colormap2label = ref_voc_colormap2label()

    def normalize_image(self, img):
        return self.transform(img.float() / 255)

    def filter(self, imgs):
        return [img for img in imgs if (img.shape[1] >= self.crop_size[0] and img.shape[2] >= self.crop_size[1])]

    def __getitem__(self, idx):
        feature, label = sd.voc_rand_crop(self.features[idx], self.labels[idx], *self.crop_size)
        return (feature, ref_voc_label_indices(label, self.colormap2label))

    def __len__(self):
        return len(self.features)


def data_worker(kind: str, voc_dir: str, crop: tuple[int, int], batch: int, passes: int, workers: int) -> dict:
    """In its own process: read the split, one pass (then the memory), more passes for the rate.

    ``samples_per_s`` counts what each loader hands the training loop (the project: uint8 crops, normalised later on
    the training device; the book: float32 crops, int64 targets); ``samples_per_s_to_float`` adds, for the project,
    that conversion done here on the CPU, so that both end with float32 images and int64 targets."""
    torch.manual_seed(0)
    before = {key: proc_status_mb(key) for key in ("VmRSS", "RssAnon", "RssFile")}
    hwm_reset = reset_peak_rss()
    t0 = time.perf_counter()
    if kind == "project":   # what training reads and iterates
        dataset = read_split(voc_dir, "train", sd.VOC_COLORMAP, crop_size=crop)
        sampler = sd.RandomCropBatchSampler(dataset, batch, seed=0)
        batches = training_batches(dataset, sampler, torch.device("cpu"), False, workers)

        def start_epoch(e: int):
            sampler.set_epoch(e)
            return batches()
        convert = lambda images, labels: (sd.normalize_images(images), sd.prepare_targets(labels, "background"))
        nbytes = dataset.nbytes()
    else:
        dataset = RefVOCSegDataset(True, crop, voc_dir)
        loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True, num_workers=workers)
        start_epoch = lambda e: iter(loader)
        convert = lambda images, labels: (images, labels)
        nbytes = sum(t.numel() * t.element_size() for t in [*dataset.features, *dataset.labels, dataset.colormap2label])
    load_s = time.perf_counter() - t0
    loader_rates, full_rates = [], []
    for p in range(passes):
        n, t_loader, t_convert = 0, 0.0, 0.0
        t = time.perf_counter()
        for images, labels in start_epoch(p):
            t1 = time.perf_counter()
            t_loader += t1 - t
            x, y = convert(images, labels)
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[-2:] == y.shape[-2:]
            n += len(x)
            t = time.perf_counter()
            t_convert += t - t1
        loader_rates.append(n / t_loader)
        full_rates.append(n / (t_loader + t_convert))
        if p == 0:   # the dataset's memory, without the last batch (a training loop would have dropped it)
            images = labels = x = y = None
            after = {key: proc_status_mb(key) for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}

    def growth(key: str, start_key: str | None = None) -> float | None:
        start = before[start_key or key]
        return None if after[key] is None or start is None else after[key] - start
    return {"samples_per_s": statistics.median(loader_rates), "samples_per_s_to_float": statistics.median(full_rates),
            "samples_per_s_passes": loader_rates, "samples_per_s_to_float_passes": full_rates, "samples_per_pass": n,
            "dataset_mb": growth("VmRSS"), "peak_growth_mb": growth("VmHWM", "VmRSS") if hwm_reset else None,
            "anon_growth_mb": growth("RssAnon"), "file_growth_mb": growth("RssFile"),
            "tensor_mb": nbytes / 2 ** 20, "load_s": load_s, "images": len(dataset), "workers": workers}


def bench_data(args) -> dict:
    """Both loaders on the same generated tree, each in a fresh process, so that the RSS growth is its own."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-voc-"))
    try:
        t = time.perf_counter()
        voc_dir = make_bench_tree(tmp, args.data_images)
        out = {"images": args.data_images, "image_hw": list(VOC_IMAGE_HW), "crop": list(args.data_crop),
               "batch_size": args.data_batch, "tree_s": time.perf_counter() - t}
        for kind in ("project", "reference"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--data-worker", kind, "--data-tree", str(voc_dir),
                   "--data-crop", *map(str, args.data_crop), "--data-batch", str(args.data_batch),
                   "--data-passes", str(args.data_passes), "--data-workers", str(args.data_workers)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                out[kind] = {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
            else:
                out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        p, ref = out["project"], out["reference"]
        if p.get("dataset_mb") is not None and ref.get("dataset_mb"):
            out["memory_ratio"] = p["dataset_mb"] / ref["dataset_mb"]
            out["speed_ratio"] = p["samples_per_s"] / ref["samples_per_s"]
            out["speed_ratio_to_float"] = p["samples_per_s_to_float"] / ref["samples_per_s_to_float"]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- 4. train: the training step, plain vs fast ----------------------------------------------------------------------

def fast_flags(device: torch.device) -> dict:
    """What training picks on this device for the VOC train split with every speed flag at 'auto'."""
    return resolve_speed_flags("auto", "auto", "auto", device, VOC_TRAIN_BYTES)


def variant_flags(name: str, device: torch.device) -> dict:
    """plain: the original repository's loop (fp32, contiguous, batch from the CPU); fast: training's defaults here;
    compile: fast + torch.compile; bf16 / fp16 / cl / bf16_cl: explicit settings, to look for a better default."""
    plain = {"amp_dtype": None, "channels_last": False, "data_on_device": False, "compile": False}
    if name == "plain":
        return plain
    if name in ("fast", "compile"):
        return {**fast_flags(device), "compile": name == "compile"}
    explicit = {"bf16": dict(amp_dtype=torch.bfloat16), "fp16": dict(amp_dtype=torch.float16),
                "cl": dict(channels_last=True), "bf16_cl": dict(amp_dtype=torch.bfloat16, channels_last=True)}
    return {**plain, "data_on_device": device.type == "cuda", **explicit[name]}


def apply_ceiling(out: dict, peak: dict) -> None:
    """Each variant's GFLOP/s as a fraction of the measured matmul ceilings (fp32; bf16 alongside)."""
    for variant in [k[:-len("_gflops")] for k in out if k.endswith("_gflops")]:
        if peak.get("gflops"):
            out[f"{variant}_fraction_of_peak"] = out[f"{variant}_gflops"] / peak["gflops"]
        if peak.get("bf16_gflops"):
            out[f"{variant}_fraction_of_bf16_matmul"] = out[f"{variant}_gflops"] / peak["bf16_gflops"]
    if "fast_fraction_of_peak" in out:
        out["fraction_of_peak"] = out["fast_fraction_of_peak"]


def prepare_variant(variant: str, base: torch.nn.Module, setup: dict, images: torch.Tensor, labels: torch.Tensor,
                    ctx: DistributedContext, warmup: int):
    """One variant's network, optimizer and batch, set up as training does; its step function and warm-up record."""
    device, flags = ctx.device, variant_flags(variant, ctx.device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    net = wrap_for_training(copy.deepcopy(base), ctx, flags["channels_last"], False, flags["compile"])
    net.train()
    optimizer = sd.make_optimizer(setup["optimizer"], net.parameters(), setup["lr"], setup["wd"])
    scaler = torch.amp.GradScaler(device.type) if flags["amp_dtype"] == torch.float16 else None
    x, y = (images.to(device), labels.to(device)) if flags["data_on_device"] else (images, labels)

    def step():
        torch.backends.cudnn.benchmark = variant != "plain"   # the original loop used cuDNN's default heuristics
        return sd.train_step(net, optimizer, x, y, device=device, void=setup["void"], reduction=setup["loss"],
                             amp_dtype=flags["amp_dtype"], scaler=scaler, channels_last=flags["channels_last"],
                             world_size=ctx.world_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    losses = [step()[0] for _ in range(warmup + (2 if flags["compile"] else 0))]
    sync(device)
    info = {"warmup_s": time.perf_counter() - t, "warmup_losses": losses, "times": [], "flags": flags_json(flags)}
    if device.type == "cuda":   # this variant's own: its weights, optimizer state, batch and activations
        info["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30
        info["peak_mem_total_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return step, info


def bench_train_model(name: str, args, ctx: DistributedContext, peak: dict) -> dict:
    """Every variant of one model's train step, timed in interleaved rounds; speedups are per-round ratios to plain."""
    device, setup = ctx.device, MODEL_DEFAULTS[name]
    crop, batch = tuple(args.crop), args.batch
    torch.manual_seed(0)
    base = keep_transposed_convs_fp32_on_cpu(sd.build_model(name, len(sd.VOC_CLASSES), "none"))   # as training does
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *crop), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(sd.VOC_CLASSES), (batch, *crop), dtype=torch.uint8, generator=g)
    labels[:, : crop[0] // 8] = sd.VOID       # some void pixels, as in VOC
    t = time.perf_counter()
    flops = train_flops_per_image(base.to(device), crop, device)
    base = base.cpu()
    out = {"crop": list(crop), "batch_size": batch, **{k: setup[k] for k in ("optimizer", "lr", "wd", "loss", "void")},
           "flops_per_image": flops, "gflop_per_step": flops * batch / 1e9, "flop_count_s": time.perf_counter() - t}
    runs = {}
    for variant in args.variants:
        try:
            runs[variant] = prepare_variant(variant, base, setup, images, labels, ctx, args.warmup)
        except Exception as e:   # e.g. torch.compile failing on this machine: record it, keep the others
            traceback.print_exc()
            out[f"{variant}_error"] = short_error(e)
            free_cuda_cache(device)
    # Interleaved rounds: every variant sees the same background load. Fewer U-Net steps on the CPU (each is slow).
    steps = args.steps or (5 if device.type == "cuda" else {"fcn": 3}.get(name, 1))
    rounds = args.rounds or (5 if device.type == "cuda" or name == "fcn" else 3)
    for r in range(rounds):
        order = list(runs.items())
        for variant, (step, info) in (order if r % 2 == 0 else order[::-1]):   # ABBA: a load drift cancels out
            if f"{variant}_error" in out:
                continue
            try:
                sync(device)
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(device)
                info["times"].append((time.perf_counter() - t) / steps)
            except Exception as e:
                out[f"{variant}_error"] = short_error(e)
                free_cuda_cache(device)
    bf16_peak = bf16_peak_flops(device)
    for variant, (_, info) in runs.items():
        if not info["times"]:
            continue
        img_s = batch / statistics.median(info["times"])
        out.update({f"{variant}_img_s": img_s, f"{variant}_best_img_s": batch / min(info["times"]),
                    f"{variant}_step_s": info["times"], f"{variant}_gflops": img_s * flops / 1e9,
                    f"{variant}_warmup_s": info["warmup_s"], f"{variant}_flags": info["flags"]})
        if "peak_mem_gib" in info:
            out[f"{variant}_peak_mem_gib"] = info["peak_mem_gib"]
            out[f"{variant}_peak_mem_total_gib"] = info["peak_mem_total_gib"]
        if bf16_peak:
            out[f"{variant}_fraction_of_bf16_peak"] = img_s * flops / bf16_peak
    plain = runs["plain"][1]["times"] if "plain" in runs else []
    for variant, (_, info) in runs.items():
        if variant != "plain" and plain and len(info["times"]) == len(plain):
            # paired per round, then the median: robust against load that drifts during the run
            out[f"{variant}_speedup"] = statistics.median(p / f for p, f in zip(plain, info["times"]))
    if "fast_speedup" in out:
        out["speedup"] = out["fast_speedup"]
    apply_ceiling(out, peak)
    out["steps_per_round"], out["rounds"] = steps, rounds
    del runs
    free_cuda_cache(device)
    return out


# --- 5. Busy: the train step on a CPU that another process shares ---------------------------------------------------

COMPETITOR = "import torch; torch.set_num_threads(2); a = torch.randn(1024, 1024)\nwhile True: a @ a"


BUSY_POLICIES = ((None, "default"), ("ACTIVE", "spin"), ("PASSIVE", "sleep"), ("load", "load"))


def busy_child(model: str, policy: str | None, busy: bool, args) -> dict:
    """The fast train step of ``model`` in a fresh process with OMP_WAIT_POLICY=``policy`` (None: unset, OpenMP's
    default; "load": unset, threads chosen from the load as the scripts do), optionally while a competing process
    runs a 2-thread matmul loop (spinning, as most programs' do)."""
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR],
                                  env=dict(os.environ, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="2")) if busy else None
    try:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--sections", "train", "--variants", "fast",
                   "--models", model, "--crop", *map(str, args.crop), "--batch", str(args.batch), "--json", f.name]
            if policy == "load":
                cmd, policy = cmd + ["--threads-for-load"], None
            if busy:
                time.sleep(2)   # the competitor at full speed first
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            r = subprocess.run(cmd, env=dict(env, **({"OMP_WAIT_POLICY": policy} if policy else {})),
                               capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
            step = json.loads(Path(f.name).read_text())["train_step"][model]
            return {"img_s": step.get("fast_img_s"), "error": step.get("fast_error")}
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()


def bench_busy(args) -> dict:
    """Quiet and busy images/s per model and wait policy, and busy / quiet (a fair share of 2 cores is 0.5)."""
    out = {}
    for model in args.models:
        for policy, name in BUSY_POLICIES:
            if name not in args.busy_policies:
                continue
            quiet, busy = busy_child(model, policy, False, args), busy_child(model, policy, True, args)
            row = {"quiet_img_s": quiet.get("img_s"), "busy_img_s": busy.get("img_s")}
            if row["quiet_img_s"] and row["busy_img_s"]:
                row["busy_over_quiet"] = row["busy_img_s"] / row["quiet_img_s"]
            row.update({f"{k}_error": v.get("error") for k, v in (("quiet", quiet), ("busy", busy)) if v.get("error")})
            out[f"{model}_{name}"] = row
            print(f"  {model:5s} {name:7s}: quiet {fmt(row['quiet_img_s'], '.2f')} img/s, busy "
                  f"{fmt(row['busy_img_s'], '.2f')} img/s, busy/quiet {fmt(row.get('busy_over_quiet'), '.2f')}",
                  flush=True)
    return out


# --- Report ----------------------------------------------------------------------------------------------------------

def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_table(result: dict) -> None:
    print(f"\ndevice: {result['device']}  (torch {result['torch']}, {result['threads']} threads)")
    peak = result.get("peak", {})
    if "error" in peak:
        print(f"matmul ceiling: error: {peak['error']}")
    elif peak:
        datasheet = peak.get("bf16_datasheet_gflops")
        print(f"matmul ceiling: fp32 {fmt(peak['gflops'])} GFLOP/s (n={peak['n']}), bf16 {fmt(peak['bf16_gflops'])} "
              "GFLOP/s" + (f", bf16 datasheet {datasheet:.0f} GFLOP/s" if datasheet else ""))
    if "eval" in result:
        print(f"\nfull-resolution eval ({VOC_IMAGE_HW[0]}x{VOC_IMAGE_HW[1]}):")
    for name, e in result.get("eval", {}).get("per_model", {}).items():
        if "error" in e:
            print(f"  {name}: error: {e['error']}")
            continue
        memory = f", peak mem {e['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in e else ""
        print(f"  {name:<5} {e['img_s']:8.2f} img/s  (batch {e['batch_size']}, amp {e['amp']}, "
              f"channels_last {e['channels_last']}{memory})")
    data = result.get("data", {})
    if "error" in data:
        print(f"\ndata: error: {data['error']}")
    elif data:
        print(f"\ndata ({data['images']} images {data['image_hw']}, crop {data['crop']}, batch {data['batch_size']}):\n"
              f"  {'loader':<10} {'samples/s':>10} {'to float':>9} {'dataset MB':>11} {'peak MB':>8} "
              f"{'tensors MB':>11} {'load s':>7}")
        for kind in ("project", "reference"):
            d = data[kind]
            print(f"  {kind:<10} error: {d['error']}" if "error" in d else
                  f"  {kind:<10} {fmt(d['samples_per_s']):>10} {fmt(d['samples_per_s_to_float']):>9} "
                  f"{fmt(d['dataset_mb'], '.0f'):>11} {fmt(d['peak_growth_mb'], '.0f'):>8} "
                  f"{fmt(d['tensor_mb'], '.0f'):>11} {fmt(d['load_s'], '.2f'):>7}")
        if "memory_ratio" in data:
            print(f"  project / reference: memory {data['memory_ratio']:.2f}x, samples/s {data['speed_ratio']:.2f}x "
                  f"(to float32 + int64 on the CPU: {data['speed_ratio_to_float']:.2f}x)")
    if result.get("train_step"):
        print("\ntrain step (images/s, median of interleaved rounds; GFLOP/s; fraction of the fp32 matmul ceiling):")
    for name, r in result.get("train_step", {}).items():
        if "flops_per_image" not in r:
            print(f"  {name}: error: {r['error']}")
            continue
        print(f"  {name} {r['crop'][0]}x{r['crop'][1]} batch {r['batch_size']}, {r['flops_per_image'] / 1e9:.1f} "
              f"GFLOP/image (fwd+bwd), {r['optimizer']} lr {r['lr']:g}, loss {r['loss']}, void {r['void']}:")
        for v in [k[:-len("_img_s")] for k in r if k.endswith("_img_s") and not k.endswith("best_img_s")]:
            print(f"    {v:<8} {r[f'{v}_img_s']:8.2f} img/s  {r[f'{v}_gflops']:9.1f} GFLOP/s  "
                  f"{fmt(r.get(f'{v}_fraction_of_peak'), '.1%'):>6} of ceiling"
                  + (f"  x{r[f'{v}_speedup']:.2f} vs plain" if f"{v}_speedup" in r else "")
                  + (f"  {r[f'{v}_fraction_of_bf16_peak']:.1%} of bf16 peak" if f"{v}_fraction_of_bf16_peak" in r
                     else "")
                  + (f"  peak mem {r[f'{v}_peak_mem_gib']:.2f} GiB" if f"{v}_peak_mem_gib" in r else ""))
        for k in [k for k in r if k.endswith("_error")]:
            print(f"    {k[:-len('_error')]} error: {r[k]}")
    print()


# --- Main ------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here (rewritten after every section)")
    p.add_argument("--quick", action="store_true",
                   help="128 x 128 crops, batch 8, fewer eval images on the CPU: a run in < 5 minutes")
    p.add_argument("--device", help="cuda, cpu, ... (default: the first that exists)")
    p.add_argument("--sections", nargs="+", default=["peak", "eval", "data", "train"],
                   choices=["peak", "eval", "data", "train", "busy"], help="which to run (always in this order)")
    p.add_argument("--models", nargs="+", default=list(MODEL_DEFAULTS), choices=list(MODEL_DEFAULTS))
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                   help="train-step crop (default: 320 480; 128 128 with --quick on the CPU)")
    p.add_argument("--batch", type=int, help="train-step batch (default: 32 on a GPU, 4 on the CPU, 8 with --quick)")
    p.add_argument("--variants", nargs="+", choices=["plain", "fast", "compile", "bf16", "fp16", "cl", "bf16_cl"],
                   help="train-step variants (default: plain fast, + compile on CUDA or with --compile)")
    p.add_argument("--compile", action="store_true", help="add the compile variant off CUDA")
    p.add_argument("--warmup", type=int, help="warm-up steps per variant")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default: 5; 3 for the UNet on the CPU)")
    p.add_argument("--steps", type=int,
                   help="steps per variant per round (default: 5 on a GPU; on the CPU 3 for the FCN, 1 for the UNet)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--busy-policies", nargs="+", choices=[name for _, name in BUSY_POLICIES],
                   default=[name for _, name in BUSY_POLICIES], help="the busy section's thread settings: OpenMP's "
                   "default, always spin, always sleep, threads from the load (the scripts' default)")
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
    p.add_argument("--data-worker", choices=["project", "reference"], help=argparse.SUPPRESS)   # the data section's
    p.add_argument("--data-tree", help=argparse.SUPPRESS)                                       # child process
    return p.parse_args(argv)


def fill_defaults(args, device: torch.device) -> None:
    cuda = device.type == "cuda"
    defaults = {"crop": [128, 128] if args.quick and not cuda else [320, 480],
                "batch": 32 if cuda else (8 if args.quick else 4),
                "variants": ["plain", "fast", "compile"] if cuda or args.compile else ["plain", "fast"],
                "warmup": 3 if cuda else 1, "peak_n": 8192 if cuda else 2048,
                "eval_images": 64 if cuda else (4 if args.quick else 8), "eval_batch": 32 if cuda else 4,
                "eval_rounds": 3 if cuda else 1}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def describe_run(args, device: torch.device) -> dict:
    """The head of the JSON: the machine, torch, the command and the fast path's flags."""
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "quick": args.quick, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "fast_path": flags_json(fast_flags(device))}
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.threads_for_load:   # the choice at the start; the scripts look again every 10 s
        threads_for_load(None, torch.device("cpu"))
    if args.data_worker:
        print(json.dumps(data_worker(args.data_worker, args.data_tree, tuple(args.data_crop), args.data_batch,
                                     args.data_passes, args.data_workers)))
        return 0
    ctx = DistributedContext(args.device)   # one process: the device, and what wrap_for_training needs
    device = ctx.device
    fill_defaults(args, device)
    result = describe_run(args, device)
    print(f"bench on {result['device']}; train crop {args.crop}, batch {args.batch}, variants {args.variants}",
          flush=True)
    started = time.perf_counter()

    def save() -> None:
        if args.json:
            write_json(result, args.json)

    def section(name: str, fn) -> dict:
        t = time.perf_counter()
        print(f"[{t - started:6.1f}s] {name} ...", flush=True)
        try:
            value = fn()
        except Exception as e:
            traceback.print_exc()
            value = {"error": short_error(e)}
        print(f"[{time.perf_counter() - started:6.1f}s] {name} done in {time.perf_counter() - t:.1f}s", flush=True)
        return value

    peak = {}
    if "peak" in args.sections or "train" in args.sections:
        peak = result["peak"] = section("peak (matmul ceiling)", lambda: bench_peak(device, args.peak_n))
        result["peak_gflops"] = peak.get("gflops")
        save()

    if "eval" in args.sections:
        per_model = {}
        result["eval"] = {"per_model": per_model}
        for name in args.models:
            per_model[name] = section(f"eval {name}", lambda: bench_eval(name, args, device))
            save()
        measured = [m for m in per_model if "img_s" in per_model[m]]
        if measured:   # the headline number: the project's own model (the U-Net) when it was measured
            chosen = "unet" if "unet" in measured else measured[0]
            result["eval"].update(img_s=per_model[chosen]["img_s"], model=chosen)
            save()

    if "data" in args.sections:
        result["data"] = section("data", lambda: bench_data(args))
        save()

    if "train" in args.sections:
        result["train_step"] = {}
        for name in args.models:
            result["train_step"][name] = section(f"train step {name}",
                                                 lambda: bench_train_model(name, args, ctx, peak))
            save()
        if "gflops" in peak and device.type == "cpu":
            # A shared CPU can hide its ceiling during a one-second measurement: measure again, keep the higher one
            # (the fractions of the ceiling then only get more conservative).
            again = section("peak again", lambda: bench_peak(device, args.peak_n))
            for key in ("gflops", "bf16_gflops"):
                peak[f"{key}_runs"] = [peak.get(key), again.get(key)]
                peak[key] = max(v for v in peak[f"{key}_runs"] if v)
            result["peak_gflops"] = peak["gflops"]
            for r in result["train_step"].values():
                apply_ceiling(r, peak)
            save()

    if "busy" in args.sections:
        result["busy"] = section("busy CPU", lambda: bench_busy(args))
        save()

    result["seconds"] = time.perf_counter() - started
    if device.type == "cpu":
        result["load_avg_end"] = os.getloadavg()
    save()
    print_table(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
