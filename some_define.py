"""Shared code for "FCN vs U-Net" on PASCAL VOC 2012, following d2l's chapters
"Semantic Segmentation and the Dataset", "Transposed Convolution" and "Fully Convolutional Networks".

Sections, in reading order:
 1. Errors and small utilities
 2. VOC labels: classes, colormap, label images <-> class indices
 3. Finding and reading the dataset (uint8 in memory)
 4. Random crops (the same window for image and label)
 5. The synthetic demo dataset
 6. Models: the book's FCN with a bilinear-initialised transposed conv, and ResNetUNet
 7. Loss, metrics
 8. Training and evaluation loops
 9. Checkpoints
10. Figures
11. Command-line flags of the training scripts
12. The training run: processes, speed flags, resume, the epoch loop
13. Prediction and evaluation for the scripts
14. Your own images: full-resolution prediction to palette PNGs and overlays
"""
from __future__ import annotations

import argparse
import csv
import copy
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from torch import nn

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------------
# 1. Errors and small utilities
# ---------------------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A problem the user can fix (missing data, bad flag, bad file): printed as one line, exit code 2."""


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a script's main(); a UsageError becomes one line on stderr and exit 2 (``--debug`` shows the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UsageError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (the full usage stays behind --help)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see --help\n")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UsageError(f"{path}: cannot write there ({e.strerror}); choose another output path")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())   # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def try_all_gpus_or_cpu(name: str | None = None) -> torch.device:
    """CUDA first, then Apple's MPS, then the CPU; ``name`` (e.g. 'cpu', 'cuda:1') overrides."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# 2. VOC labels
# ---------------------------------------------------------------------------------------------------------------------

VOC_CLASSES = ['background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train',
               'tv/monitor']

VOC_COLORMAP = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128], [192, 0, 128],
                [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]]

VOID = 255                      # "difficult" or object-boundary pixels: no class
VOID_COLOR = (224, 224, 192)    # how VOC draws them


def voc_palette() -> list[int]:
    """The 256-entry palette of VOC's label PNGs (the colormap above, extended by VOC's bit-shuffling rule)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_colormap2label(colormap: Sequence[Sequence[int]] = VOC_COLORMAP) -> torch.Tensor:
    """A lookup table from an RGB colour to its class index, as the book builds it.

    Unlike the book, unknown colours (and VOC's boundary colour) map to VOID rather than 0, and the table is
    uint8 (16 MB) rather than int64 (128 MB)."""
    colormap2label = torch.full((256 ** 3,), VOID, dtype=torch.uint8)
    for i, colormap_ in enumerate(colormap):
        colormap2label[(colormap_[0] * 256 + colormap_[1]) * 256 + colormap_[2]] = i
    return colormap2label


def voc_label_indices(colormap: torch.Tensor, colormap2label: torch.Tensor) -> torch.Tensor:
    """Map an RGB label image (H x W x 3, uint8) to class indices (H x W)."""
    colormap = colormap.long()
    idx = (colormap[:, :, 0] * 256 + colormap[:, :, 1]) * 256 + colormap[:, :, 2]
    return colormap2label[idx]


def load_classes(path: str | os.PathLike) -> tuple[list[str], list[list[int]]]:
    """Read a class file: one class per line, ``name`` or ``name R G B``; a class's index is its line number.
    Classes without a colour get VOC's palette colour of their index, so a plain list of names draws like VOC."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--classes {path}: cannot read it ({e})")
    while lines and not lines[-1].strip():
        lines.pop()
    palette = voc_palette()
    names, colormap = [], []
    for index, line in enumerate(lines):
        fields = line.split()
        if not fields:   # a blank line would silently shift every later index
            raise UsageError(f"{path}, line {index + 1}: empty; each line is a class and its index is the line number")
        if len(fields) >= 4 and all(f.isdigit() for f in fields[-3:]):
            name, color = " ".join(fields[:-3]), [int(f) for f in fields[-3:]]
        else:
            name, color = " ".join(fields), palette[3 * index:3 * index + 3]
        if max(color) > 255:
            raise UsageError(f"{path}, line {index + 1}: colour {color} has a value above 255")
        names.append(name)
        colormap.append(color)
    if not 1 <= len(names) < VOID:
        raise UsageError(f"--classes {path}: {len(names)} classes; a dataset has 1 to {VOID} (label {VOID} is void)")
    for what, values in (("name", names), ("colour", [tuple(c) for c in colormap])):
        if len(set(values)) < len(values):   # RGB masks could not tell such classes apart
            twice = next(v for v in values if values.count(v) > 1)
            raise UsageError(f"--classes {path}: the {what} {twice} is given to two classes")
    return names, colormap


def colormap_lut(colormap: Sequence[Sequence[int]]) -> torch.Tensor:
    """256 x 3 uint8 colours by label value: the classes' colours, then VOC's boundary colour for void and the rest."""
    lut = torch.tensor([*colormap] + [VOID_COLOR] * (256 - len(colormap)), dtype=torch.uint8)
    lut[VOID] = torch.tensor(VOID_COLOR, dtype=torch.uint8)
    return lut


def label2image(pred: torch.Tensor, colormap: Sequence[Sequence[int]] = VOC_COLORMAP) -> torch.Tensor:
    """Class indices (H x W) -> RGB image (H x W x 3, uint8); VOID is drawn in VOC's boundary colour."""
    return colormap_lut(colormap)[pred.long().cpu()]


def read_label(path: str | os.PathLike, colormap2label: torch.Tensor, num_classes: int,
               ignore_index: int | None = None) -> torch.Tensor:
    """Read a label PNG as class indices (uint8, H x W, VOID = 255); ``ignore_index`` is void as well.

    Palette ('P') and 8-bit grayscale images already hold indices; RGB images are mapped through the colormap."""
    with Image.open(path) as im:
        if im.mode in ("P", "L") or im.mode.startswith("I"):   # indices, 8- or 16-bit
            label = torch.from_numpy(np.array(im).astype(np.int64))
        else:
            label = voc_label_indices(torch.from_numpy(np.array(im.convert("RGB"))), colormap2label)
    if ignore_index is not None:
        label = label.masked_fill(label == ignore_index, VOID)
    bad = (label >= num_classes) & (label != VOID)
    if bad.any():
        raise UsageError(f"{path}: label value {int(label[bad][0])} is not a class index (0..{num_classes - 1}) "
                         f"or void ({VOID}); check the file, the class list (--classes) or --ignore-index")
    return label.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Finding and reading the dataset
# ---------------------------------------------------------------------------------------------------------------------

VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_URL = f"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{VOC_TAR}"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"


def is_voc_dir(path: Path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "SegmentationClass").is_dir() \
        and (path / "ImageSets" / "Segmentation").is_dir()


