"""Section 3, data: samples/s and memory of the project's loader vs the book's, each in its own process, on a generated
VOC-sized tree (JPEG + palette PNG).

    python -m benchmarks.data project|reference TREE --crop H W --batch N --passes P --workers W

measures one loader on a tree that the section made, in this process, and prints its JSON as the last line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

import some_define as sd
from benchmarks.common import VOC_IMAGE_HW, fmt, run_child
from support.cli import ArgumentParser
from support.data import read_split, voc_palette
from support.data import training_batches

LOADERS = ("project", "reference")


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


class BookVOCSegDataset(torch.utils.data.Dataset):
    """The baseline: the book's VOC dataset (d2l, "Semantic Segmentation and the Dataset") where it differs from
    some_define's: the book's reader (torchvision, labels as RGB), float32 normalised images kept in memory, and the
    labels mapped per item through an int64 colour table (128 MB)."""

    def __init__(self, crop_size: tuple[int, int], voc_dir: str | Path):
        self.crop_size = crop_size
        # The book's int64 table (128 MB); made first, so that the uint8 one it comes from adds nothing to the peak.
        self.colormap2label = sd.voc_colormap2label().long()
        # The book's reader: torchvision decodes to channels-last strided tensors, and the float32 images keep that
        # layout, which is part of their speed (benchmarks/RESULTS.md). Every generated image is larger than the
        # crop, so the book's filter of smaller ones would keep them all.
        files = sd.voc_split_files(voc_dir, "train")
        rgb = torchvision.io.image.ImageReadMode.RGB
        features = [torchvision.io.read_image(str(image)) for _, image, _ in files]
        self.labels = [torchvision.io.read_image(str(label), rgb) for _, _, label in files]
        normalize = torchvision.transforms.Normalize(mean=sd.IMAGENET_MEAN, std=sd.IMAGENET_STD)
        self.features = [normalize(feature.float() / 255) for feature in features]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        feature, label = sd.voc_rand_crop(self.features[idx], self.labels[idx], *self.crop_size)
        return feature, sd.voc_label_indices(label, self.colormap2label)

    def __len__(self) -> int:
        return len(self.features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.features, *self.labels, self.colormap2label])


def open_loader(kind: str, voc_dir: str, crop: tuple[int, int], batch: int, workers: int
                ) -> tuple[Callable[[int], Iterable], Callable, torch.utils.data.Dataset]:
    """(epoch -> its batches, what makes a batch float32 images and int64 targets, the dataset) of one loader.
    The project hands the training loop uint8 crops, normalised later on the training device; the book float32
    crops and int64 targets."""
    if kind == "project":   # what training reads and iterates
        dataset = read_split(voc_dir, "train", sd.VOC_COLORMAP, crop_size=crop)
        sampler = sd.RandomCropBatchSampler(dataset, batch, seed=0)
        batches = training_batches(dataset, sampler, torch.device("cpu"), False, workers)

        def start_epoch(e: int) -> Iterable:
            sampler.set_epoch(e)
            return batches()
        return start_epoch, lambda x, y: (sd.normalize_images(x), sd.prepare_targets(y, "background")), dataset
    dataset = BookVOCSegDataset(crop, voc_dir)
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True, num_workers=workers)
    return lambda e: iter(loader), lambda x, y: (x, y), dataset


def proc_status_mb(*keys: str) -> dict[str, float | None]:
    """Fields of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {key: int(fields[key].split()[0]) / 1024 for key in keys}
    except (OSError, KeyError):
        return dict.fromkeys(keys)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def data_worker(kind: str, voc_dir: str, crop: tuple[int, int], batch: int, passes: int, workers: int) -> dict:
    """In its own process: read the split, one pass (then the memory), more passes for the rate.

    ``samples_per_s`` counts what each loader hands the training loop; ``samples_per_s_to_float`` adds, for the
    project, the conversion to float32 images and int64 targets done here on the CPU, so that both end alike."""
    torch.manual_seed(0)
    before = proc_status_mb("VmRSS", "RssAnon", "RssFile")
    hwm_reset = reset_peak_rss()
    t0 = time.perf_counter()
    start_epoch, convert, dataset = open_loader(kind, voc_dir, crop, batch, workers)
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
            after = proc_status_mb("VmRSS", "RssAnon", "RssFile", "VmHWM")

    def growth(key: str, start_key: str | None = None) -> float | None:
        start = before[start_key or key]
        return None if after[key] is None or start is None else after[key] - start
    return {"samples_per_s": statistics.median(loader_rates), "samples_per_s_to_float": statistics.median(full_rates),
            "samples_per_s_passes": loader_rates, "samples_per_s_to_float_passes": full_rates, "samples_per_pass": n,
            "dataset_mb": growth("VmRSS"), "peak_growth_mb": growth("VmHWM", "VmRSS") if hwm_reset else None,
            "anon_growth_mb": growth("RssAnon"), "file_growth_mb": growth("RssFile"),
            "tensor_mb": dataset.nbytes() / 2 ** 20, "load_s": load_s, "images": len(dataset), "workers": workers}


