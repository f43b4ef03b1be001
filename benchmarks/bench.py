#!/usr/bin/env python3
"""Speed and memory benchmark of the project's data path, training step and evaluation (not a timed test).

    python benchmarks/bench.py --quick --json /tmp/bench.json     # a CPU run in under 5 minutes
    python benchmarks/bench.py --json bench_gpu.json              # on a GPU: 320 x 480, batch 32, plain/fast/compile

Sections (each fails soft: an error is recorded in the JSON and the next section runs):
 1. data        samples/s and dataset memory of the project's loader vs a book-style reference loader, on a generated
                VOC-sized tree (300 images of 500 x 375, JPEG + palette PNG), each loader in its own process
 2. train_step  images/s of the plain loop (fp32, contiguous, batch from the CPU: the seed's) vs the project's default
                fast path on this device (what train() picks with the auto flags), interleaved, ratio printed;
                on CUDA also torch.compile, peak memory and the fraction of the bf16 peak
 3. eval        full-resolution (375 x 500) prediction, images/s, with the predict scripts' default flags
 4. peak        a large fp32 matmul's GFLOP/s on this device: the ceiling each train step is compared with
                (fraction_of_peak = the fast path's GFLOP/s / this); a bf16 matmul's alongside

They run in the order peak, eval, data, train (the one that can run long, with torch.compile, last); on the CPU the
ceiling is measured again after the train steps and the higher value kept. The JSON is rewritten after every section,
so a run cut short still leaves what it measured. Timings on a CPU that other work shares are noisy: the load average
at the start and the end is recorded, the variants are interleaved, and speedups are medians of per-round ratios.
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import some_define as sd  # noqa: E402

VOC_TRAIN_IMAGES = 1464          # VOC2012 segmentation train split: used to decide data_on_device as train() would
VOC_IMAGE_HW = (375, 500)        # the usual VOC image (height, width)
MODEL_SETUP = {                  # as the scripts train them: origin_train.py (fcn), my_train.py (unet)
    "fcn": dict(optimizer="sgd", lr=1e-3, wd=1e-3, loss="sum", void="background"),
    "unet": dict(optimizer="adam", lr=1e-4, wd=1e-3, loss="mean", void="ignore"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------

def proc_status_mb(key: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
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


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 2000 else text[:2000] + " ..."


def write_json_file(data: dict, path: str | None) -> None:
    if path:
        sd.write_json(data, path)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: a generated VOC-sized tree, the project's loader, a book-style reference loader
# ---------------------------------------------------------------------------------------------------------------------

def make_bench_tree(root: Path, count: int, hw: tuple[int, int] = VOC_IMAGE_HW, seed: int = 0) -> Path:
    """``count`` photo-like JPEGs (smooth shading, objects, mild noise) with VOC palette PNG labels."""
    from PIL import ImageDraw
    voc_dir = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    palette = sd.voc_palette()
    names = []
    for k in range(count):
        base = rng.uniform(40, 200, 3).astype(np.float32)
        image = base + 40 * np.sin(xx[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3)) \
            + 30 * np.cos(yy[..., None] / rng.uniform(20, 80)) + rng.normal(0, 6, (h, w, 3))
        label_im = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(label_im)
        image_im = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        image_draw = ImageDraw.Draw(image_im)
        for _ in range(rng.randint(1, 4)):
            cls = int(rng.randint(1, len(sd.VOC_CLASSES)))
            x0, y0 = int(rng.randint(0, w - 60)), int(rng.randint(0, h - 60))
            x1, y1 = x0 + int(rng.randint(40, w // 2)), y0 + int(rng.randint(40, h // 2))
            color = tuple(int(c) for c in rng.randint(0, 256, 3))
            shape = draw.ellipse if rng.rand() < 0.5 else draw.rectangle
            (image_draw.ellipse if shape == draw.ellipse else image_draw.rectangle)([x0, y0, x1, y1], fill=color)
            shape([x0 - 2, y0 - 2, x1 + 2, y1 + 2], fill=sd.VOID)
            shape([x0, y0, x1, y1], fill=cls)
        label_im.putpalette(palette)     # 'L' + palette -> 'P', as VOC ships its labels
        name = f"bench_{k:04d}"
        image_im.save(voc_dir / "JPEGImages" / f"{name}.jpg", quality=90)
        label_im.save(voc_dir / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (voc_dir / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return voc_dir


# --- The book's loader (d2l, "Semantic Segmentation and the Dataset"), kept as the book writes it -------------------

def ref_read_voc_images(voc_dir: str, is_train: bool = True):
    """Read all VOC feature and label images (labels as RGB)."""
    txt_fname = os.path.join(voc_dir, 'ImageSets', 'Segmentation', 'train.txt' if is_train else 'val.txt')
    mode = torchvision.io.image.ImageReadMode.RGB
    with open(txt_fname, 'r') as f:
        images = f.read().split()
    features, labels = [], []
    for i, fname in enumerate(images):
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


def ref_voc_rand_crop(feature, label, height, width):
    """Randomly crop both feature and label images."""
    rect = torchvision.transforms.RandomCrop.get_params(feature, (height, width))
    feature = torchvision.transforms.functional.crop(feature, *rect)
    label = torchvision.transforms.functional.crop(label, *rect)
    return feature, label


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
        feature, label = ref_voc_rand_crop(self.features[idx], self.labels[idx], *self.crop_size)
        return (feature, ref_voc_label_indices(label, self.colormap2label))

    def __len__(self):
        return len(self.features)


def data_worker(kind: str, voc_dir: str, crop: tuple[int, int], batch: int, passes: int, workers: int) -> dict:
    """Runs in its own process: load the split, one pass (memory measured after it), more passes for the rate.

    Two rates: ``samples_per_s`` counts what the loader hands the training loop (the project: uint8 crops, which
    train_step normalises on the training device; the reference: float32 normalised crops and int64 targets), and
    ``samples_per_s_to_float`` adds, for the project, that conversion done here on the CPU (normalize_images and
    prepare_targets), so that both sides end with the same float32 images and int64 targets."""
    torch.manual_seed(0)
    rss0 = proc_status_mb("VmRSS")
    anon0, file0 = proc_status_mb("RssAnon"), proc_status_mb("RssFile")
    hwm_reset = reset_peak_rss()
    t0 = time.perf_counter()
    if kind == "project":
        dataset = sd.VOCSegDataset(*sd.read_voc_images(voc_dir, "train"), crop_size=crop)
        sampler = sd.RandomCropBatchSampler(dataset, batch, seed=0)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=sd.collate_crops,
                                             num_workers=workers)

        def start_epoch(e: int):
            sampler.set_epoch(e)

        def convert(images, labels):
            return sd.normalize_images(images), sd.prepare_targets(labels, "background")
        nbytes = dataset.nbytes()
    else:
        dataset = RefVOCSegDataset(True, crop, voc_dir)
        loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True, num_workers=workers)

        def start_epoch(e: int):
            pass

        def convert(images, labels):
            return images, labels
        nbytes = sum(t.numel() * t.element_size() for t in dataset.features + dataset.labels) \
            + dataset.colormap2label.numel() * dataset.colormap2label.element_size()
    load_s = time.perf_counter() - t0
    loader_rates, full_rates, samples = [], [], 0
    for p in range(passes):
        start_epoch(p)
        n, t_loader, t_convert = 0, 0.0, 0.0
        t = time.perf_counter()
        for images, labels in loader:
            t1 = time.perf_counter()
            t_loader += t1 - t
            x, y = convert(images, labels)
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[-2:] == y.shape[-2:]
            n += len(x)
            t = time.perf_counter()
            t_convert += t - t1
        loader_rates.append(n / t_loader)
        full_rates.append(n / (t_loader + t_convert))
        samples = n
        if p == 0:   # the dataset's memory: the last batch is dropped first, as a training loop would
            images = labels = x = y = None
            rss1 = proc_status_mb("VmRSS")
            hwm1 = proc_status_mb("VmHWM")
            anon1, file1 = proc_status_mb("RssAnon"), proc_status_mb("RssFile")
    return {"samples_per_s": statistics.median(loader_rates), "samples_per_s_to_float": statistics.median(full_rates),
            "samples_per_s_passes": loader_rates, "samples_per_s_to_float_passes": full_rates,
            "samples_per_pass": samples,
            "dataset_mb": rss1 - rss0 if rss0 is not None and rss1 is not None else None,
            "peak_growth_mb": hwm1 - rss0 if hwm_reset and hwm1 is not None else None,
            "anon_growth_mb": anon1 - anon0 if anon0 is not None and anon1 is not None else None,
            "file_growth_mb": file1 - file0 if file0 is not None and file1 is not None else None,
            "tensor_mb": nbytes / 2 ** 20, "load_s": load_s, "images": len(dataset), "workers": workers}


def bench_data(args) -> dict:
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
                out[kind] = {"error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]}
                print(r.stderr, file=sys.stderr)
                continue
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        p, ref = out.get("project", {}), out.get("reference", {})
        if "dataset_mb" in p and "dataset_mb" in ref and ref["dataset_mb"]:
            out["memory_ratio"] = p["dataset_mb"] / ref["dataset_mb"]
            out["speed_ratio"] = p["samples_per_s"] / ref["samples_per_s"]
            out["speed_ratio_to_float"] = p["samples_per_s_to_float"] / ref["samples_per_s_to_float"]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# 4. The machine's ceiling: a large matmul
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# 2. Train step
# ---------------------------------------------------------------------------------------------------------------------

def fast_flags(device: torch.device) -> dict:
    """What train() picks on this device with every speed flag left at 'auto' (the VOC train split's size decides
    data_on_device, as in train())."""
    auto = argparse.Namespace(amp="auto", channels_last="auto", data_on_device="auto")
    nbytes = VOC_TRAIN_IMAGES * VOC_IMAGE_HW[0] * VOC_IMAGE_HW[1] * 4
    return sd.resolve_speed_flags(auto, device, nbytes)


def variant_flags(name: str, device: torch.device) -> dict:
    """plain: the seed's loop (fp32, contiguous, batch comes from the CPU); fast: train()'s defaults here;
    compile: fast + torch.compile; bf16 / cl / bf16_cl: explicit settings, to look for a better CPU default."""
    plain = {"amp_dtype": None, "channels_last": False, "data_on_device": False, "compile": False}
    if name == "plain":
        return plain
    if name in ("fast", "compile"):
        return {**fast_flags(device), "compile": name == "compile"}
    explicit = {"bf16": dict(amp_dtype=torch.bfloat16), "fp16": dict(amp_dtype=torch.float16),
                "cl": dict(channels_last=True), "bf16_cl": dict(amp_dtype=torch.bfloat16, channels_last=True)}
    if name not in explicit:
        raise ValueError(f"unknown variant {name!r}")
    return {**plain, "data_on_device": device.type == "cuda", **explicit[name]}


def apply_ceiling(out: dict, peak: dict) -> None:
    """Each variant's achieved GFLOP/s as a fraction of the measured matmul ceilings (fp32; bf16 alongside)."""
    for key in [k for k in out if k.endswith("_gflops")]:
        variant = key[:-len("_gflops")]
        if peak.get("gflops"):
            out[f"{variant}_fraction_of_peak"] = out[key] / peak["gflops"]
        if peak.get("bf16_gflops"):
            out[f"{variant}_fraction_of_bf16_matmul"] = out[key] / peak["bf16_gflops"]
    if "fast_fraction_of_peak" in out:
        out["fraction_of_peak"] = out["fast_fraction_of_peak"]