def find_voc_dir(path: str | os.PathLike) -> Path:
    """Accept a VOC2012 folder, or a folder holding VOC2012 or VOCdevkit/VOC2012. A path named VOC2012 is also
    looked for in ../VOCdevkit/, where --download extracts it."""
    path = Path(path)
    candidates = [path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"]
    if path.name == "VOC2012":
        candidates.append(path.parent / "VOCdevkit" / "VOC2012")
    for candidate in candidates:
        if is_voc_dir(candidate):
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise UsageError(
        f"no VOC dataset found (tried {tried}); expected a VOC2012 folder with JPEGImages/, SegmentationClass/ and "
        f"ImageSets/Segmentation/{{train,val}}.txt, from {VOC_TAR} (2 GB, {VOC_URL}); pass --voc-dir PATH, "
        f"train with --download to fetch it, or run with --demo to use the built-in synthetic data")


def read_split_names(voc_dir: Path, split: str) -> list[str]:
    split_file = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise UsageError(f"{split_file}: split file not found; check --voc-dir or the split name")
    names = split_file.read_text().split()
    if not names:
        raise UsageError(f"{split_file}: the split is empty")
    return names


def read_image(path: str | os.PathLike, upright: bool = False) -> torch.Tensor:
    """An image file as a uint8 tensor (3 x H x W); grayscale, RGBA, CMYK and 16-bit images are converted to RGB.
    ``upright`` applies the EXIF orientation of phone photos, as image viewers do (dataset labels follow the stored
    pixels)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im) if upright else im
            if im.mode.startswith("I;16"):   # PIL would clip 16-bit values at 255; keep the top 8 bits instead
                gray = torch.from_numpy((np.array(im, dtype=np.uint16) >> 8).astype(np.uint8))
                return gray.expand(3, *gray.shape).contiguous()
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found")
    except (OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: cannot read the image ({e})")


def read_voc_images(voc_dir: str | os.PathLike, split: str = "train",
                    colormap2label: torch.Tensor | None = None, num_classes: int = len(VOC_CLASSES),
                    ignore_index: int | None = None, skip_bad: bool = False
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Read all images and labels of a split, as the book does, but kept as uint8 (about 10x less memory).
    A bad file stops with its name, or with ``skip_bad`` is left out with a warning."""
    voc_dir = Path(voc_dir)
    names = read_split_names(voc_dir, split)
    colormap2label = voc_colormap2label() if colormap2label is None else colormap2label

    def read_pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(voc_dir / "JPEGImages" / f"{name}.jpg")
        label_path = voc_dir / "SegmentationClass" / f"{name}.png"
        if not label_path.is_file():
            raise UsageError(f"{label_path}: label file not found (listed in the {split} split)")
        try:
            label = read_label(label_path, colormap2label, num_classes, ignore_index)
        except OSError as e:
            raise UsageError(f"{label_path}: cannot read the label ({e})")
        if label.shape != image.shape[1:]:
            raise UsageError(f"{label_path}: label is {tuple(label.shape)} but its image is {tuple(image.shape[1:])}")
        return image, label

    def read_or_skip(name: str) -> tuple[torch.Tensor, torch.Tensor] | str:
        try:
            return read_pair(name)
        except UsageError as e:
            if not skip_bad:
                raise
            return str(e)

    # PIL releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pairs = list(pool.map(read_or_skip, names))
    skipped = [p for p in pairs if isinstance(p, str)]
    for problem in skipped:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if skipped:
        print(f"warning: --skip-bad left out {len(skipped)} of {len(names)} examples of the {split} split",
              file=sys.stderr)
    kept = [(p, n) for p, n in zip(pairs, names) if not isinstance(p, str)]
    if not kept:
        raise UsageError(f"no readable example left in the {split} split")
    return [p[0] for p, _ in kept], [p[1] for p, _ in kept], [n for _, n in kept]


def read_split(voc_dir: str | os.PathLike, split: str, colormap: Sequence[Sequence[int]],
               ignore_index: int | None = None, skip_bad: bool = False
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """read_voc_images for a dataset given by its class colours (one per class)."""
    return read_voc_images(voc_dir, split, voc_colormap2label(colormap), len(colormap), ignore_index, skip_bad)


def download_file(url: str, path: Path) -> None:
    """Fetch ``url`` into ``path`` through ``path.part`` with a progress bar. A .part left by an interrupted run is
    continued with an HTTP Range request; a server that ignores the range (or a file:// URL) sends everything
    again, and the .part then starts afresh. The .part becomes ``path`` only once complete."""
    import http.client
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    total = None
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if response.status != 206:
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length else None
            with open(part, "ab" if start else "wb") as f, \
                    tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                         dynamic_ncols=True) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and start):   # 416: nothing left after the .part, which is therefore complete
            raise UsageError(f"downloading {url} failed (HTTP {e.code} {e.reason}); try another --mirror URL")
    except (OSError, http.client.HTTPException) as e:
        raise UsageError(f"downloading {url} failed ({getattr(e, 'reason', e)}); run again to resume from the "
                         f"{part.stat().st_size if part.is_file() else 0} bytes in {part}, or try another --mirror URL")
    if total is not None and part.stat().st_size < total:
        raise UsageError(f"downloading {url} stopped at {part.stat().st_size} of {total} bytes; run again to resume "
                         f"from {part}")
    os.replace(part, path)


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def extract_voc_tar(tar_path: Path, root: Path) -> Path:
    """Extract into a temporary folder inside ``root``, then move its VOCdevkit/VOC2012 into ``root/VOCdevkit``
    in one rename: a failure leaves no half-extracted tree that could pass for the dataset."""
    # Python's "data" filter refuses absolute paths, "..", links out of the tree and device files.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extracting-"))
    try:
        try:
            with tarfile.open(tar_path) as tar:
                tar.extractall(tmp, **safe)
        except (tarfile.TarError, OSError) as e:
            raise UsageError(f"{tar_path}: cannot extract it ({e}); nothing was extracted")
        extracted, target = tmp / "VOCdevkit" / "VOC2012", root / "VOCdevkit" / "VOC2012"
        if not is_voc_dir(extracted):
            raise UsageError(f"{tar_path}: it holds no VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/ and "
                             f"ImageSets/Segmentation/; nothing was extracted")
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(extracted, target)
        except OSError as e:
            raise UsageError(f"{target} exists but is not a complete VOC2012 ({e.strerror}); move it away and run "
                             f"again")
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_voc(root: str | os.PathLike, url: str = VOC_URL, md5: str | None = None) -> Path:
    """Fetch VOC_TAR into ``root`` (resuming a partial download), check its MD5 (``md5``, default VOC_MD5) and
    extract it; return root/VOCdevkit/VOC2012. The tar is kept (2 GB; delete it once extracted if space is short)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tar_path = root / VOC_TAR
    if not tar_path.is_file():
        print(f"downloading {url} into {root}")
        download_file(url, tar_path)
    expected = md5 or VOC_MD5
    print(f"checking the MD5 of {tar_path} ...")
    actual = file_md5(tar_path)
    if actual != expected:
        tar_path.unlink()   # a wrong complete file cannot be resumed: the next run must fetch it afresh
        raise UsageError(f"{tar_path}: MD5 {actual} is not the expected {expected}; removed it, run again to "
                         f"download it afresh (or try another --mirror URL)")
    print(f"extracting {tar_path} ...")
    return extract_voc_tar(tar_path, root)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Random crops
# ---------------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pad images with the mean colour: after normalisation it is zero, the same as the padding used at inference.
PAD_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)


def pad_to_at_least(image: torch.Tensor, label: torch.Tensor, height: int, width: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (bottom/right) an image smaller than the crop with the mean colour, its label with VOID.

    The book drops such images instead (350 of 1464 train and 371 of 1449 val images)."""
    h, w = label.shape
    if h >= height and w >= width:
        return image, label
    H, W = max(h, height), max(w, width)
    padded_image = torch.tensor(PAD_RGB, dtype=image.dtype, device=image.device).view(3, 1, 1).repeat(1, H, W)
    padded_image[:, :h, :w] = image
    padded_label = torch.full((H, W), VOID, dtype=label.dtype, device=label.device)
    padded_label[:h, :w] = label
    return padded_image, padded_label


def voc_rand_crop_window(image_hw: tuple[int, int], crop_hw: tuple[int, int],
                         generator: torch.Generator) -> tuple[int, int]:
    """Top-left corner of a random crop_hw window inside an image of image_hw (after padding)."""
    h, w = max(image_hw[0], crop_hw[0]), max(image_hw[1], crop_hw[1])
    top = int(torch.randint(0, h - crop_hw[0] + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop_hw[1] + 1, (1,), generator=generator))
    return top, left


