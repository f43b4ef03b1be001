"""Tiled (sliding-window) prediction: a photo of any size in bounded memory, logits of overlapping windows blended
with weights that fall off toward each window's edges, then argmax."""
from __future__ import annotations

import math
from itertools import groupby
from typing import Sequence

import torch
from torch import nn

from some_define import STRIDE, Speed, UsageError, padded_logits, padded_size, predict

from .hooks import progress
from .speed import look_at_load

DEFAULT_TILE = (512, 512)
DEFAULT_OVERLAP = 0.25
# --tile auto tiles images above 1 Mpixel: whole, they need more than ~1.4 GiB on a GPU in bf16 (the U-Net at
# 4000 x 3000 peaks at 17.2 GiB), while VOC images (500 x 375) and screen-sized pictures still go whole.
AUTO_TILE_PIXELS = 1024 * 1024

Tile = tuple[int, int] | str   # (H, W), "auto" or "off"


def parse_tile(values: Sequence[str], overlap: float) -> Tile:
    """--tile auto | off | H W (positive multiples of 32) and --tile-overlap F (0 <= F < 1), checked."""
    if not 0 <= overlap < 1:
        raise UsageError(f"--tile-overlap {overlap}: must be at least 0 and below 1 (e.g. {DEFAULT_OVERLAP})")
    if list(values) in (["auto"], ["off"]):
        return values[0]
    try:
        h, w = (int(v) for v in values)
    except ValueError:
        raise UsageError(f"--tile {' '.join(values)}: give auto, off, or H W (e.g. --tile 512 512)")
    if min(h, w) <= 0 or h % STRIDE or w % STRIDE:
        raise UsageError(f"--tile {h} {w}: both sides must be positive multiples of {STRIDE} (the networks "
                         f"downsample by {STRIDE})")
    return h, w


def ramp(n: int) -> torch.Tensor:
    """1-D blending weights of an n-pixel window: sin^2, ~1 in the middle, falling toward (never to) 0 at both
    ends, so a pixel is decided mostly by the window that sees the most context around it."""
    # In Python's floats, not a float64 tensor: MPS has none, and tests/test_devices.py forbids them everywhere.
    return torch.tensor([math.sin(math.pi * (i + 0.5) / n) ** 2 for i in range(n)], dtype=torch.float32)


def blend_weights(tile_hw: tuple[int, int], padded_hw: tuple[int, int]) -> torch.Tensor:
    """The weights of a whole window; flat along a side where one window spans the (padded) image, which has no
    neighbour to blend with there (so a single window gives exactly the whole-image prediction)."""
    along = lambda n, length: torch.ones(n) if n == length else ramp(n)
    return along(tile_hw[0], padded_hw[0])[:, None] * along(tile_hw[1], padded_hw[1])[None, :]


def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Window starts along one side: a stride of tile * (1 - overlap) rounded down to a multiple of 32 (at least
    32), so the windows share the network's stride-32 grid; the last window flush with the border."""
    if length <= tile:
        return [0]
    stride = min(tile, max(STRIDE, int(tile * (1 - overlap)) // STRIDE * STRIDE))
    return list(range(0, length - tile, stride)) + [length - tile]


def window_size(image_hw: tuple[int, int], tile_hw: tuple[int, int]) -> tuple[int, int]:
    """A tile larger than the (padded) image shrinks to it."""
    return min(tile_hw[0], padded_size(image_hw)[0]), min(tile_hw[1], padded_size(image_hw)[1])


def tile_windows(image_hw: tuple[int, int], tile_hw: tuple[int, int], overlap: float
                 ) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of every window, row by row. The windows tile the padded image, so all of them
    sit on the network's stride-32 grid as in whole-image prediction, and are cut at the image's border (the network
    pads them back, as it pads the whole image)."""
    (h, w), (ph, pw), (th, tw) = image_hw, padded_size(image_hw), window_size(image_hw, tile_hw)
    return [(top, left, min(th, h - top), min(tw, w - left))
            for top in axis_starts(ph, th, overlap) for left in axis_starts(pw, tw, overlap)]


def tile_logits(net: nn.Module, tile: torch.Tensor, device: torch.device, speed: Speed, tta: bool) -> torch.Tensor:
    """float32 logits (C x h x w) of one uint8 window, computed as predict_full_res computes a whole image."""
    h, w = tile.shape[1:]
    return padded_logits(net, [tile], device, speed, tta)[0, :, :h, :w].float()


@torch.inference_mode()
def predict_tiled(image: torch.Tensor, net: nn.Module, device: torch.device, tile_hw: tuple[int, int],
                  overlap: float = DEFAULT_OVERLAP, speed: Speed = Speed(),
                  tta: bool = False) -> torch.Tensor:
    """The classes (H x W, on the CPU) of one uint8 image from overlapping windows. The blended logits live in one
    strip of a window's height (C x tile H x W float32 on ``device``): a row of windows is added to it, the rows
    above the next row's windows are final and go to their argmax, and the strip moves down."""
    net.eval()
    if speed.channels_last:
        net.to(memory_format=torch.channels_last)
    height, width = image.shape[1:]
    th, tw = window_size((height, width), tile_hw)
    weights = blend_weights((th, tw), padded_size((height, width))).to(device)
    pred = torch.empty(height, width, dtype=torch.int64)
    strip, strip_top = None, 0
    # The argmax of the weighted sum is that of the weighted mean: every pixel's weight total is positive.
    windows = tile_windows((height, width), tile_hw, overlap)
    for top, row in groupby(progress(windows, len(windows), "windows"), key=lambda window: window[0]):
        if strip is not None:
            done = top - strip_top
            pred[strip_top:top] = strip[:, :done].argmax(0).cpu()
            strip[:, :th - done] = strip[:, done:].clone()
            strip[:, th - done:] = 0
        strip_top = top
        look_at_load()   # a large photo takes minutes on a CPU: the load can change meanwhile
        for _, left, h, w in row:
            logits = tile_logits(net, image[:, top:top + h, left:left + w], device, speed, tta)
            if strip is None:
                strip = torch.zeros(logits.shape[0], th, width, device=device)
            strip[:, :h, left:left + w] += logits * weights[:h, :w]
    pred[strip_top:] = strip[:, :height - strip_top].argmax(0).cpu()
    return pred


def chosen_tile(image_hw: tuple[int, int], tile: Tile) -> tuple[int, int] | None:
    """The window size for this image, or None for the whole image (--tile off, a small image under auto, or a
    tile that covers the image)."""
    if tile == "off" or (tile == "auto" and image_hw[0] * image_hw[1] <= AUTO_TILE_PIXELS):
        return None
    size = DEFAULT_TILE if tile == "auto" else tile
    return None if size[0] >= image_hw[0] and size[1] >= image_hw[1] else size


def predict_any_size(image: torch.Tensor, net: nn.Module, device: torch.device, tile: Tile = "auto",
                     overlap: float = DEFAULT_OVERLAP, speed: Speed = Speed(), tta: bool = False) -> torch.Tensor:
    """The classes (H x W, on the CPU) of one uint8 image, whole or tiled as ``tile`` decides for its size."""
    look_at_load()   # every image of --images and every request of the page
    size = chosen_tile(tuple(image.shape[1:]), tile)
    if size is None:
        return predict(image, net, device, speed, tta).cpu()
    return predict_tiled(image, net, device, size, overlap, speed, tta)