def bench_train_model(name: str, args, device: torch.device, peak: dict) -> dict:
    setup = MODEL_SETUP[name]
    crop, batch = tuple(args.crop), args.batch
    torch.manual_seed(0)
    base = sd.build_model(name, len(sd.VOC_CLASSES), "none")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *crop), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(sd.VOC_CLASSES), (batch, *crop), dtype=torch.uint8, generator=g)
    labels[:, : crop[0] // 8] = sd.VOID       # some void pixels, as in VOC
    t = time.perf_counter()
    flops = sd.train_flops_per_image(base.to(device), crop, device)
    base = base.cpu()
    out = {"crop": list(crop), "batch_size": batch, "optimizer": setup["optimizer"], "loss": setup["loss"],
           "flops_per_image": flops, "gflop_per_step": flops * batch / 1e9, "flop_count_s": time.perf_counter() - t}
    ctx = SimpleNamespace(world_size=1, device=device)
    runs = {}
    for variant in args.variants:
        try:
            flags = variant_flags(variant, device)
            if variant == "compile" and device.type != "cuda" and not args.compile:
                continue
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            net = sd.wrap_for_training(copy.deepcopy(base), ctx, flags["channels_last"], False, flags["compile"])
            net.train()
            optimizer = sd.make_optimizer(setup["optimizer"], net.parameters(), setup["lr"], setup["wd"])
            scaler = torch.amp.GradScaler(device.type) if flags["amp_dtype"] == torch.float16 else None
            x, y = (images.to(device), labels.to(device)) if flags["data_on_device"] else (images, labels)

            def step(net=net, optimizer=optimizer, scaler=scaler, x=x, y=y, flags=flags, tuned=variant != "plain"):
                torch.backends.cudnn.benchmark = tuned   # the seed's loop ran with cuDNN's default heuristics
                return sd.train_step(net, optimizer, x, y, device=device, void=setup["void"],
                                     reduction=setup["loss"], amp_dtype=flags["amp_dtype"], scaler=scaler,
                                     channels_last=flags["channels_last"])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            losses = [step()[0] for _ in range(args.warmup + (2 if flags["compile"] else 0))]
            sync(device)
            info = {"warmup_s": time.perf_counter() - t, "warmup_losses": losses, "times": [],
                    "flags": {k: (str(v).replace("torch.", "") if k == "amp_dtype" else v) for k, v in flags.items()}}
            if device.type == "cuda":   # this variant's own: its weights, optimizer state, batch and activations
                info["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30
                info["peak_mem_total_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            runs[variant] = (step, info)
        except Exception as e:   # e.g. torch.compile failing on this machine: record it, keep the others
            traceback.print_exc()
            out[f"{variant}_error"] = short_error(e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # Interleaved rounds: every variant sees the same background load; the ratios are taken per round.
    # Default on the CPU: 3 FCN steps (about 0.5 s each at 128 x 128 x 8) or 1 UNet step (about 4 s) per round.
    steps = args.steps or (5 if device.type == "cuda" else {"fcn": 3}.get(name, 1))
    rounds = args.rounds or (5 if device.type == "cuda" or name == "fcn" else 3)
    for r in range(rounds):
        order = list(runs.items())
        for variant, (step, info) in (order if r % 2 == 0 else order[::-1]):   # ABBA: a load drift cancels out
            if info.get("failed"):
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
                info["failed"] = True
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    bf16_peak = sd.bf16_peak_flops(device)
    for variant, (step, info) in runs.items():
        if not info["times"]:
            continue
        med = statistics.median(info["times"])
        img_s = batch / med
        gflops = img_s * flops / 1e9
        out[f"{variant}_img_s"] = img_s
        out[f"{variant}_best_img_s"] = batch / min(info["times"])
        out[f"{variant}_step_s"] = info["times"]
        out[f"{variant}_gflops"] = gflops
        out[f"{variant}_warmup_s"] = info["warmup_s"]
        out[f"{variant}_flags"] = info["flags"]
        if "peak_mem_gib" in info:
            out[f"{variant}_peak_mem_gib"] = info["peak_mem_gib"]
            out[f"{variant}_peak_mem_total_gib"] = info["peak_mem_total_gib"]
        if bf16_peak:
            out[f"{variant}_fraction_of_bf16_peak"] = gflops * 1e9 / bf16_peak
    plain = runs.get("plain", (None, {"times": []}))[1]["times"]
    for variant, (step, info) in runs.items():
        if variant != "plain" and plain and len(info["times"]) == len(plain):
            # paired per round, then the median: robust against load that drifts during the run
            out[f"{variant}_speedup"] = statistics.median(p / f for p, f in zip(plain, info["times"]))
    if "fast_speedup" in out:
        out["speedup"] = out["fast_speedup"]
    apply_ceiling(out, peak)
    out["steps_per_round"], out["rounds"] = steps, rounds
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 3. Full-resolution evaluation
# ---------------------------------------------------------------------------------------------------------------------

def bench_eval(name: str, args, device: torch.device) -> dict:
    # What the predict scripts use by default (inference_flags), else the training defaults.
    flags = sd.inference_flags("auto", device) if hasattr(sd, "inference_flags") else fast_flags(device)
    torch.manual_seed(0)
    net = sd.build_model(name, len(sd.VOC_CLASSES), "none").to(device)
    if flags["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, *VOC_IMAGE_HW), dtype=torch.uint8, generator=g)
              for _ in range(args.eval_images)]

    def run(imgs):
        n = 0
        for _, pred in sd.predict_full_res(net, imgs, device, args.eval_batch, flags["amp_dtype"],
                                           flags["channels_last"]):
            pred.cpu()
            n += 1
        sync(device)
        return n
    run(images[:args.eval_batch])      # warm-up (cuDNN autotuning, allocator)
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


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------

def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def print_table(result: dict) -> None:
    print()
    print(f"device: {result['device']}  (torch {result['torch']}, {result['threads']} threads)")
    peak = result.get("peak", {})
    line = f"matmul ceiling: fp32 {fmt(peak.get('gflops'))} GFLOP/s (n={peak.get('n')})"
    if peak.get("bf16_gflops"):
        line += f", bf16 {fmt(peak['bf16_gflops'])} GFLOP/s"
    if peak.get("bf16_datasheet_gflops"):
        line += f", bf16 datasheet {fmt(peak['bf16_datasheet_gflops'], '.0f')} GFLOP/s"
    print(line)
    data = result.get("data", {})
    if data:
        print(f"\ndata ({data.get('images')} images {data.get('image_hw')}, crop {data.get('crop')}, "
              f"batch {data.get('batch_size')}):")
        print(f"  {'loader':<10} {'samples/s':>10} {'to float':>9} {'dataset MB':>11} {'peak MB':>8} "
              f"{'tensors MB':>11} {'load s':>7}")
        for kind in ("project", "reference"):
            d = data.get(kind, {})
            if "error" in d:
                print(f"  {kind:<10} error: {d['error']}")
                continue
            print(f"  {kind:<10} {fmt(d.get('samples_per_s')):>10} {fmt(d.get('samples_per_s_to_float')):>9} "
                  f"{fmt(d.get('dataset_mb'), '.0f'):>11} "
                  f"{fmt(d.get('peak_growth_mb'), '.0f'):>8} {fmt(d.get('tensor_mb'), '.0f'):>11} "
                  f"{fmt(d.get('load_s'), '.2f'):>7}")
        if "memory_ratio" in data:
            print(f"  project / reference: memory {data['memory_ratio']:.2f}x, samples/s {data['speed_ratio']:.2f}x "
                  f"(to float32 + int64 on the CPU: {data['speed_ratio_to_float']:.2f}x)")
        if "error" in data:
            print(f"  error: {data['error']}")
    ts = result.get("train_step", {})
    if ts:
        print("\ntrain step (images/s, median of interleaved rounds; GFLOP/s; fraction of the fp32 matmul ceiling):")
        for name, r in ts.items():
            if "error" in r and len(r) == 1:
                print(f"  {name}: error: {r['error']}")
                continue
            print(f"  {name} {r['crop'][0]}x{r['crop'][1]} batch {r['batch_size']}, "
                  f"{r['flops_per_image'] / 1e9:.1f} GFLOP/image (fwd+bwd):")
            for v in [k[:-len('_img_s')] for k in r if k.endswith("_img_s") and not k.endswith("best_img_s")]:
                line = (f"    {v:<8} {r[f'{v}_img_s']:8.2f} img/s  {r[f'{v}_gflops']:9.1f} GFLOP/s  "
                        f"{fmt(r.get(f'{v}_fraction_of_peak'), '.1%'):>6} of ceiling")
                if f"{v}_speedup" in r:
                    line += f"  x{r[f'{v}_speedup']:.2f} vs plain"
                if f"{v}_fraction_of_bf16_peak" in r:
                    line += f"  {r[f'{v}_fraction_of_bf16_peak']:.1%} of bf16 peak"
                if f"{v}_peak_mem_gib" in r:
                    line += f"  peak mem {r[f'{v}_peak_mem_gib']:.2f} GiB"
                print(line)
            for k in r:
                if k.endswith("_error"):
                    print(f"    {k[:-6]} error: {r[k]}")
    ev = result.get("eval", {})
    if ev:
        print(f"\nfull-resolution eval ({VOC_IMAGE_HW[0]}x{VOC_IMAGE_HW[1]}):")
        for name, e in ev.get("per_model", {}).items():
            if "error" in e:
                print(f"  {name}: error: {e['error']}")
            else:
                print(f"  {name:<5} {e['img_s']:8.2f} img/s  (batch {e['batch_size']}, amp {e['amp']}, "
                      f"channels_last {e['channels_last']}"
                      + (f", peak mem {e['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in e else "") + ")")
    print()


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here (rewritten after every section)")
    p.add_argument("--quick", action="store_true", help="128 x 128 crops, batch 8, fewer eval images on the CPU: a run in < 5 minutes")
    p.add_argument("--device", help="cuda, cpu, ... (default: the first that exists)")
    p.add_argument("--sections", nargs="+", default=["data", "peak", "train", "eval"],
                   choices=["data", "peak", "train", "eval"])
    p.add_argument("--models", nargs="+", default=["fcn", "unet"], choices=list(MODEL_SETUP))
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                   help="train-step crop (default: 320 480; 128 128 with --quick on the CPU)")
    p.add_argument("--batch", type=int, help="train-step batch (default: 32 on a GPU, 4 on the CPU, 8 with --quick)")
    p.add_argument("--variants", nargs="+",
                   help="plain fast compile bf16 fp16 cl bf16_cl (default: plain fast, + compile on CUDA)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile off CUDA")
    p.add_argument("--warmup", type=int, help="warm-up steps per variant")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default: 5; 3 for the UNet on the CPU)")
    p.add_argument("--steps", type=int, help="steps per variant per round (default: 5 on a GPU; on the CPU 3 for "
                   "the FCN, 1 for the UNet)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peak-n", type=int, help="matmul size (default: 2048 on the CPU, 8192 on a GPU)")
    p.add_argument("--eval-images", type=int)
    p.add_argument("--eval-batch", type=int)
    p.add_argument("--eval-rounds", type=int)
    p.add_argument("--data-images", type=int, default=300)
    p.add_argument("--data-crop", type=int, nargs=2, default=[320, 480])
    p.add_argument("--data-batch", type=int, default=32)
    p.add_argument("--data-passes", type=int, default=3)
    p.add_argument("--data-workers", type=int, default=0,
                   help="DataLoader workers on both sides (0, as train() uses on the CPU; RSS is the main process's)")
    # internal: one data loader in its own process
    p.add_argument("--data-worker", choices=["project", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--data-tree", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fill_defaults(args, device: torch.device) -> None:
    cuda = device.type == "cuda"
    quick_cpu = args.quick and not cuda
    defaults = {
        "crop": [320, 480] if not quick_cpu else [128, 128],
        "batch": 32 if cuda else (8 if args.quick else 4),
        "variants": ["plain", "fast", "compile"] if cuda or args.compile else ["plain", "fast"],
        "warmup": 3 if cuda else 1,
        "peak_n": 8192 if cuda else 2048,
        "eval_images": 64 if cuda else (4 if args.quick else 8),
        "eval_batch": 32 if cuda else 4,
        "eval_rounds": 3 if cuda else 1,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_worker:      # the child process of the data section
        print(json.dumps(data_worker(args.data_worker, args.data_tree, tuple(args.data_crop), args.data_batch,
                                     args.data_passes, args.data_workers)))
        return 0
    device = sd.try_all_gpus_or_cpu(args.device)
    fill_defaults(args, device)
    cpu_features = {}
    if device.type == "cpu":
        for feature in ("amx_tile", "avx512_bf16", "avx512"):
            check = getattr(torch.cpu, f"_is_{feature}_supported", None)
            cpu_features[feature] = bool(check()) if check else None
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "quick": args.quick, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "fast_path": {k: str(v).replace("torch.", "") if k == "amp_dtype" else v
                            for k, v in fast_flags(device).items()}}
    if cpu_features:
        result["cpu_features"] = cpu_features
    if device.type == "cpu":
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    result["device"] = f"cpu: {line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
                    break
        except OSError:
            pass
        try:
            result["load_avg_start"] = os.getloadavg()
        except OSError:
            pass
    print(f"bench on {result['device']}; train crop {args.crop}, batch {args.batch}, variants {args.variants}",
          flush=True)
    started = time.perf_counter()

    def section(name: str, fn):
        t = time.perf_counter()
        print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
        try:
            value = fn()
        except Exception as e:
            traceback.print_exc()
            value = {"error": short_error(e)}
        print(f"[{time.perf_counter() - started:6.1f}s] {name} done in {time.perf_counter() - t:.1f}s", flush=True)
        write_json_file(result, args.json)
        return value

    peak = {}
    if "peak" in args.sections or "train" in args.sections:
        def peak_fn():
            reps = 10 if device.type == "cuda" else 20
            p = matmul_gflops(device, args.peak_n, torch.float32, reps)
            # The bf16 ceiling too: what autocast can reach (tensor cores; AMX / AVX512-BF16 on recent x86 CPUs).
            p["bf16_gflops"] = matmul_gflops(device, args.peak_n, torch.bfloat16, reps)["gflops"]
            if device.type == "cuda":
                p["tf32_allowed_for_matmul"] = torch.backends.cuda.matmul.allow_tf32
                p["tf32_allowed_for_cudnn"] = torch.backends.cudnn.allow_tf32
                bf16 = sd.bf16_peak_flops(device)
                p["bf16_datasheet_gflops"] = bf16 / 1e9 if bf16 else None
            return p
        peak = section("peak (matmul ceiling)", peak_fn)
        result["peak"] = peak
        result["peak_gflops"] = peak.get("gflops")

    if "eval" in args.sections:
        result["eval"] = {"per_model": {}}
        for name in args.models:
            result["eval"]["per_model"][name] = section(f"eval {name}", lambda: bench_eval(name, args, device))
        per = result["eval"]["per_model"]
        chosen = "unet" if "img_s" in per.get("unet", {}) else next((m for m in per if "img_s" in per[m]), None)
        if chosen:   # the headline number: the project's own model (UNet) when it was measured
            result["eval"].update(img_s=per[chosen]["img_s"], model=chosen)
        write_json_file(result, args.json)

    # Before the train steps, whose torch.compile is the one part that can run long on a GPU.
    if "data" in args.sections:
        result["data"] = {}
        result["data"] = section("data", lambda: bench_data(args))
        write_json_file(result, args.json)

    if "train" in args.sections:
        result["train_step"] = {}
        for name in args.models:
            result["train_step"][name] = section(f"train step {name}", lambda: bench_train_model(name, args, device,
                                                                                                  peak))
            write_json_file(result, args.json)

    if "train" in args.sections and "gflops" in peak and device.type == "cpu":
        # A CPU shared with other work can hide its ceiling during a one-second measurement: measure it again after
        # the train steps and keep the higher one (the fractions then only get more conservative).
        again = section("peak again", lambda: {
            "gflops": matmul_gflops(device, args.peak_n, torch.float32, 20)["gflops"],
            "bf16_gflops": matmul_gflops(device, args.peak_n, torch.bfloat16, 20)["gflops"]})
        peak["gflops_runs"] = [peak["gflops"], again.get("gflops")]
        peak["bf16_gflops_runs"] = [peak.get("bf16_gflops"), again.get("bf16_gflops")]
        peak["gflops"] = max(v for v in peak["gflops_runs"] if v)
        peak["bf16_gflops"] = max(v for v in peak["bf16_gflops_runs"] if v)
        result["peak_gflops"] = peak["gflops"]
        for r in result["train_step"].values():
            apply_ceiling(r, peak)
        write_json_file(result, args.json)

    result["seconds"] = time.perf_counter() - started
    if device.type == "cpu":
        try:
            result["load_avg_end"] = os.getloadavg()
        except OSError:
            pass
    write_json_file(result, args.json)
    print_table(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