def crop_pair(image: torch.Tensor, label: torch.Tensor, top: int, left: int, crop_hw: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same window of image and label."""
    image, label = pad_to_at_least(image, label, *crop_hw)
    h, w = crop_hw
    return image[:, top:top + h, left:left + w], label[top:top + h, left:left + w]


class VOCSegDataset(torch.utils.data.Dataset):
    """A split held in memory as uint8; items are (index, top, left) keys so that the crop windows are chosen by
    the sampler, in the main process, from one seeded generator: the DataLoader path (any number of workers) and the
    on-device path then cut exactly the same crops."""

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], names: list[str],
                 crop_size: tuple[int, int]):
        self.images, self.labels, self.names = images, labels, names
        self.crop_size = tuple(crop_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, top, left = key
        return crop_pair(self.images[i], self.labels[i], top, left, self.crop_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.images + self.labels)


class RandomCropBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of (index, top, left) keys, the same for a given seed and epoch; drops the last partial batch
    as the book's DataLoader does. ``rank``/``world_size`` shard each batch for distributed training."""

    def __init__(self, dataset: VOCSegDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.sizes = [tuple(label.shape) for label in dataset.labels]
        self.crop_size, self.batch_size, self.seed = dataset.crop_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        if len(self.sizes) < batch_size:
            raise UsageError(f"--batch-size {batch_size} is larger than the training split ({len(self.sizes)} images)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sizes) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.sizes), generator=g).tolist()
        for b in range(len(self)):
            batch = [(i, *voc_rand_crop_window(self.sizes[i], self.crop_size, g))
                     for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
            per_rank = self.batch_size // self.world_size
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]


def collate_crops(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def crop_batches_on_device(dataset: VOCSegDataset, sampler: RandomCropBatchSampler
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The data path when the split lives in GPU memory: slice crops there, no worker processes, no copies."""
    for batch in sampler:
        yield collate_crops([dataset[key] for key in batch])


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float, ImageNet mean/std, done per batch on the training device."""
    mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in IMAGENET_STD], device=x.device).view(1, 3, 1, 1)
    return (x - mean).div_(std)   # uint8 - float gives a new float tensor in one pass; divide it in place


# ---------------------------------------------------------------------------------------------------------------------
# 5. The synthetic demo dataset
# ---------------------------------------------------------------------------------------------------------------------

DEMO_VERSION = 1
DEMO_DIR = ROOT / ".cache" / f"demo-voc-v{DEMO_VERSION}"
DEMO_SPLITS = {"train": 160, "val": 40}
# class index -> (base colour, texture): each class is learnable from colour, texture and shape together.
DEMO_OBJECTS = {1: ((150, 150, 170), "stripes"),   # aeroplane: a cross
                2: ((40, 160, 40), "plain"),       # bicycle: two thin rings (the FCN cannot draw these)
                6: ((220, 190, 40), "grid"),       # bus: a box with windows
                8: ((210, 120, 40), "noise"),      # cat: an ellipse
                15: ((200, 150, 130), "plain")}    # person: a head on a thin body


def _demo_shape(draw: ImageDraw.ImageDraw, cls: int, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) // 2, (y0 + y1) // 2, x1 - x0, y1 - y0
    if cls == 1:
        draw.rectangle([x0, cy - h // 8, x1, cy + h // 8], fill=1)
        draw.rectangle([cx - w // 8, y0, cx + w // 8, y1], fill=1)
    elif cls == 2:
        r = min(w // 4, h // 2)
        for ox in (cx - r, cx + r):
            draw.ellipse([ox - r, cy - r, ox + r, cy + r], outline=1, width=max(2, r // 4))
    elif cls == 6:
        draw.rectangle(box, fill=1)
    elif cls == 8:
        draw.ellipse(box, fill=1)
    else:
        draw.ellipse([cx - w // 4, y0, cx + w // 4, y0 + h // 3], fill=1)
        draw.rectangle([cx - w // 8, y0 + h // 3, cx + w // 8, y1], fill=1)


def _demo_texture(rng: np.random.RandomState, kind: str, color: np.ndarray, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    tex = np.ones((h, w, 1))
    if kind == "stripes":
        tex = (0.75 + 0.25 * ((yy // 3) % 2))[..., None]
    elif kind == "grid":
        tex = (1.0 - 0.5 * (((yy // 4) % 3 == 0) | ((xx // 4) % 3 == 0)))[..., None]
    elif kind == "noise":
        tex = rng.uniform(0.6, 1.2, (h, w, 1))
    return np.clip(color * tex + rng.normal(0, 8, (h, w, 3)), 0, 255)


def make_demo_image(rng: np.random.RandomState) -> tuple[Image.Image, Image.Image]:
    """One synthetic image and its palette label: a textured background and 1-3 objects with a 2-pixel void border."""
    h, w = (int(rng.randint(40, 64)), int(rng.randint(64, 96))) if rng.rand() < 0.1 else \
        (int(rng.randint(72, 112)), int(rng.randint(100, 160)))
    base = rng.uniform(60, 200, 3)
    ramp = np.linspace(-30, 30, w)[None, :, None]
    image = np.clip(base + ramp + rng.normal(0, 20, (h, w, 3)), 0, 255)
    label = np.zeros((h, w), dtype=np.uint8)
    for _ in range(rng.randint(1, 4)):
        cls = int(rng.choice(list(DEMO_OBJECTS)))
        color, texture = DEMO_OBJECTS[cls]
        ow, oh = int(rng.randint(w // 4, w // 2)), int(rng.randint(h // 3, int(h * 0.7)))
        x0, y0 = int(rng.randint(0, w - ow)), int(rng.randint(0, h - oh))
        mask_im = Image.new("L", (w, h), 0)
        _demo_shape(ImageDraw.Draw(mask_im), cls, (x0, y0, x0 + ow, y0 + oh))
        mask = np.array(mask_im) > 0
        border = (np.array(mask_im.filter(ImageFilter.MaxFilter(5))) > 0) & ~mask
        jitter = np.clip(np.array(color) + rng.normal(0, 12, 3), 0, 255)
        image[mask] = _demo_texture(rng, texture, jitter, h, w)[mask]
        label[border] = VOID
        label[mask] = cls
    label_im = Image.fromarray(label, mode="P")
    label_im.putpalette(voc_palette())
    return Image.fromarray(image.astype(np.uint8)), label_im


def make_demo_voc(root: str | os.PathLike = DEMO_DIR) -> Path:
    """Generate (once, deterministically) a small dataset in exact VOC2012 layout; return its VOC2012 folder."""
    voc_dir = Path(root) / "VOC2012"
    if is_voc_dir(voc_dir):
        return voc_dir
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    rng = np.random.RandomState(2012)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True)
    for split, count in DEMO_SPLITS.items():
        names = [f"demo_{split}_{i:04d}" for i in range(count)]
        for name in names:
            image, label = make_demo_image(rng)
            image.save(tmp / "JPEGImages" / f"{name}.jpg", quality=90)
            label.save(tmp / "SegmentationClass" / f"{name}.png")
        (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    try:
        os.replace(tmp, voc_dir)   # atomic: a half-built tree is never mistaken for the dataset
    except OSError:
        if not is_voc_dir(voc_dir):  # another process may have finished first
            raise
    return voc_dir


# ---------------------------------------------------------------------------------------------------------------------
# 6. Models
# ---------------------------------------------------------------------------------------------------------------------

RESNET18_FILE = "resnet18-f37072fd.pth"   # torchvision's ResNet18_Weights.IMAGENET1K_V1


def resnet18_backbone(pretrained: str = "imagenet") -> torchvision.models.ResNet:
    """torchvision's ResNet-18: 'none' (random init), 'imagenet' (a local resnet18-f37072fd.pth if present, else
    torchvision's download into the torch hub cache), or a path to a ResNet-18 state_dict file."""
    net = torchvision.models.resnet18()
    if pretrained == "none":
        return net
    if pretrained == "imagenet":
        local = Path(RESNET18_FILE)
        if local.is_file():
            pretrained = str(local)
        else:
            weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
            try:
                net.load_state_dict(weights.get_state_dict(progress=True))
            except Exception as e:  # network down, proxy, read-only cache, ...
                raise UsageError(
                    f"could not download the ImageNet ResNet-18 weights ({type(e).__name__}); download "
                    f"{weights.url} by hand and put {RESNET18_FILE} in the current folder or pass --pretrained PATH, "
                    f"or train from scratch with --pretrained none")
            return net
    path = Path(pretrained)
    if not path.is_file():
        raise UsageError(f"--pretrained {pretrained}: no such file; use imagenet, none, or a path to {RESNET18_FILE}")
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"--pretrained {pretrained}: not a ResNet-18 state_dict ({type(e).__name__}: {first})")
    return net


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """The book's initial weight for a transposed convolution that performs bilinear upsampling."""
    factor = (kernel_size + 1) // 2
    if kernel_size % 2 == 1:
        center = factor - 1
    else:
        center = factor - 0.5
    og = (torch.arange(kernel_size).reshape(-1, 1), torch.arange(kernel_size).reshape(1, -1))
    filt = (1 - torch.abs(og[0] - center) / factor) * (1 - torch.abs(og[1] - center) / factor)
    weight = torch.zeros((in_channels, out_channels, kernel_size, kernel_size))
    weight[range(in_channels), range(out_channels), :, :] = filt
    return weight


def pad_to_multiple(x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Zero-pad (bottom/right) a normalised batch so that H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


class CPUFloat32ConvTranspose2d(nn.ConvTranspose2d):
    """A transposed conv that stays in fp32 under CPU autocast: oneDNN has no fast bf16 kernel for the FCN's
    (kernel 64, stride 32), which under bf16 took 3/4 of the step (measured: the FCN step 4x slower than fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class FCN(nn.Sequential):
    """The book's FCN: ResNet-18 without its pooling and fully connected layer, a 1x1 conv to the classes, and a
    transposed conv (kernel 64, stride 32, padding 16) initialised to bilinear upsampling, so an H x W input gives
    H x W outputs when H and W are multiples of 32. Other sizes are padded to a multiple of 32 and cropped back."""

    def __init__(self, num_classes: int = len(VOC_CLASSES), pretrained: str = "imagenet"):
        pretrained_net = resnet18_backbone(pretrained)
        super().__init__(*list(pretrained_net.children())[:-2])
        self.add_module('final_conv', nn.Conv2d(512, num_classes, kernel_size=1))
        self.add_module('transpose_conv', CPUFloat32ConvTranspose2d(num_classes, num_classes,
                                                                    kernel_size=64, padding=16, stride=32))
        nn.init.xavier_normal_(self.final_conv.weight)   # as the seed does
        self.transpose_conv.weight.data.copy_(bilinear_kernel(num_classes, num_classes, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return super().forward(pad_to_multiple(x, 32))[..., :h, :w]


def convrelu(in_channels: int, out_channels: int, kernel: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU(inplace=True))


class ResNetUNet(nn.Module):
    """A U-Net whose encoder is the five stages of ResNet-18 (strides 2..32), with a 1x1 conv + ReLU on every skip,
    a decoder of (upsample x2, concatenate, 3x3 conv) steps, and a full-resolution branch on the input image."""

    def __init__(self, num_classes: int = len(VOC_CLASSES), pretrained: str = "imagenet"):
        super().__init__()
        base = list(resnet18_backbone(pretrained).children())
        self.layer0 = nn.Sequential(*base[:3])        # conv1 + bn1 + relu: stride 2, 64 channels
        self.layer1 = nn.Sequential(*base[3:5])       # maxpool + layer1:    stride 4, 64
        self.layer2, self.layer3, self.layer4 = base[5], base[6], base[7]   # strides 8, 16, 32: 128, 256, 512
        self.layer0_1x1 = convrelu(64, 64, 1, 0)
        self.layer1_1x1 = convrelu(64, 64, 1, 0)
        self.layer2_1x1 = convrelu(128, 128, 1, 0)
        self.layer3_1x1 = convrelu(256, 256, 1, 0)
        self.layer4_1x1 = convrelu(512, 512, 1, 0)
        self.upsample = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)
        self.conv_up3 = convrelu(512 + 256, 512, 3, 1)
        self.conv_up2 = convrelu(512 + 128, 256, 3, 1)
        self.conv_up1 = convrelu(256 + 64, 256, 3, 1)
        self.conv_up0 = convrelu(256 + 64, 128, 3, 1)
        self.conv_original_size0 = convrelu(3, 64, 3, 1)
        self.conv_original_size1 = convrelu(64, 64, 3, 1)
        self.conv_original_size2 = convrelu(128 + 64, 64, 3, 1)
        self.conv_last = nn.Conv2d(64, num_classes, 1)

    def up_and_merge(self, x: torch.Tensor, skip: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        return conv(torch.cat([self.upsample(x), skip], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        x_original = self.conv_original_size1(self.conv_original_size0(x))
        layer0 = self.layer0(x)
        layer1 = self.layer1(layer0)
        layer2 = self.layer2(layer1)
        layer3 = self.layer3(layer2)
        layer4 = self.layer4(layer3)
        x = self.layer4_1x1(layer4)
        x = self.up_and_merge(x, self.layer3_1x1(layer3), self.conv_up3)
        x = self.up_and_merge(x, self.layer2_1x1(layer2), self.conv_up2)
        x = self.up_and_merge(x, self.layer1_1x1(layer1), self.conv_up1)
        x = self.up_and_merge(x, self.layer0_1x1(layer0), self.conv_up0)
        x = self.up_and_merge(x, x_original, self.conv_original_size2)
        return self.conv_last(x)[..., :h, :w]


MODELS = {"fcn": FCN, "unet": ResNetUNet}


def build_model(name: str, num_classes: int, pretrained: str = "none") -> nn.Module:
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes, pretrained)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Loss and metrics
# ---------------------------------------------------------------------------------------------------------------------


def prepare_targets(labels: torch.Tensor, void: str) -> torch.Tensor:
    """uint8 labels -> int64 targets. 'background': the book trains void pixels as class 0; 'ignore': they stay
    VOID and cross_entropy skips them."""
    if void == "background":   # on the uint8 labels: a quarter of the bytes of the int64 ones
        labels = labels.masked_fill(labels == VOID, 0)
    return labels.long()


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str,
                      num_valid: int | torch.Tensor | None = None) -> torch.Tensor:
    """'sum' is the book's loss: each image's mean pixel cross-entropy, summed over the batch (its
    ``l.sum().backward()``), so SGD's lr 1e-3 at batch 32 acts like 0.032 on a mean loss.
    'mean' is the usual mean over all labelled pixels of the batch; ``num_valid`` (the labelled pixels of the whole
    optimizer batch) lets micro-batches of an accumulated step add up to exactly that mean."""
    pixel_loss = F.cross_entropy(logits.float(), targets, ignore_index=VOID, reduction="none")
    valid = targets != VOID
    if reduction == "sum":
        per_image = pixel_loss.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
        return per_image.sum()
    num_valid = valid.sum() if num_valid is None else num_valid
    return pixel_loss.sum() / torch.as_tensor(num_valid).clamp(min=1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows = ground truth, columns = prediction; VOID pixels are left out."""
    keep = target != VOID
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


class SegMetrics:
    """Accumulates a confusion matrix, and void pixels predicted as background for the book's pixel accuracy."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.void_pixels = 0
        self.void_as_background = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion += confusion_matrix(pred, target, self.num_classes)
        void = target == VOID
        self.void_pixels += int(void.sum())
        self.void_as_background += int((pred[void] == 0).sum())

    def compute(self, class_names: Sequence[str]) -> dict:
        cm = self.confusion.double()
        tp, gt, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        union = gt + predicted - tp
        iou = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(self.num_classes)]
        present = [v for v in iou if v is not None]
        class_acc = [float(tp[c] / gt[c]) for c in range(self.num_classes) if gt[c] > 0]
        total = float(cm.sum())
        return {
            "pixel_acc": float(tp.sum()) / total if total else 0.0,
            "mean_class_acc": sum(class_acc) / len(class_acc) if class_acc else 0.0,
            "miou": sum(present) / len(present) if present else 0.0,
            "per_class_iou": dict(zip(class_names, iou)),
            # The book's accuracy: void pixels are labelled background (its colormap has no boundary colour).
            "d2l_pixel_acc": (float(tp.sum()) + self.void_as_background) / (total + self.void_pixels)
            if total + self.void_pixels else 0.0,
            "confusion_matrix": self.confusion.tolist(),
        }


# ---------------------------------------------------------------------------------------------------------------------
# 8. Training and evaluation loops
# ---------------------------------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks from the vendors' datasheets, for the "fraction of peak" in the log.
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165,
                    "4080": 97, "4070": 58, "4060": 30, "3090": 71, "3080": 60, "3070": 40, "3060": 25, "V100": 125}


def bf16_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def train_flops_per_image(net: nn.Module, crop_hw: tuple[int, int], device: torch.device) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    net = copy.deepcopy(net)   # the counting pass must not touch the real BatchNorm statistics or gradients
    x = torch.zeros(1, 3, *crop_hw, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x).sum().backward()
    return float(counter.get_total_flops())


def inference_flags(amp: str, device: torch.device) -> dict:
    """amp and memory format for prediction, as training picks them by default. (No cuDNN autotuning here: photos
    come in many sizes, and tuning a 4000 x 3000 one took 20 s and twice the memory on an H200.)"""
    amp_dtype = resolve_amp(amp, device)
    return {"amp_dtype": amp_dtype, "channels_last": bf16_prefers_channels_last(device, amp_dtype)}


def bf16_prefers_channels_last(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """channels_last pays on CUDA and with bf16 on the CPU; in fp32 on the CPU its slower backward outweighs the
    faster forward (measured on 2 cores: forward 1.2-1.4x faster, backward 1.6-1.8x slower)."""
    return device.type == "cuda" or (device.type == "cpu" and amp_dtype == torch.bfloat16)


def cpu_has_amx() -> bool:
    """Intel AMX tiles (Sapphire Rapids and later): oneDNN runs bf16 convolutions on them several times faster than
    fp32; CPUs without them run bf16 slower than fp32."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto' = bf16 on CUDA GPUs that support it and on CPUs with AMX (measured: the UNet step 3.1x, the FCN's
    1.3x faster than fp32, the same demo loss curve), off elsewhere (slower than fp32 on CPUs without AMX)."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def to_device_batch(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = normalize_images(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
               device: torch.device, void: str, reduction: str, accum_steps: int = 1,
               amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               channels_last: bool = False, world_size: int = 1) -> tuple[float, int, int]:
    """One optimizer step on this process's share of a batch, in ``accum_steps`` micro-batches whose gradients add
    up to the whole batch's. DDP averages gradients over processes, so the loss is multiplied by the world size: the
    step then equals a single process's on the whole (global) batch, for the book's summed loss and the mean alike.
    Returns (this process's share of the batch loss, correct pixels, labelled pixels); the shares add up over
    processes to the loss per image ('sum') or per labelled pixel ('mean')."""
    targets_all = prepare_targets(labels.to(device, non_blocking=True), void)
    num_valid = None
    if reduction == "mean":   # the denominator of the whole batch, over every micro-batch and process
        num_valid = (targets_all != VOID).sum()
        if world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(num_valid)
    optimizer.zero_grad(set_to_none=True)
    # Loss, correct and labelled pixels stay on the device until the end of the step: one host sync per step.
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    chunks = list(zip(images.chunk(accum_steps), targets_all.chunk(accum_steps)))
    for k, (images_mb, targets) in enumerate(chunks):
        # Under DDP, synchronise gradients only once, on the last micro-batch.
        no_sync = net.no_sync() if k < len(chunks) - 1 and hasattr(net, "no_sync") else nullcontext()
        with no_sync:
            with autocast(device, amp_dtype):
                logits = net(to_device_batch(images_mb, device, channels_last))
            loss = segmentation_loss(logits, targets, reduction, num_valid) * world_size
            (scaler.scale(loss) if scaler else loss).backward()
        valid = targets != VOID
        totals += torch.stack([loss.detach(), ((logits.argmax(1) == targets) & valid).sum(), valid.sum()])
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    loss_total, correct, counted = totals.tolist()
    share = loss_total / world_size
    if reduction == "sum":   # per image, as the book's log divides by the number of examples
        share /= len(images) * world_size
    return share, int(correct), int(counted)


@torch.inference_mode()
def predict_full_res(net: nn.Module, images: Sequence[torch.Tensor], device: torch.device, batch_size: int = 8,
                     amp_dtype: torch.dtype | None = None, channels_last: bool = False, tta: bool = False
                     ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (index, predicted labels H x W) for every image at full resolution. Images that pad to the same
    multiple-of-32 size are batched together, so each prediction equals the one of that image alone.
    ``tta`` averages the logits with those of the horizontally mirrored batch (mirrored back)."""
    net.eval()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        groups.setdefault((h + -h % 32, w + -w % 32), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            x = torch.stack([pad_to_multiple(to_device_batch(images[i][None], device, False), 32)[0] for i in chunk])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                logits = net(x)
                if tta:
                    logits = (logits + net(x.flip(-1)).flip(-1)) / 2
            pred = logits.argmax(1)
            for i, p in zip(chunk, pred):
                h, w = images[i].shape[1:]
                yield i, p[:h, :w]


def evaluate(net: nn.Module, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], num_classes: int,
             device: torch.device, batch_size: int = 8, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, ctx: "DistributedContext | None" = None) -> SegMetrics:
    """Full-resolution, deterministic metrics over a whole split. Under DDP each process takes every
    world_size-th image and the counts are summed, so every image is counted exactly once."""
    rank, world_size = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    images, labels = images[rank::world_size], labels[rank::world_size]
    metrics = SegMetrics(num_classes)
    for i, pred in predict_full_res(net, images, device, batch_size, amp_dtype, channels_last):
        metrics.update(pred.cpu(), labels[i])
    if world_size > 1:
        import torch.distributed as dist
        counts = torch.cat([metrics.confusion.flatten(),
                            torch.tensor([metrics.void_pixels, metrics.void_as_background])]).to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
        metrics.confusion = counts[:-2].reshape(num_classes, num_classes)
        metrics.void_pixels, metrics.void_as_background = int(counts[-2]), int(counts[-1])
    return metrics


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with batch statistics over all processes, as nn.SyncBatchNorm does on GPUs, for CPU (gloo) runs.
    Its state_dict is a BatchNorm2d's, so checkpoints load into the plain model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce   # differentiable: gradients flow across processes
        dtype = x.dtype
        x = x.float()   # statistics in fp32, also when autocast (bf16 on the CPU) hands over bf16 activations
        c, shape = x.shape[1], (1, x.shape[1], 1, 1)
        local_count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum((0, 2, 3)), local_count]))
        count = sums[-1]
        mean = sums[:c] / count
        # A second pass for the variance: E[x^2] - mean^2 loses digits and drifts from the single-process step.
        var = all_reduce(((x - mean.view(shape)) ** 2).sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return (x_hat * self.weight.view(shape) + self.bias.view(shape)).to(dtype)


def convert_sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers whose statistics cover the global batch: nn.SyncBatchNorm on CUDA, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, child in net.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = DistributedBatchNorm2d(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(net, name, bn)
        else:
            convert_sync_batchnorm(child, device)
    return net


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "sgd":   # the book: plain SGD, no momentum
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    raise UsageError(f"unknown optimizer {name!r}; choose sgd or adam")


# ---------------------------------------------------------------------------------------------------------------------
# 9. Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def plain_config(args: argparse.Namespace) -> dict:
    """argparse values as plain types only, so the checkpoint loads with weights_only=True."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def make_checkpoint(net: nn.Module, model_name: str, class_names: Sequence[str], colormap: Sequence[Sequence[int]],
                    config: dict, **extra) -> dict:
    return {"model": model_name, "num_classes": len(class_names), "class_names": list(class_names),
            "colormap": [list(c) for c in colormap], "config": config,
            "state_dict": unwrap(net).state_dict(), **extra}


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: checkpoint not found; train first or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path}: not a checkpoint of this project, refused ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "model" not in checkpoint:
        raise UsageError(f"{path}: not a checkpoint of this project (no model name or state_dict)")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> nn.Module:
    net = build_model(checkpoint["model"], checkpoint["num_classes"], pretrained="none")
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise UsageError(f"{path}: its weights do not fit a {checkpoint['model']} with {checkpoint['num_classes']} "
                         f"classes ({str(e).splitlines()[0]})")
    return net


# ---------------------------------------------------------------------------------------------------------------------
# 10. Figures
# ---------------------------------------------------------------------------------------------------------------------


def plt_module():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure atomically (the format comes from the real file name)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight"))
    plt_module().close(fig)


def show_images(rows: Sequence[Sequence[torch.Tensor]], row_titles: Sequence[str],
                titles: Sequence[Sequence[str]] | None = None, scale: float = 2.0):
    """A grid of H x W x 3 uint8 images, one list per row, like d2l.show_images; returns the figure."""
    plt = plt_module()
    num_rows, num_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(num_cols * scale * 1.3, num_rows * scale), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(num_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c].numpy())
            else:
                ax.axis("off")
            if titles and titles[r] and c < len(titles[r]) and titles[r][c]:
                ax.set_title(titles[r][c], fontsize=8)
        axes[r][0].set_ylabel(row_titles[r])
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy curves (the seed's figure) plus val mIoU, one point per epoch."""
    plt = plt_module()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "b-", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "m--", label="train acc")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], "g-.", label="val acc")
    ax_acc.plot(epochs, [h["val_miou"] for h in history], "k-", label="val mIoU")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def overlay_with_legend(image: torch.Tensor, pred: torch.Tensor, colormap: Sequence[Sequence[int]],
                        class_names: Sequence[str], alpha: float = 0.5) -> Image.Image:
    """The image (3 x H x W uint8) blended with the colours of its predicted classes, and on its right a legend of
    the classes present."""
    blended = Image.blend(Image.fromarray(image.permute(1, 2, 0).numpy()),
                          Image.fromarray(label2image(pred, colormap).numpy()), alpha)
    present = torch.unique(pred).tolist()
    font = ImageFont.load_default(size=max(12, blended.height // 40))   # readable on photos and thumbnails alike
    line = round(font.size * 1.5)
    draw = ImageDraw.Draw(blended)
    width = line + max(round(draw.textlength(class_names[c], font=font)) for c in present) + line
    canvas = Image.new("RGB", (blended.width + width, max(blended.height, line * (len(present) + 1))), "white")
    canvas.paste(blended)
    draw = ImageDraw.Draw(canvas)
    for row, c in enumerate(present):
        x, y = blended.width + line // 2, line // 2 + row * line
        draw.rectangle([x, y, x + font.size, y + font.size], fill=tuple(colormap[c]), outline="black")
        draw.text((x + line, y), class_names[c], fill="black", font=font)
    return canvas


def write_history(history: list[dict], path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------------------------
# 11. Command-line flags of the training scripts
# ---------------------------------------------------------------------------------------------------------------------

# With --demo, every default below that the user did not set shrinks to this, so a run takes minutes on a laptop CPU.
DEMO_TRAIN_DEFAULTS = {"crop": [64, 64], "epochs": 12, "batch_size": 8, "pretrained": "none", "device": "cpu"}


def train_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags of both training scripts. Defaults are None here and filled in by finish_train_args, so that
    --demo can shrink only what the user left unset."""
    p = ArgumentParser(description=description)
    data = p.add_argument_group("data")
    data.add_argument("--voc-dir", help="VOC2012 folder, or a folder holding VOC2012 or VOCdevkit/VOC2012")
    data.add_argument("--demo", action="store_true", help="use the built-in synthetic VOC-layout data (CPU, minutes)")
    data.add_argument("--download", action="store_true",
                      help=f"if the data is not there, fetch {VOC_TAR} (2 GB) into the parent folder of --voc-dir, "
                      f"check its MD5 and extract VOCdevkit/VOC2012 there; an interrupted download resumes")
    data.add_argument("--mirror", metavar="URL", help=f"where --download fetches the tar (default {VOC_URL})")
    data.add_argument("--classes", metavar="FILE", help="your dataset's classes, one per line: 'name' or "
                      "'name R G B' (index = line number; no colours: VOC's palette); default: VOC's 21")
    data.add_argument("--ignore-index", type=int, metavar="K",
                      help="label value K is void like 255 (e.g. CamVid's 'unlabelled' 11)")
    data.add_argument("--train-split", default="train", metavar="NAME", help="ImageSets/Segmentation/NAME.txt")
    data.add_argument("--val-split", default="val", metavar="NAME", help="ImageSets/Segmentation/NAME.txt")
    data.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop (the book: 320 480)")
    data.add_argument("--void", choices=["background", "ignore"],
                      help="void pixels: trained as background (the book) or ignored")
    data.add_argument("--skip-bad", action="store_true",
                      help="leave out unreadable or inconsistent examples with a warning (default: stop)")
    data.add_argument("--workers", type=int, help="DataLoader worker processes (default: 4 on a GPU, 0 on the CPU, "
                      "where crops are cheap and workers would compete with the training threads)")
    model = p.add_argument_group("model and optimizer")
    model.add_argument("--model", choices=list(MODELS))
    model.add_argument("--pretrained", help="imagenet, none, or a path to resnet18-f37072fd.pth")
    model.add_argument("--optimizer", choices=["sgd", "adam"])
    model.add_argument("--lr", type=float)
    model.add_argument("--wd", type=float, help="weight decay")
    model.add_argument("--loss", choices=["sum", "mean"],
                       help="sum: the book's per-image mean cross-entropy summed over the batch; mean: over pixels")
    model.add_argument("--epochs", type=int)
    model.add_argument("--batch-size", type=int)
    model.add_argument("--finetune-from", metavar="CKPT",
                       help="start from this checkpoint's weights with a fresh optimizer; the history continues")
    speed = p.add_argument_group("speed and memory")
    auto = ["auto", "on", "off"]
    speed.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                       help="mixed precision (auto: bf16 on CUDA GPUs that have it and on CPUs with AMX, "
                       "off elsewhere)")
    speed.add_argument("--channels-last", choices=auto, default="auto",
                       help="NHWC memory format (auto: on CUDA, and on the CPU with bf16)")
    speed.add_argument("--data-on-device", choices=auto, default="auto",
                       help="keep the uint8 training split in GPU memory and crop there (auto: on CUDA if it fits)")
    speed.add_argument("--accum-steps", type=int, default=1,
                       help="gradient accumulation: each step sees accum-steps batches of --batch-size")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="under torchrun, BatchNorm statistics over the global batch")
    run = p.add_argument_group("run")
    run.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the first that exists)")
    run.add_argument("--seed", type=int)
    run.add_argument("--out", help="folder for history.csv, curves.png, last.pt and best.pt")
    run.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                     help="continue an interrupted run from OUT/last.pt (or CKPT)")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def finish_train_args(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill unset flags from the script's defaults (shrunk by --demo), then check their ranges."""
    chosen = dict(defaults, **(DEMO_TRAIN_DEFAULTS if args.demo else {}))
    for key, value in chosen.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1) if try_all_gpus_or_cpu(args.device).type == "cuda" else 0
    checks = [(args.epochs >= 1, "--epochs must be at least 1"),
              (args.batch_size >= 1, "--batch-size must be at least 1"),
              (args.lr > 0, "--lr must be positive"),
              (args.wd >= 0, "--wd must not be negative"),
              (args.workers >= 0, "--workers must not be negative"),
              (args.accum_steps >= 1, "--accum-steps must be at least 1"),
              (args.ignore_index is None or 0 <= args.ignore_index < VOID,
               f"--ignore-index must be a label value 0..{VOID - 1} ({VOID} is always void)"),
              (args.mirror is None or args.download, "--mirror goes with --download"),
              (not (args.download and args.demo), "--download and --demo do not go together"),
              (all(c > 0 and c % 32 == 0 for c in args.crop),
               f"--crop {args.crop[0]} {args.crop[1]}: both sides must be positive multiples of 32 "
               f"(the networks downsample by 32)")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return args


def dataset_dir(voc_dir: str | None, demo: bool) -> Path:
    return make_demo_voc() if demo else find_voc_dir(voc_dir or "VOC2012")


def training_dataset_dir(args: argparse.Namespace) -> Path:
    """dataset_dir, after --download has fetched VOC into the parent folder of --voc-dir if it is not there yet."""
    if args.demo or not args.download:
        return dataset_dir(args.voc_dir, args.demo)
    voc_dir = Path(args.voc_dir or "VOC2012")
    fetched = voc_dir.parent / "VOCdevkit" / "VOC2012"
    try:
        return find_voc_dir(voc_dir)
    except UsageError:
        if is_voc_dir(fetched):
            return fetched
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # every process would write the same file
        raise UsageError("--download under torchrun: fetch the data first with one process (python ... --download)")
    return download_voc(voc_dir.parent, args.mirror or VOC_URL)


def dataset_classes(args: argparse.Namespace) -> tuple[list[str], list[list[int]]]:
    """Class names and colours of --classes FILE, else VOC's."""
    return load_classes(args.classes) if args.classes else (list(VOC_CLASSES), [list(c) for c in VOC_COLORMAP])


def print_config(args: argparse.Namespace, speed: dict, ctx: "DistributedContext") -> None:
    if ctx.is_main:
        print("config: " + ", ".join(f"{k}={v}" for k, v in sorted(plain_config(args).items()) if k != "debug"))
        amp = str(speed["amp_dtype"]).replace("torch.", "") if speed["amp_dtype"] else "off"
        print(f"device {ctx.device} x {ctx.world_size} process(es); amp {amp}, channels_last "
              f"{speed['channels_last']}, data on device {speed['data_on_device']}, "
              f"{args.batch_size * args.accum_steps} images per step")


def epoch_line(row: dict, epochs: int, device: torch.device, flops_per_image: float | None) -> str:
    """The book's per-epoch summary, plus mIoU, speed, and on a GPU how close the speed is to the bf16 peak."""
    line = (f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f}, train acc {row['train_acc']:.3f}, "
            f"val acc {row['val_acc']:.3f}, val mIoU {row['val_miou']:.3f}, "
            f"{row['img_per_s']:.1f} examples/sec on {device}")
    peak = bf16_peak_flops(device)
    if peak and flops_per_image:
        line += f" ({row['img_per_s'] * flops_per_image / peak:.1%} of bf16 peak)"
    if device.type == "cuda":
        line += f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return line


# ---------------------------------------------------------------------------------------------------------------------
# 12. The training run: processes, speed flags, resume, the epoch loop
# ---------------------------------------------------------------------------------------------------------------------


class TrainingStopped(UsageError):
    """Training ended early on purpose (Ctrl-C) or because the loss diverged; the message says what to do next."""


class DistributedContext:
    """Rank, world size and device of this process: under torchrun, one process per GPU (or per CPU rank with gloo),
    else a single process. Only rank 0 prints and writes files."""

    def __init__(self, device_name: str | None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = try_all_gpus_or_cpu(device_name)
        if self.world_size > 1:
            import torch.distributed as dist
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over all ranks (a no-op in a single process)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def data_fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Keep the uint8 split on the GPU when it takes under a fifth of the card (VOC train: about 0.6 GB)."""
    return device.type == "cuda" and nbytes < 0.2 * torch.cuda.get_device_properties(device).total_memory


def resolve_speed_flags(args: argparse.Namespace, device: torch.device, nbytes: int) -> dict:
    """Turn the auto flags into choices for this device."""
    auto = lambda flag, default: default if flag == "auto" else flag == "on"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed crop sizes: let cuDNN pick its fastest kernels once
    amp_dtype = resolve_amp(args.amp, device)
    return {"amp_dtype": amp_dtype,
            "channels_last": auto(args.channels_last, bf16_prefers_channels_last(device, amp_dtype)),
            "data_on_device": auto(args.data_on_device, data_fits_on_device(nbytes, device))}


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in states["python"].tolist()), None))


class StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step (which is then saved); a second one aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        import signal
        self.previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\ninterrupted: finishing this step and saving (Ctrl-C again to abort)", file=sys.stderr)
        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:     # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        import signal
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def wrap_for_training(net: nn.Module, ctx: DistributedContext, channels_last: bool, sync_bn: bool,
                      compile_model: bool) -> nn.Module:
    """Move to the device, convert memory format and BatchNorm, wrap in DDP, compile: in that order."""
    if ctx.world_size > 1 and sync_bn:
        net = convert_sync_batchnorm(net, ctx.device)
    net = net.to(ctx.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if ctx.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    if compile_model:
        net = torch.compile(net)
    return net


def train(args: argparse.Namespace) -> list[dict]:
    """Train args.model on the train split, validating on val after each epoch; write OUT/history.csv,
    OUT/curves.png, OUT/last.pt (every epoch) and OUT/best.pt (best val mIoU). Returns the history."""
    from tqdm import tqdm
    ctx = DistributedContext(args.device)
    device = ctx.device
    seed_everything(args.seed)
    voc_dir = training_dataset_dir(args)
    class_names, colormap = dataset_classes(args)
    out = Path(args.out)
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot create the output folder ({e.strerror})")
        if not os.access(out, os.W_OK):
            raise UsageError(f"--out {out}: the folder is not writable")
    if args.batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch and must divide evenly over "
                         f"{ctx.world_size} processes")
    log = print if ctx.is_main else (lambda *a, **k: None)
    log(f"reading {voc_dir} ...")
    train_set = VOCSegDataset(*read_split(voc_dir, args.train_split, colormap, args.ignore_index, args.skip_bad),
                              crop_size=args.crop)
    val_images, val_labels, _ = read_split(voc_dir, args.val_split, colormap, args.ignore_index, args.skip_bad)
    log(f"read {len(train_set)} training and {len(val_images)} validation examples "
        f"({train_set.nbytes() / 2**20:.0f} MB as uint8)")
    speed = resolve_speed_flags(args, device, train_set.nbytes())

    # Weights: fresh, fine-tuned from another run (fresh optimizer), or resumed (everything restored).
    resume = resume_checkpoint_path(args)
    start_from = resume or args.finetune_from
    state = load_checkpoint(start_from) if start_from else None
    # Weights that a checkpoint replaces need no ImageNet download (resuming offline must work).
    net = build_model(args.model, len(class_names), "none" if start_from else args.pretrained)
    history: list[dict] = []
    if state is not None:
        check_checkpoint_matches(state, args.model, class_names, start_from)
        net.load_state_dict(state["state_dict"])
        history = list(state.get("history", []))
    flops = train_flops_per_image(net.to(device), tuple(args.crop), device) if device.type == "cuda" else None
    net = wrap_for_training(net, ctx, speed["channels_last"], args.sync_bn, args.compile)
    optimizer = make_optimizer(args.optimizer, net.parameters(), args.lr, args.wd)
    scaler = torch.amp.GradScaler(device.type) if speed["amp_dtype"] == torch.float16 else None

    first_epoch, skip_steps, last_epoch = (history[-1]["epoch"] + 1 if history else 1), 0, None
    partial = {"loss": 0.0, "correct": 0, "counted": 0, "seen": 0, "seconds": 0.0}
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        first_epoch, skip_steps, last_epoch = state["epoch"] + 1, state["step"], state["last_epoch"]
        partial = dict(state.get("partial") or partial)
        log(f"resuming {resume}: epoch {first_epoch}" + (f", step {skip_steps}" if skip_steps else ""))
    last_epoch = last_epoch or first_epoch + args.epochs - 1

    micro = args.batch_size // ctx.world_size
    sampler = RandomCropBatchSampler(train_set, args.batch_size * args.accum_steps, seed=args.seed,
                                     rank=ctx.rank, world_size=ctx.world_size)
    if speed["data_on_device"]:
        device_set = VOCSegDataset([x.to(device) for x in train_set.images], [y.to(device) for y in train_set.labels],
                                   train_set.names, args.crop)
        batches = lambda: crop_batches_on_device(device_set, sampler)
    else:
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_crops,
                                             num_workers=args.workers, pin_memory=device.type == "cuda",
                                             persistent_workers=args.workers > 0)
        batches = lambda: iter(loader)
    print_config(args, speed, ctx)
    best = max((h["val_miou"] for h in history), default=-1.0)

    def checkpoint(epoch: int, step: int, partial_stats: dict | None) -> dict:
        return make_checkpoint(net, args.model, class_names, colormap, plain_config(args), epoch=epoch, step=step,
                               last_epoch=last_epoch, history=history, partial=partial_stats,
                               optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None,
                               rng=rng_states())

    with StopOnInterrupt() as interrupt:
        for epoch in range(first_epoch, last_epoch + 1):
            net.train()
            sampler.set_epoch(epoch)
            stats = dict(partial) if epoch == first_epoch else {k: 0 * v for k, v in partial.items()}
            step, start = 0, time.perf_counter() - stats["seconds"]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            bar = tqdm(total=len(sampler), initial=skip_steps if epoch == first_epoch else 0, leave=False,
                       desc=f"epoch {epoch}/{last_epoch}", dynamic_ncols=True, disable=not ctx.is_main)
            for images, labels in batches():
                step += 1
                if epoch == first_epoch and step <= skip_steps:
                    continue   # the sampler is seeded per epoch, so skipping replays exactly the steps already done
                loss, c, n = train_step(net, optimizer, images, labels, device=device, void=args.void,
                                        reduction=args.loss, accum_steps=args.accum_steps,
                                        amp_dtype=speed["amp_dtype"], scaler=scaler,
                                        channels_last=speed["channels_last"], world_size=ctx.world_size)
                loss = ctx.all_sum(loss)[0]   # the shares add up to the batch's loss, the same on every process
                if not math.isfinite(loss):
                    raise TrainingStopped(
                        f"the loss became {loss} at epoch {epoch}, step {step}; {out / 'last.pt'} keeps the last good "
                        f"epoch ({epoch - 1}); try a lower --lr (now {args.lr:g})")
                stats["loss"] += loss
                stats["correct"] += c
                stats["counted"] += n
                stats["seen"] += len(images)
                bar.update()
                bar.set_postfix(loss=f"{stats['loss'] / step:.3f}")
                if interrupt.requested:
                    stats["seconds"] = time.perf_counter() - start
                    if ctx.is_main:
                        save_checkpoint(out / "last.pt", checkpoint(epoch - 1, step, stats))
                    raise TrainingStopped(
                        f"stopped at epoch {epoch}, step {step}, saved in {out / 'last.pt'}; continue with the same "
                        f"command plus --resume")
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats["seconds"] = time.perf_counter() - start
            loss_sum, correct, counted, seen = ctx.all_sum(stats["loss"], stats["correct"], stats["counted"],
                                                           stats["seen"])
            val = evaluate(unwrap(net), val_images, val_labels, len(class_names), device, micro,
                           speed["amp_dtype"], speed["channels_last"], ctx).compute(class_names)
            history.append({"epoch": epoch, "lr": args.lr, "train_loss": loss_sum / ctx.world_size / len(sampler),
                            "train_acc": correct / max(counted, 1), "val_acc": val["pixel_acc"],
                            "val_miou": val["miou"], "img_per_s": seen / stats["seconds"],
                            "seconds": stats["seconds"]})
            log(epoch_line(history[-1], last_epoch, device, flops), flush=True)
            if ctx.is_main:   # the checkpoint first: it is what a crash must not lose
                save_checkpoint(out / "last.pt", checkpoint(epoch, 0, None))
                if val["miou"] > best:
                    best = val["miou"]
                    save_checkpoint(out / "best.pt", checkpoint(epoch, 0, None))
                write_history(history, out / "history.csv")
                plot_curves(history, out / "curves.png", title=f"{args.model}, {args.optimizer} lr {args.lr:g}")
    log(f"wrote {out / 'history.csv'}, {out / 'curves.png'}, {out / 'last.pt'}, {out / 'best.pt'}")
    return history


def resume_checkpoint_path(args: argparse.Namespace) -> Path | None:
    """--resume alone means OUT/last.pt; --resume PATH names the file."""
    if not args.resume:
        return None
    path = Path(args.out) / "last.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise UsageError(f"--resume: {path} not found; nothing to resume (drop --resume to start afresh)")
    if args.finetune_from:
        raise UsageError("--resume and --finetune-from do not go together")
    return path


def check_checkpoint_matches(checkpoint: dict, model: str, class_names: Sequence[str], path) -> None:
    if checkpoint["model"] != model or checkpoint["num_classes"] != len(class_names):
        raise UsageError(f"{path}: it holds a {checkpoint['model']} with {checkpoint['num_classes']} classes, "
                         f"but this run asks for a {model} with {len(class_names)} classes")


# ---------------------------------------------------------------------------------------------------------------------
# 13. Prediction and evaluation for the scripts
# ---------------------------------------------------------------------------------------------------------------------


def predict_arg_parser(description: str, checkpoint: str, figure: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--checkpoint", default=checkpoint)
    p.add_argument("--voc-dir", help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--demo", action="store_true", help="use the built-in synthetic data")
    p.add_argument("--split", help="split to show or evaluate (default: the checkpoint's validation split)")
    p.add_argument("--classes", metavar="FILE", help="the class file the checkpoint was trained with (checked "
                   "against the classes the checkpoint carries)")
    p.add_argument("--ignore-index", type=int, metavar="K", help="label value K is void (default: as in training)")
    p.add_argument("--num", type=int, default=4, help="images in the figure")
    p.add_argument("--figure", default=figure)
    p.add_argument("--eval", action="store_true", help="full-resolution metrics over the whole split")
    p.add_argument("--metrics", help="JSON file for --eval (default: next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision, as in training (auto: bf16 on CUDA GPUs that have it and on CPUs with AMX)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    own = p.add_argument_group("your own images")
    own.add_argument("--images", nargs="+", metavar="PATH", help="predict these image files, folders or globs "
                     "(JPEG/PNG, any size) instead of a dataset split")
    own.add_argument("--save-dir", default="predictions", help="where --images writes NAME.png (class indices as a "
                     "palette PNG) and NAME_overlay.jpg")
    own.add_argument("--tta", action="store_true", help="with --images: average the logits with those of the "
                     "mirrored image")
    return p


def finish_predict_args(args: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """Fill --split and --ignore-index from the checkpoint's training run, and refuse a --classes file that
    disagrees with the classes the checkpoint carries."""
    config = checkpoint.get("config", {})
    if args.split is None:
        args.split = config.get("val_split", "val")
    if args.ignore_index is None:
        args.ignore_index = config.get("ignore_index")
    if args.tta and not args.images:
        raise UsageError("--tta applies to --images")
    if args.images and args.eval:
        raise UsageError("--images and --eval do not go together (--eval measures a dataset split)")
    if args.classes:
        check_classes_match(*load_classes(args.classes), checkpoint, args.classes)
    return args


def check_classes_match(class_names: Sequence[str], colormap: Sequence[Sequence[int]], checkpoint: dict,
                        classes_file: str) -> None:
    names, colors = checkpoint["class_names"], [list(c) for c in checkpoint["colormap"]]
    if len(class_names) != len(names):
        raise UsageError(f"--classes {classes_file}: {len(class_names)} classes, but the checkpoint was trained on "
                         f"{len(names)} ({', '.join(names)}); drop --classes to use the checkpoint's")
    for i, (given, color, name, trained) in enumerate(zip(class_names, colormap, names, colors)):
        if (given, list(color)) != (name, trained):
            raise UsageError(f"--classes {classes_file}: class {i} is {given!r} {list(color)}, but the checkpoint's "
                             f"is {name!r} {trained}; drop --classes to use the checkpoint's")


def read_checkpoint_split(args: argparse.Namespace, checkpoint: dict
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """The split to show or evaluate, its labels read with the checkpoint's classes."""
    return read_split(checkpoint_dataset_dir(args, checkpoint), args.split, checkpoint["colormap"], args.ignore_index)


def open_model(path: str | os.PathLike, device: torch.device) -> tuple[nn.Module, dict]:
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, path).to(device).eval(), checkpoint


def open_for_prediction(args: argparse.Namespace) -> tuple[torch.device, nn.Module, dict, argparse.Namespace]:
    """The predict scripts' start: device, model, checkpoint, and the flags completed from the checkpoint."""
    device = try_all_gpus_or_cpu(args.device)
    net, checkpoint = open_model(args.checkpoint, device)
    return device, net, checkpoint, finish_predict_args(args, checkpoint)


def checkpoint_dataset_dir(args: argparse.Namespace, checkpoint: dict) -> Path:
    """--voc-dir/--demo when given, else the data the checkpoint was trained on."""
    if args.voc_dir or args.demo:
        return dataset_dir(args.voc_dir, args.demo)
    config = checkpoint.get("config", {})
    return dataset_dir(config.get("voc_dir"), bool(config.get("demo")))


def image_miou(pred: torch.Tensor, label: torch.Tensor, num_classes: int, class_names: Sequence[str]) -> float:
    metrics = SegMetrics(num_classes)
    metrics.update(pred, label)
    return metrics.compute(class_names)["miou"]


def metrics_table(columns: dict[str, dict], class_names: Sequence[str]) -> str:
    """A readable per-class IoU table, one column per model; absent classes show as '-'."""
    fmt = lambda v: "     -" if v is None else f"{v:6.3f}"
    names = list(columns)
    width = max(len(c) for c in class_names) + 2
    lines = [" " * width + "".join(f"{n[:10]:>11}" for n in names)]
    for c in class_names:
        lines.append(f"{c:<{width}}" + "".join(f"{fmt(columns[n]['per_class_iou'][c]):>11}" for n in names))
    for key in ("pixel_acc", "d2l_pixel_acc", "mean_class_acc", "miou"):
        lines.append(f"{key:<{width}}" + "".join(f"{fmt(columns[n][key]):>11}" for n in names))
    return "\n".join(lines)


def evaluate_checkpoint(net: nn.Module, checkpoint: dict, images: Sequence[torch.Tensor],
                        labels: Sequence[torch.Tensor], device: torch.device, batch_size: int, **flags) -> dict:
    """The metrics JSON of ``--eval``: num_images, pixel_acc, mean_class_acc, miou, per_class_iou, d2l_pixel_acc,
    confusion_matrix."""
    metrics = evaluate(net, images, labels, checkpoint["num_classes"], device, batch_size, **flags)
    return {"num_images": len(images), **metrics.compute(checkpoint["class_names"])}


def write_metrics(net: nn.Module, checkpoint: dict, checkpoint_path: str | os.PathLike,
                  images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], device: torch.device,
                  args: argparse.Namespace, path: str | os.PathLike | None = None) -> dict:
    """Evaluate, and write the metrics JSON to ``path`` (default: metrics_SPLIT.json next to the checkpoint)."""
    metrics = evaluate_checkpoint(net, checkpoint, images, labels, device, args.batch_size,
                                  **inference_flags(args.amp, device))
    path = path or Path(checkpoint_path).with_name(f"metrics_{args.split}.json")
    write_json(metrics, path)
    print(f"{checkpoint['model'].upper()} ({checkpoint_path}): wrote {path}")
    return metrics


def write_json(data: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read it as JSON ({e}); delete it to redo that step")


def prediction_figure(models: Sequence[tuple[str, nn.Module]], images: Sequence[torch.Tensor],
                      labels: Sequence[torch.Tensor], names: Sequence[str], colormap: Sequence[Sequence[int]],
                      class_names: Sequence[str], device: torch.device, batch_size: int = 8, **flags):
    """Rows: image, ground truth, then one row per model, each panel titled with that image's mIoU."""
    rows = [[x.permute(1, 2, 0) for x in images], [label2image(y, colormap) for y in labels]]
    titles = [list(names), []]
    for _, net in models:
        preds = dict(predict_full_res(net, images, device, batch_size, **flags))
        rows.append([label2image(preds[i], colormap) for i in range(len(images))])
        titles.append([f"mIoU {image_miou(preds[i], labels[i], len(class_names), class_names):.2f}"
                       for i in range(len(images))])
    return show_images(rows, ["image", "ground truth", *[name for name, _ in models]], titles)


# ---------------------------------------------------------------------------------------------------------------------
# 14. Your own images: full-resolution prediction to palette PNGs and overlays
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def collect_image_paths(patterns: Sequence[str]) -> list[Path]:
    """Files as given, the JPEG/PNG files directly inside folders, and glob matches; in order, without repeats."""
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
        if not found:
            raise UsageError(f"--images {pattern}: no such file, and no image in such a folder or glob")
        paths += found
    return list(dict.fromkeys(paths))


def prediction_paths(image: Path, save_dir: Path) -> tuple[Path, Path]:
    return save_dir / f"{image.stem}.png", save_dir / f"{image.stem}_overlay.jpg"


def check_prediction_paths(images: Sequence[Path], save_dir: Path) -> None:
    """Refuse, before any work, two inputs that would write the same files, or an output that would replace an
    input (a PNG predicted into its own folder)."""
    inputs = {p.resolve() for p in images}
    first_by_stem: dict[str, Path] = {}
    for image in images:
        other = first_by_stem.setdefault(image.stem, image)
        if other != image:
            raise UsageError(f"{other} and {image} would both be written as {image.stem}.png; predict them into "
                             f"different --save-dir folders")
        if any(out.resolve() in inputs for out in prediction_paths(image, save_dir)):
            raise UsageError(f"--save-dir {save_dir}: the prediction of {image} would replace an input; choose "
                             f"another --save-dir")


def save_label_png(pred: torch.Tensor, colormap: Sequence[Sequence[int]], path: str | os.PathLike) -> None:
    """Class indices (H x W) as a palette PNG: viewers show the class colours, PIL (np.array) reads the indices."""
    im = Image.fromarray(pred.to(torch.uint8).cpu().numpy())
    im.putpalette(colormap_lut(colormap).flatten().tolist())   # an 'L' image with a palette becomes 'P'
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def predict_images(net: nn.Module, checkpoint: dict, args: argparse.Namespace, device: torch.device) -> None:
    """--images: for every file, SAVE_DIR/NAME.png and SAVE_DIR/NAME_overlay.jpg at the input's full size. Images
    go one at a time (the network pads to a multiple of 32 and crops back), so a large photo needs only its own
    memory. An unreadable file is reported on one line and skipped; the exit code is 2 at the end."""
    from tqdm import tqdm
    images = collect_image_paths(args.images)
    save_dir = Path(args.save_dir)
    check_prediction_paths(images, save_dir)
    class_names, colormap = checkpoint["class_names"], checkpoint["colormap"]
    failed = 0
    for path in tqdm(images, desc="predicting", unit="image", dynamic_ncols=True):
        try:
            image = read_image(path, upright=True)
        except UsageError as e:
            tqdm.write(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        _, pred = next(predict_full_res(net, [image], device, batch_size=1, tta=args.tta,
                                        **inference_flags(args.amp, device)))
        pred = pred.cpu()
        label_path, overlay_path = prediction_paths(path, save_dir)
        save_label_png(pred, colormap, label_path)
        overlay = overlay_with_legend(image, pred, colormap, class_names)
        atomic_write(overlay_path, lambda tmp: overlay.save(tmp, format="JPEG", quality=90))
    print(f"wrote {len(images) - failed} predictions (NAME.png, NAME_overlay.jpg) to {save_dir}")
    if failed:
        raise UsageError(f"{failed} of {len(images)} images could not be read (see above); the others were written")
