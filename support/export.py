"""Your own images: full-resolution prediction to palette PNGs of class indices and overlays with a legend."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from some_define import VOID, Speed, UsageError, colormap_lut, label2image, read_image

from .files import atomic_write, check_writable_dir, new_folder_removed_on_failure
from .tiles import DEFAULT_OVERLAP, Tile, predict_any_size

# What a folder given to --images is searched for: the formats the page (support/serve.py) takes. A file named
# directly or matched by a glob may be anything Pillow reads.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def collect_image_paths(patterns: Sequence[str]) -> list[Path]:
    """Files as given, the image files (IMAGE_SUFFIXES) directly inside folders, and glob matches; in order, without
    repeats."""
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


def palette_image(pred: torch.Tensor, colormap: Sequence[Sequence[int]]) -> Image.Image:
    """Class indices (H x W) as a palette image: viewers show the class colours, PIL (np.array) reads the indices."""
    im = Image.fromarray(pred.to(torch.uint8).cpu().numpy())
    im.putpalette(colormap_lut(colormap).flatten().tolist())   # an 'L' image with a palette becomes 'P'
    return im


def save_label_png(pred: torch.Tensor, colormap: Sequence[Sequence[int]], path: str | os.PathLike) -> None:
    im = palette_image(pred, colormap)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def overlay(image: torch.Tensor, pred: torch.Tensor, colormap: Sequence[Sequence[int]],
            class_names: Sequence[str], strength: float = 0.6) -> torch.Tensor:
    """The photo (3 x H x W uint8) with each predicted class's colour laid over it at ``strength`` and a 1-pixel
    outline in the pure colour; background (a class 0 named so) and void pixels stay the photo (H x W x 3)."""
    photo = image.permute(1, 2, 0).float()
    colours = label2image(pred, colormap).float()
    painted = (pred != VOID) & ((pred != 0) if class_names[0] == "background" else torch.ones_like(pred, dtype=bool))
    edge = torch.zeros_like(painted)
    edge[1:] |= pred[1:] != pred[:-1]
    edge[:, 1:] |= pred[:, 1:] != pred[:, :-1]
    out = torch.where(painted[..., None], strength * colours + (1 - strength) * photo, photo)
    out = torch.where((edge & painted)[..., None], colours, out)
    return out.round().clamp(0, 255).to(torch.uint8)


def overlay_with_legend(image: torch.Tensor, pred: torch.Tensor, colormap: Sequence[Sequence[int]],
                        class_names: Sequence[str]) -> Image.Image:
    """The overlay, and on its right a legend of the classes present (dark swatches with a light edge)."""
    blended = Image.fromarray(overlay(image, pred, colormap, class_names).numpy())
    present = [c for c in torch.unique(pred).tolist() if c != VOID]
    font = ImageFont.load_default(size=max(12, blended.height // 40))   # readable on photos and thumbnails alike
    line = round(font.size * 1.5)
    draw = ImageDraw.Draw(blended)
    width = line + max(round(draw.textlength(class_names[c], font=font)) for c in present) + line
    canvas = Image.new("RGB", (blended.width + width, max(blended.height, line * (len(present) + 1))), "white")
    canvas.paste(blended)
    draw = ImageDraw.Draw(canvas)
    for row, c in enumerate(present):
        x, y = blended.width + line // 2, line // 2 + row * line
        dark = sum(colormap[c]) < 150
        draw.rectangle([x, y, x + font.size, y + font.size], fill=tuple(colormap[c]),
                       outline=(200, 200, 200) if dark else (0, 0, 0), width=2 if dark else 1)
        draw.text((x + line, y), class_names[c], fill="black", font=font)
    return canvas


def predict_files(net: nn.Module, checkpoint: dict, patterns: Sequence[str], save_dir: str | os.PathLike,
                   device: torch.device, tta: bool = False, tile: Tile = "auto", overlap: float = DEFAULT_OVERLAP,
                   speed: Speed = Speed()) -> None:
    """For every image file, SAVE_DIR/NAME.png and SAVE_DIR/NAME_overlay.jpg at the input's full size, one image at
    a time, a large one in tiles (``tile``, ``overlap``: see support/tiles.py). An unreadable file is reported on
    one line and skipped; the exit code is 2 at the end. A SAVE_DIR made by a run that wrote nothing is removed."""
    from tqdm import tqdm
    images = collect_image_paths(patterns)
    save_dir = Path(save_dir)
    check_prediction_paths(images, save_dir)
    failed = 0
    with new_folder_removed_on_failure(save_dir):
        check_writable_dir(save_dir, "--save-dir")   # before any work, not after the last image
        for path in tqdm(images, desc="predicting", unit="image", dynamic_ncols=True,
                         disable=not sys.stderr.isatty()):
            try:
                image = read_image(path, upright=True)
            except UsageError as e:
                if len(images) == 1:
                    raise   # the only input: its problem is the run's one line
                tqdm.write(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            write_prediction(image, predict_any_size(image, net, device, tile, overlap, speed, tta), checkpoint,
                             *prediction_paths(path, save_dir))
        written = len(images) - failed
        if written:
            print(f"wrote {written} prediction{'s' * (written != 1)} (NAME.png, NAME_overlay.jpg) to {save_dir}")
        if failed:
            raise UsageError(f"{failed} of {len(images)} images could not be read (see above)"
                             + ("; the others were written" if written else "; nothing was written"))


def write_prediction(image: torch.Tensor, pred: torch.Tensor, checkpoint: dict, label_path: Path,
                     overlay_path: Path) -> None:
    """NAME.png (class indices as a palette PNG) and NAME_overlay.jpg (the photo, coloured, with a legend)."""
    save_label_png(pred, checkpoint["colormap"], label_path)
    blended = overlay_with_legend(image, pred, checkpoint["colormap"], checkpoint["class_names"])
    atomic_write(overlay_path, lambda tmp: blended.save(tmp, format="JPEG", quality=90))
