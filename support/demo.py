"""The synthetic demo dataset: small images in exact VOC2012 layout, generated once, deterministically, so that
every script runs end to end on a laptop CPU without a download. Synthetic shapes, not photos."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from some_define import VOID

from .data import is_voc_dir, voc_palette

ROOT = Path(__file__).resolve().parent.parent
DEMO_VERSION = 1
DEMO_DIR = ROOT / ".cache" / f"demo-voc-v{DEMO_VERSION}"
DEMO_SPLITS = {"train": 160, "val": 40}
# What the scripts and the page say of a model trained on this data when it is shown other pictures.
DEMO_NOTE = ("trained on the synthetic demo data (coloured shapes, not photos), so predictions on photos mean "
             "little; train on VOC or your own data for those")
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
