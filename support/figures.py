"""The project's figures: predictions beside the ground truth with a colour key, and training curves."""
from __future__ import annotations

import statistics
from typing import Sequence

import torch
from torch import nn

from some_define import (Speed, VOID, VOID_COLOR, SegDataset, SegMetrics, label2image, plt_module, predict_full_res,
                         show_images)


def add_class_legend(fig, labels: Sequence[torch.Tensor], colormap: Sequence[Sequence[int]],
                     class_names: Sequence[str]) -> None:
    """A colour key under the figure: the classes that appear in ``labels``, and void if any pixel is void."""
    from matplotlib.patches import Patch
    present = sorted(set().union(*(torch.unique(y).tolist() for y in labels)))
    handles = [Patch(facecolor=[v / 255 for v in colormap[c]], edgecolor="0.5", label=class_names[c])
               for c in present if c != VOID]
    if VOID in present:
        handles.append(Patch(facecolor=[v / 255 for v in VOID_COLOR], edgecolor="0.5",
                             label="void (unlabelled, not scored)"))
    # Hung from the figure's bottom edge, it grows downwards with more classes (save_figure's tight box takes it in);
    # anchored by its bottom instead, VOC's 21 classes reached up over the last row of panels.
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0))


def image_title(pred: torch.Tensor, label: torch.Tensor, class_names: Sequence[str]) -> str:
    """The image's mIoU over the classes in its ground truth or prediction; with a background class also the mean
    over the other classes, so that predicting everything as background does not look half right."""
    metrics = SegMetrics(len(class_names))
    metrics.update(pred.cpu(), label)
    result = metrics.compute(class_names)
    title = f"mIoU {result['miou']:.2f}"
    others = [v for v in list(result["per_class_iou"].values())[1:] if v is not None]
    if class_names[0] == "background" and others:
        title += f" (non-background {sum(others) / len(others):.2f})"
    return title


def prediction_figure(models: Sequence[tuple[str, nn.Module]], data: SegDataset, colormap: Sequence[Sequence[int]],
                      class_names: Sequence[str], device: torch.device, batch_size: int = 8, title: str = "",
                      speed: Speed = Speed()):
    """Rows: image, ground truth, then one row per model, each panel titled with that image's mIoU; a colour key
    of the classes shown."""
    images, labels = data.images, data.labels
    rows = [[x.permute(1, 2, 0) for x in images], [label2image(y, colormap) for y in labels]]
    titles = [list(data.names), []]
    shown = list(labels)
    for _, net in models:
        preds = dict(predict_full_res(net, images, device, batch_size, speed))
        rows.append([label2image(preds[i], colormap) for i in range(len(images))])
        titles.append([image_title(preds[i], labels[i], class_names) for i in range(len(images))])
        shown += [preds[i].cpu() for i in range(len(images))]
    fig = show_images(rows, ["image", "ground truth", *[name for name, _ in models]], titles)
    add_class_legend(fig, shown, colormap, class_names)
    if title:
        fig.suptitle(title, y=1.02)
    return fig


def epochs_and_lr(rows: list[dict]) -> str:
    """'epochs 1-6, lr 0.001' (or 'lr 0.01 to 0.0012' where a schedule changed it) from the history's own lr
    column, so that no epoch is credited with a learning rate it did not run at."""
    first, last = rows[0]["epoch"], rows[-1]["epoch"]
    epochs = f"epoch {first}" if first == last else f"epochs {first}-{last}"
    lrs = [h["lr"] for h in rows]
    return f"{epochs}, lr {lrs[0]:g}" + ("" if len(set(lrs)) == 1 else f" to {lrs[-1]:g}")


def plot_curves(history: list[dict], title: str = "", finetune_start: int | None = None):
    """Loss and accuracy curves (as the original repository draws them) plus val mIoU, the learning rates of the
    history in the title; ``finetune_start``, the first epoch of a fine-tune, is marked. Returns the figure."""
    from matplotlib.ticker import MaxNLocator
    plt = plt_module()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "b-", label="train loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "m--", label="train acc")
    validated = [h for h in history if h["val_miou"] is not None]   # --val-every N leaves the others out
    ax_acc.plot([h["epoch"] for h in validated], [h["val_acc"] for h in validated], "g-.", label="val acc")
    ax_acc.plot([h["epoch"] for h in validated], [h["val_miou"] for h in validated], "k-", label="val mIoU")
    ax_loss.set_ylabel("train loss")
    ax_acc.set(ylabel="pixel accuracy, mIoU", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        if finetune_start is not None:
            ax.axvline(finetune_start, color="0.5", linestyle=":", label=f"fine-tune from epoch {finetune_start}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # no epoch 1.5 on a short run
        ax.legend(fontsize=8)
    start = history[-1]["epoch"] + 1 if finetune_start is None else finetune_start
    base, tuned = [h for h in history if h["epoch"] < start], [h for h in history if h["epoch"] >= start]
    lrs = "; ".join(what + epochs_and_lr(rows) for what, rows in (("", base), ("fine-tune ", tuned)) if rows)
    fig.suptitle(f"{title}: {lrs}" if title else lrs)
    fig.tight_layout()
    return fig


def median_epoch_seconds(history: list[dict]) -> float:
    """A run's typical epoch: a run paused or sharing its CPU for a while would stretch the sum of its epochs."""
    return statistics.median(float(h["seconds"]) for h in history)


def study_curves(runs: dict[str, tuple[str, list[dict]]], title: str = ""):
    """Train loss per epoch, val mIoU per epoch and val mIoU per hour of training of every preset of a study
    ({name: (network, history)}), in one figure: a colour per preset (up to 20), FCNs dashed."""
    plt = plt_module()
    fig, (ax_loss, ax_miou, ax_time) = plt.subplots(1, 3, figsize=(15, 3.8))
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[::2] + tab20[1::2]   # the ten strong colours first, then their light twins
    for k, (name, (network, history)) in enumerate(runs.items()):
        style = dict(label=name, color=colors[k % len(colors)], linestyle="--" if network == "fcn" else "-")
        validated = [h for h in history if h["val_miou"] is not None]
        hours = median_epoch_seconds(history) / 3600
        ax_loss.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], **style)
        ax_miou.plot([h["epoch"] for h in validated], [h["val_miou"] for h in validated], **style)
        ax_time.plot([h["epoch"] * hours for h in validated], [h["val_miou"] for h in validated], **style)
    ax_loss.set(xlabel="epoch", ylabel="train loss")
    ax_miou.set(xlabel="epoch", ylabel="val mIoU", ylim=(0, 1))
    ax_time.set(xlabel="training hours (epochs x its median epoch time)", ylabel="val mIoU", ylim=(0, 1))
    ax_time.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))   # beside the curves, not over them
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
