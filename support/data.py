"""Finding a dataset folder, its class file, and reading a split of it as the training run and prediction use it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from some_define import (VOC_CLASSES, VOC_COLORMAP, VOID, SegDataset, UsageError, read_examples, voc_palette,
                         voc_split_files)

VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_URL = f"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{VOC_TAR}"


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


def dataset_dir(voc_dir: str | None, demo: bool) -> Path:
    """The demo data (generated on first use) or the VOC-layout folder at ``voc_dir``."""
    if demo:
        from .demo import make_demo_voc
        return make_demo_voc()
    return find_voc_dir(voc_dir or "VOC2012")


def read_classes(path: str | os.PathLike) -> tuple[list[str], list[list[int]]]:
    """A class file: one class per line, ``name`` or ``name R G B``; a class's index is its line number.
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


def dataset_classes(classes_file: str | None) -> tuple[list[str], list[list[int]]]:
    """Class names and colours of a class file, else VOC's."""
    return read_classes(classes_file) if classes_file else (list(VOC_CLASSES), [list(c) for c in VOC_COLORMAP])


def read_split(data_dir: str | os.PathLike, split: str, colormap: Sequence[Sequence[int]],
               ignore_index: int | None = None, skip_bad: bool = False,
               crop_size: tuple[int, int] = (320, 480)) -> SegDataset:
    """A split of a dataset folder, its labels read as indices of ``colormap``'s classes."""
    files = voc_split_files(data_dir, split)
    examples = read_examples(files, colormap, ignore_index, skip_bad, source=f"the {split} split")
    return SegDataset(*examples, crop_size=crop_size)


def to_device(data: SegDataset, device: torch.device) -> SegDataset:
    """The same split with its uint8 tensors on ``device`` (crops are then sliced there)."""
    return SegDataset([x.to(device) for x in data.images], [y.to(device) for y in data.labels], data.names,
                      data.crop_size)


def first_examples(data: SegDataset, n: int) -> SegDataset:
    """The first ``n`` examples of a split (for figures)."""
    return SegDataset(data.images[:n], data.labels[:n], data.names[:n], data.crop_size)
