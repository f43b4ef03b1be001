"""The figures: the colour key of a prediction figure stays clear of every panel at any class count, panel titles
say what their second number is, and the training curves have axis labels, whole epochs and a marked fine-tune."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import some_define as sd
from support import figures
from support.data import voc_palette

CPU = torch.device("cpu")


class EveryClass(nn.Module):
    """A stand-in network whose prediction cycles through all ``num_classes`` classes, pixel by pixel."""

    def __init__(self, num_classes: int, shift: int = 0):
        super().__init__()
        self.num_classes, self.shift = num_classes, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        classes = (torch.arange(h * w).reshape(h, w) + self.shift) % self.num_classes
        return nn.functional.one_hot(classes, self.num_classes).permute(2, 0, 1).float().expand(n, -1, -1, -1)


def every_class_split(num_classes: int, count: int = 4) -> sd.SegDataset:
    """``count`` 32 x 32 images whose labels hold every class and a void border."""
    label = (torch.arange(32 * 32).reshape(32, 32) % num_classes).to(torch.uint8)
    label[0] = sd.VOID
    images = [torch.full((3, 32, 32), 40 * k, dtype=torch.uint8) for k in range(count)]
    return sd.SegDataset(images, [label.clone() for _ in range(count)], [f"img{k}" for k in range(count)], (32, 32))


def classes(num_classes: int) -> tuple[list[str], list[list[int]]]:
    palette = voc_palette()
    names = ["background"] + [f"class number {c}" for c in range(1, num_classes)]
    return names, [palette[3 * c:3 * c + 3] for c in range(num_classes)]


@pytest.mark.parametrize("num_classes", [2, 11, 21, 40])
@pytest.mark.parametrize("num_models", [1, 2])   # origin_out.png: 3 rows; compare.png: 4 rows
def test_the_colour_key_covers_no_panel(tmp_path, num_classes, num_models):
    names, colormap = classes(num_classes)
    models = [(f"net{k}", EveryClass(num_classes, shift=k)) for k in range(num_models)]
    fig = figures.prediction_figure(models, every_class_split(num_classes), colormap, names, CPU)
    fig.savefig(tmp_path / "figure.png", dpi=110, bbox_inches="tight")   # as files.save_figure writes it
    renderer = fig.canvas.get_renderer()
    legend, = fig.legends
    assert len(legend.get_texts()) == num_classes + 1   # every class and void
    key = legend.get_window_extent(renderer)
    assert len(fig.axes) == 4 * (2 + num_models)
    for ax in fig.axes:
        panel = ax.get_tightbbox(renderer)   # the panel with its title and row label
        assert not key.overlaps(panel), (ax.get_title(), key, panel)
    saved = fig.get_tightbbox(renderer)   # inches: the saved image's extent
    assert key.y0 / fig.dpi >= saved.y0 - 1e-6 and key.x0 / fig.dpi >= saved.x0 - 1e-6, "the key is in the image"
    assert key.x1 / fig.dpi <= saved.x1 + 1e-6


def test_panel_titles_name_the_non_background_mean():
    """Ground truth: top half background, bottom half class 1; predicted all background: background IoU 0.5,
    class 1 IoU 0, so the mIoU is 0.25 and the mean over the classes other than background 0.00."""
    label = torch.zeros(32, 32, dtype=torch.uint8)
    label[16:] = 1
    data = sd.SegDataset([torch.zeros(3, 32, 32, dtype=torch.uint8)], [label], ["img"], (32, 32))
    names, colormap = classes(2)
    always_background = EveryClass(1)   # one logit channel: class 0 everywhere
    fig = figures.prediction_figure([("FCN", always_background)], data, colormap, names, CPU)
    assert fig.axes[2].get_title() == "mIoU 0.25 (non-background 0.00)"
    assert figures.image_title(torch.zeros(32, 32, dtype=torch.long), label, ["sky", "road"]) == "mIoU 0.25"


def history(lrs: list[float]) -> list[dict]:
    """A training history with these per-epoch learning rates; validated on even epochs only."""
    return [{"epoch": e, "lr": lr, "train_loss": 2 / e, "train_acc": 0.5 + e / 100,
             "val_acc": 0.6 if e % 2 == 0 else None, "val_miou": 0.3 if e % 2 == 0 else None,
             "img_per_s": 10.0, "seconds": 1.0} for e, lr in enumerate(lrs, 1)]


def visible_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_curves_have_axis_labels_and_whole_epochs():
    fig = figures.plot_curves(history([1e-3, 1e-3]), "fcn, sgd")
    ax_loss, ax_acc = fig.axes
    assert (ax_loss.get_xlabel(), ax_loss.get_ylabel()) == ("epoch", "train loss")
    assert (ax_acc.get_xlabel(), ax_acc.get_ylabel()) == ("epoch", "pixel accuracy, mIoU")
    for ax in fig.axes:
        assert visible_ticks(ax) == [1, 2]
    assert fig.get_suptitle() == "fcn, sgd: epochs 1-2, lr 0.001"
    assert not [line for ax in fig.axes for line in ax.get_lines() if line.get_label().startswith("fine-tune")]


def test_a_fine_tune_is_marked_where_it_began_and_titled_with_each_parts_lr():
    fig = figures.plot_curves(history([1e-3] * 6 + [1e-5] * 4), "unet, adam", finetune_start=7)
    assert fig.get_suptitle() == "unet, adam: epochs 1-6, lr 0.001; fine-tune epochs 7-10, lr 1e-05"
    for ax in fig.axes:
        marker, = [line for line in ax.get_lines() if line.get_label() == "fine-tune from epoch 7"]
        assert list(marker.get_xdata()) == [7, 7]
        assert "fine-tune from epoch 7" in [t.get_text() for t in ax.get_legend().get_texts()]
        assert all(t == int(t) for t in visible_ticks(ax))


def test_a_schedule_is_titled_with_its_first_and_last_lr():
    poly = [0.01 * (1 - done / 3) ** 0.9 for done in range(3)]   # training.epoch_lr's poly schedule
    fig = figures.plot_curves(history(poly), finetune_start=3)
    assert fig.get_suptitle() == f"epochs 1-2, lr 0.01 to {poly[1]:g}; fine-tune epoch 3, lr {poly[2]:g}"


def test_study_curves_put_each_validation_at_its_epochs_times_the_median_epoch_time():
    def history(seconds: list[float]) -> list[dict]:
        return [dict(epoch=k, train_loss=1.0 / k, seconds=s, val_miou=0.1 * k if k % 2 == 0 else None)
                for k, s in enumerate(seconds, 1)]
    # The FCN's third epoch was paused for an hour: its median epoch is still 60 s.
    runs = {"fcn": ("fcn", history([60, 60, 3660, 60])), "unet": ("unet", history([360, 360, 360, 360]))}
    fig = figures.study_curves(runs, "street")
    ax_loss, ax_miou, ax_time = fig.axes
    (fcn_time, unet_time), (fcn_epochs, _) = ax_time.get_lines(), ax_miou.get_lines()
    assert list(fcn_epochs.get_xdata()) == [2, 4] and list(fcn_time.get_ydata()) == pytest.approx([0.2, 0.4])
    assert list(fcn_time.get_xdata()) == pytest.approx([2 / 60, 4 / 60])   # hours
    assert list(unet_time.get_xdata()) == pytest.approx([0.2, 0.4]) and unet_time.get_linestyle() == "-"
    assert fcn_time.get_linestyle() == "--" and ax_time.get_legend() is not None

