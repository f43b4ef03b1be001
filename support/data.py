"""A dataset folder's layout, its class file, and reading a split of it as the training run and prediction use it
(support/download.find_data finds the folder)."""
from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

from some_define import (VOC_CLASSES, VOC_COLORMAP, VOID, VOID_COLOR, RandomCropBatchSampler, SegDataset,
                         UsageError, read_image, read_label, voc_colormap2label, voc_split_files)

from .errors import naming_flags
from .hooks import progress

VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_URL = f"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{VOC_TAR}"


def voc_palette() -> list[int]:
    """The 256-entry palette of VOC's label PNGs (VOC_COLORMAP, extended by VOC's bit-shuffling rule)."""
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


SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def cielab(rgb: np.ndarray) -> np.ndarray:
    """sRGB colours (N x 3, 0..255) in CIELAB (D65), where distances follow what the eye sees; in RGB, blues that
    look alike are far apart and greens that look different are close."""
    c = rgb / 255
    xyz = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92) @ SRGB_TO_XYZ.T / D65_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def distinct_colours(count: int) -> list[list[int]]:
    """The colours of classes that a class file names without one: each in turn the colour of a 16-level RGB grid
    farthest (in CIELAB) from black, white, the void colour and the colours before it (Glasbey et al., "Colour
    displays for categorical images", 2007). VOC's palette, used before, made class 0 black (a swatch lost in the
    legend, an overlay that darkens the photo) and gives neighbouring indices near shades (CamVid's building and
    car: two reds); these are far from black, white and void, and the first 21 at least 40 CIELAB units apart
    (VOC's colours: 8.8), the first 40 at least 29; any number up to 255 comes out distinct."""
    levels = np.linspace(0, 255, 16).round()
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = cielab(grid)
    avoided = cielab(np.array([(0, 0, 0), (255, 255, 255), VOID_COLOR], dtype=float))
    distance = np.linalg.norm(lab[:, None] - avoided[None], axis=2).min(axis=1)
    colours = []
    for _ in range(count):
        pick = int(distance.argmax())
        colours.append([int(v) for v in grid[pick]])
        distance = np.minimum(distance, np.linalg.norm(lab - lab[pick], axis=1))
    return colours


def is_voc_dir(path: Path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "SegmentationClass").is_dir() \
        and (path / "ImageSets" / "Segmentation").is_dir()


def is_pair_list_dir(path: Path) -> bool:
    """A folder of ``image mask`` pair lists (SegNet/CamVid style): NAME.txt files and no VOC tree."""
    return path.is_dir() and not is_voc_dir(path) and any(path.glob("*.txt"))


