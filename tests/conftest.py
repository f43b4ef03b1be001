"""Shared helpers for the test-suite.

``make_voc_tree`` writes a tiny dataset in exact VOC2012 layout (JPEGImages/*.jpg, SegmentationClass/*.png as VOC
palette PNGs or RGB PNGs, ImageSets/Segmentation/{train,val}.txt). Its images and labels come from
``synthetic_image`` / ``synthetic_label``, so a test can recompute exactly what was written.

Other test files can use the plain functions (``from conftest import make_voc_tree, run_script, REPO_ROOT``) or the
fixtures ``voc_tree_factory`` and ``tiny_voc``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import some_define as sd  # noqa: E402
from support.data import voc_palette  # noqa: E402

# One intra-op thread unless the caller chose otherwise: on a 2-core machine that also runs other work, two OpenMP
# threads spin-waiting on each other make a training step ~40x slower (measured: 2.3 s vs 0.06 s for the FCN at
# 2 x 3 x 64 x 64). The scripts run by run_script get the same setting through OMP_NUM_THREADS.
THREADS = os.environ.get("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(THREADS))

# Classes drawn into the synthetic labels (all < 21, so they are valid VOC class indices).
SYNTHETIC_CLASSES = (1, 6, 8, 15)


def synthetic_label(h: int, w: int, k: int) -> np.ndarray:
    """A deterministic label (uint8, H x W): background, one rectangle of a class that depends on k, a 1-pixel void
    border around the rectangle."""
    label = np.zeros((h, w), dtype=np.uint8)
    cls = SYNTHETIC_CLASSES[k % len(SYNTHETIC_CLASSES)]
    y0, x0 = h // 4, w // 4
    y1, x1 = max(y0 + 2, (3 * h) // 4), max(x0 + 2, (3 * w) // 4)
    label[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = sd.VOID
    label[y0:y1, x0:x1] = cls
    return label


def synthetic_image(h: int, w: int, k: int) -> np.ndarray:
    """A deterministic, smooth RGB image (uint8, H x W x 3) that goes with synthetic_label(h, w, k)."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([40 + (yy * 3) % 150, 60 + (xx * 2) % 120, np.full((h, w), 30 + 20 * (k % 8))], axis=-1)
    label = synthetic_label(h, w, k)
    image[(label != 0) & (label != sd.VOID)] = (200, 180 - 10 * (k % 4), 60)
    return image.astype(np.uint8)


def write_palette_label(path: Path, label: np.ndarray) -> None:
    """Write class indices as a VOC palette ('P') PNG."""
    im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))   # mode 'L'
    im.putpalette(voc_palette())                                      # 'L' + palette -> 'P'
    assert im.mode == "P"
    im.save(path)


def write_rgb_label(path: Path, label: np.ndarray) -> None:
    """Write class indices as an RGB PNG in VOC's colours (void in VOC's boundary colour)."""
    rgb = sd.label2image(torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))).numpy()
    Image.fromarray(rgb).save(path)


def make_voc_tree(root: str | os.PathLike, sizes_train: Sequence[tuple[int, int]],
                  sizes_val: Sequence[tuple[int, int]], label_mode: str = "P", layout: str = "VOC2012") -> Path:
    """Write a tiny VOC-layout dataset under ``root`` and return its VOC2012 folder.

    sizes_*: (height, width) of each image of the split. label_mode: 'P' (palette PNG, as VOC ships them) or 'RGB'.
    layout: 'VOC2012' (root/VOC2012), 'VOCdevkit' (root/VOCdevkit/VOC2012) or 'flat' (root itself).
    Image k of split s is named f"{s}_{k:03d}" and holds synthetic_image/synthetic_label(h, w, k)."""
    root = Path(root)
    voc_dir = {"VOC2012": root / "VOC2012", "VOCdevkit": root / "VOCdevkit" / "VOC2012", "flat": root}[layout]
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    write_label = {"P": write_palette_label, "RGB": write_rgb_label}[label_mode]
    for split, sizes in (("train", sizes_train), ("val", sizes_val)):
        names = []
        for k, (h, w) in enumerate(sizes):
            name = f"{split}_{k:03d}"
            Image.fromarray(synthetic_image(h, w, k)).save(voc_dir / "JPEGImages" / f"{name}.jpg", quality=95)
            write_label(voc_dir / "SegmentationClass" / f"{name}.png", synthetic_label(h, w, k))
            names.append(name)
        (voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return voc_dir


def train_config_of(parser, *argv: str, preset: tuple[str, dict] | None = None):
    """The TrainConfig a training script builds from ``argv`` (its main's merge, without training)."""
    from support import cli
    argv = list(argv)
    parser.parse_args(argv)
    return cli.train_config(cli.given_flags(parser, argv), cli.script_defaults(parser), preset)


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a repository script (e.g. 'origin_train.py', '--demo', ...) with this Python, from the repository root."""
    env = dict(os.environ, TQDM_DISABLE="1", MPLBACKEND="Agg", OMP_NUM_THREADS=THREADS)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def voc_tree_factory(tmp_path):
    """make_voc_tree bound to a fresh folder under tmp_path per call."""
    counter = iter(range(1_000_000))

    def factory(sizes_train, sizes_val, **kwargs) -> Path:
        return make_voc_tree(tmp_path / f"tree{next(counter)}", sizes_train, sizes_val, **kwargs)
    return factory


# Train: 6 images, one smaller than a 32 x 32 crop in both directions and one in one direction; val: 3 images.
TINY_TRAIN_SIZES = [(48, 64), (40, 56), (20, 28), (64, 40), (24, 70), (50, 50)]
TINY_VAL_SIZES = [(48, 64), (30, 45), (64, 96)]


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    return make_voc_tree(tmp_path / "data", TINY_TRAIN_SIZES, TINY_VAL_SIZES)