def bench_data(args: argparse.Namespace) -> dict:
    """Both loaders on the same generated tree, each in a fresh process, so that the RSS growth is its own."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-voc-"))
    try:
        t = time.perf_counter()
        voc_dir = make_bench_tree(tmp, args.data_images)
        out = {"images": args.data_images, "image_hw": list(VOC_IMAGE_HW), "crop": list(args.data_crop),
               "batch_size": args.data_batch, "tree_s": time.perf_counter() - t}
        for kind in LOADERS:
            out[kind] = run_child("data", [kind, str(voc_dir), "--crop", *map(str, args.data_crop),
                                           "--batch", str(args.data_batch), "--passes", str(args.data_passes),
                                           "--workers", str(args.data_workers)], timeout=900)
        p, ref = out["project"], out["reference"]
        if p.get("dataset_mb") is not None and ref.get("dataset_mb"):
            out["memory_ratio"] = p["dataset_mb"] / ref["dataset_mb"]
            out["speed_ratio"] = p["samples_per_s"] / ref["samples_per_s"]
            out["speed_ratio_to_float"] = p["samples_per_s_to_float"] / ref["samples_per_s_to_float"]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_data(data: dict) -> None:
    """A row per loader, then the ratios."""
    if "error" in data:
        print(f"\ndata: error: {data['error']}")
        return
    print(f"\ndata ({data['images']} images {data['image_hw']}, crop {data['crop']}, batch {data['batch_size']}):\n"
          f"  {'loader':<10} {'samples/s':>10} {'to float':>9} {'dataset MB':>11} {'peak MB':>8} "
          f"{'tensors MB':>11} {'load s':>7}")
    for kind in LOADERS:
        d = data[kind]
        print(f"  {kind:<10} error: {d['error']}" if "error" in d else
              f"  {kind:<10} {fmt(d['samples_per_s']):>10} {fmt(d['samples_per_s_to_float']):>9} "
              f"{fmt(d['dataset_mb'], '.0f'):>11} {fmt(d['peak_growth_mb'], '.0f'):>8} "
              f"{fmt(d['tensor_mb'], '.0f'):>11} {fmt(d['load_s'], '.2f'):>7}")
    if "memory_ratio" in data:
        print(f"  project / reference: memory {data['memory_ratio']:.2f}x, samples/s {data['speed_ratio']:.2f}x "
              f"(to float32 + int64 on the CPU: {data['speed_ratio_to_float']:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    """The child process of bench_data: one loader, its JSON on the last line."""
    p = ArgumentParser(description="one loader of the data section, in this process (JSON on stdout)")
    p.add_argument("loader", choices=LOADERS)
    p.add_argument("tree", help="a VOC2012 folder made by make_bench_tree")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--passes", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    a = p.parse_args(argv)
    print(json.dumps(data_worker(a.loader, a.tree, tuple(a.crop), a.batch, a.passes, a.workers)))


if __name__ == "__main__":
    main()