def recognise_layout(path: str | os.PathLike) -> Path:
    """A VOC2012 folder (or a folder holding VOC2012 or VOCdevkit/VOC2012; a path named VOC2012 is also looked for
    in ../VOCdevkit/, where --download extracts it), else a folder of pair lists."""
    path = Path(path)
    candidates = [path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"]
    if path.name == "VOC2012":
        candidates.append(path.parent / "VOCdevkit" / "VOC2012")
    for candidate in candidates:
        if is_voc_dir(candidate):
            return candidate
    if is_pair_list_dir(path):
        return path
    tried = ", ".join(str(c) for c in candidates)
    raise UsageError(
        f"no dataset found (tried {tried}); expected a VOC2012 folder with JPEGImages/, SegmentationClass/ and "
        f"ImageSets/Segmentation/{{train,val}}.txt, from {VOC_TAR} (2 GB, {VOC_URL}), or a folder with "
        f"train.txt/val.txt lists of 'image mask' pairs; pass --voc-dir PATH, train with --download to fetch VOC, "
        f"or run with --demo to use the built-in synthetic data")


def resolve_listed_path(data_dir: Path, text: str) -> Path:
    """A path from a pair list: relative to the dataset folder; an absolute one that does not exist (the SegNet
    tutorial's lists name /SegNet/CamVid/train/X.png) is looked for in the dataset folder by its last two parts."""
    path = Path(text)
    if not path.is_absolute():
        return data_dir / path
    return path if path.exists() else data_dir.joinpath(*path.parts[-2:])


def pair_list_files(data_dir: Path, split: str) -> list[tuple[str, Path, Path]]:
    """(name, image file, mask file) of every ``image mask`` line of DATA_DIR/SPLIT.txt."""
    split_file = data_dir / f"{split}.txt"
    if not split_file.is_file():
        raise UsageError(f"{split_file}: split file not found; check --voc-dir or the split name")
    files = []
    for number, line in enumerate(split_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise UsageError(f"{split_file}, line {number}: expected 'image mask' (two paths), got {line.strip()!r}")
        image, mask = (resolve_listed_path(data_dir, field) for field in fields)
        files.append((image.stem, image, mask))
    if not files:
        raise UsageError(f"{split_file}: the split is empty")
    return files


CLASS_LINE_RULE = ("a line is 'name' or 'name R G B' (R G B: integers 0..255); a name may hold spaces "
                   "('potted plant'), and without a colour it must not end in a number")


def class_line(path: str | os.PathLike, number: int, line: str, default_color: list[int]) -> tuple[str, list[int]]:
    """One line of a class file as (name, colour): the last three words are the colour if all three are integers;
    a name that ends in one or two integers is refused, as a colour with a number missing would be misread."""
    words = line.split()
    numbers = 0
    while numbers < min(len(words), 3) and re.fullmatch(r"[+-]?[0-9]+", words[-1 - numbers]):
        numbers += 1
    where = f"{path}, line {number}: {line.strip()!r}"
    if numbers in (1, 2):
        raise UsageError(f"{where} ends in {numbers} number{'s' * (numbers - 1)}, not 3; {CLASS_LINE_RULE}")
    if numbers == len(words):
        raise UsageError(f"{where} has a colour but no class name; {CLASS_LINE_RULE}")
    if numbers == 0:
        return " ".join(words), default_color
    color = [int(w) for w in words[-3:]]
    if not all(0 <= v <= 255 for v in color):
        raise UsageError(f"{where}: a colour value is outside 0..255; {CLASS_LINE_RULE}")
    return " ".join(words[:-3]), color


def read_classes(path: str | os.PathLike) -> tuple[list[str], list[list[int]]]:
    """A class file: one class per line, ``name`` or ``name R G B``; a class's index is its line number.
    A class without a colour gets distinct_colours' colour of its index."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--classes {path}: cannot read it ({e})")
    while lines and not lines[-1].strip():
        lines.pop()
    palette = distinct_colours(len(lines))
    names, colormap = [], []
    for index, line in enumerate(lines):
        if not line.strip():   # a blank line would silently shift every later index
            raise UsageError(f"{path}, line {index + 1}: empty; each line is a class and its index is the line number")
        name, color = class_line(path, index + 1, line, palette[index])
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


def read_examples(files: Sequence[tuple[str, Path, Path]], colormap: Sequence[Sequence[int]],
                  ignore_index: int | None = None, skip_bad: bool = False, source: str = "the split"
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Images and labels as class indices (uint8, about 10x less memory than the book's float32) of (name, image,
    label) files. A bad file stops with its name, or with ``skip_bad`` is left out with a warning."""
    colormap2label = voc_colormap2label(colormap)

    def read_pair(name: str, image_path: Path, label_path: Path) -> tuple[torch.Tensor, torch.Tensor] | str:
        try:
            image = read_image(image_path)
            label = read_label(label_path, colormap2label, len(colormap), ignore_index)
            if label.shape != image.shape[1:]:
                raise UsageError(f"{label_path}: label is {tuple(label.shape)} but its image is "
                                 f"{tuple(image.shape[1:])}")
            return image, label
        except UsageError as e:
            if not skip_bad:
                raise
            return str(e)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:   # PIL decodes without the GIL
        pairs = list(progress(pool.map(lambda f: read_pair(*f), files), len(files), "reading"))
    skipped = [p for p in pairs if isinstance(p, str)]
    for problem in skipped:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if skipped:
        print(f"warning: --skip-bad left out {len(skipped)} of {len(files)} examples of {source}", file=sys.stderr)
    kept = [(p, f[0]) for p, f in zip(pairs, files) if not isinstance(p, str)]
    if not kept:
        raise UsageError(f"no readable example left in {source}")
    return [p[0] for p, _ in kept], [p[1] for p, _ in kept], [n for _, n in kept]


def read_split(data_dir: str | os.PathLike, split: str, colormap: Sequence[Sequence[int]],
               ignore_index: int | None = None, skip_bad: bool = False,
               crop_size: tuple[int, int] = (320, 480)) -> SegDataset:
    """A split of a dataset folder (VOC layout or pair lists), its labels read as indices of ``colormap``'s
    classes."""
    data_dir = Path(data_dir)
    with naming_flags("check --voc-dir or the split name"):
        files = voc_split_files(data_dir, split) if is_voc_dir(data_dir) else pair_list_files(data_dir, split)
    with naming_flags("check the file, the class list (--classes) or --ignore-index"):
        examples = read_examples(files, colormap, ignore_index, skip_bad, source=f"the {split} split")
    return SegDataset(*examples, crop_size=crop_size)


def to_device(data: SegDataset, device: torch.device) -> SegDataset:
    """The same split with its uint8 tensors on ``device`` (crops are then sliced there)."""
    return SegDataset([x.to(device) for x in data.images], [y.to(device) for y in data.labels], data.names,
                      data.crop_size)


def chosen_examples(data: SegDataset, n: int, spread: bool = False) -> SegDataset:
    """``n`` examples of a split for a figure: the first ones, or (``spread``) evenly spaced over the split from its
    first to its last, so that a split of consecutive video frames does not show one scene n times."""
    step = (len(data) - 1) / (n - 1) if spread and n > 1 and len(data) > n else 1
    picked = sorted({round(i * step) for i in range(min(n, len(data)))})
    return SegDataset([data.images[i] for i in picked], [data.labels[i] for i in picked],
                      [data.names[i] for i in picked], data.crop_size)


CLASS_WEIGHT_POWERS = {"none": None, "median-freq": 1.0, "median-freq-sqrt": 0.5}   # --class-weights


def median_frequency_weights(labels: Sequence[torch.Tensor], num_classes: int, power: float = 1.0) -> list[float]:
    """SegNet's class balancing: median(freq) / freq(c), where freq(c) is the pixels of class c over the pixels of
    the images that contain c (void left out); to the ``power`` (0.5: a softer balance). A class absent from every
    mask gets 0 (it is never a target)."""
    pixels, pixels_where_present = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes,
                                                                                             dtype=torch.float64)
    for label in labels:
        counts = torch.bincount(label[label != VOID].long().flatten(), minlength=num_classes)[:num_classes].double()
        pixels += counts
        pixels_where_present += (counts > 0) * counts.sum()
    present = pixels > 0
    freq = pixels[present] / pixels_where_present[present]
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = (float(np.median(freq.numpy())) / freq) ** power
    return weights.tolist()


def crop_batches_on_device(dataset: SegDataset, sampler: RandomCropBatchSampler
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The data path when the split lives in GPU memory: slice crops there, no worker processes, no copies."""
    for batch in sampler:
        yield default_collate([dataset[key] for key in batch])


def training_batches(train_set: SegDataset, sampler: RandomCropBatchSampler, device: torch.device,
                     data_on_device: bool, workers: int) -> Callable[[], Iterator]:
    """A function that starts one epoch's batches: crops sliced on the GPU, or a DataLoader."""
    if data_on_device:
        device_set = to_device(train_set, device)
        return lambda: crop_batches_on_device(device_set, sampler)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return lambda: iter(loader)
