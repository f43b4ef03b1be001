"""The prediction flow of both predict scripts: a figure of a split, --eval metrics, or --images of your own."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from some_define import SegDataset, evaluate

from .checkpoints import load_checkpoint, restore_model
from .cli import finish_predict_args
from .data import dataset_dir, first_examples, read_split
from .export import predict_images
from .figures import prediction_figure
from .files import save_figure, write_json
from .speed import inference_flags, try_all_gpus_or_cpu


def open_model(path: str | os.PathLike, device: torch.device) -> tuple[nn.Module, dict]:
    """A checkpoint's network on ``device``, ready to predict, and the checkpoint."""
    checkpoint = load_checkpoint(path)
    return restore_model(checkpoint, path).to(device).eval(), checkpoint


def checkpoint_dataset_dir(voc_dir: str | None, demo: bool, checkpoint: dict) -> Path:
    """--voc-dir/--demo when given, else the data the checkpoint was trained on."""
    if voc_dir or demo:
        return dataset_dir(voc_dir, demo)
    config = checkpoint.get("config", {})
    return dataset_dir(config.get("voc_dir"), bool(config.get("demo")))


def split_metrics(net: nn.Module, checkpoint: dict, data: SegDataset, device: torch.device, batch_size: int,
                  **flags) -> dict:
    """The metrics JSON of --eval and the study: num_images, pixel_acc, mean_class_acc, miou, per_class_iou,
    d2l_pixel_acc, confusion_matrix."""
    metrics = evaluate(net, data, device, checkpoint["num_classes"], batch_size, **flags)
    return {"num_images": len(data), **metrics.compute(checkpoint["class_names"])}


def metrics_table(columns: dict[str, dict], class_names: Sequence[str]) -> str:
    """A readable per-class IoU table, one column per model; absent classes show as '-'."""
    fmt = lambda v: "     -" if v is None else f"{v:6.3f}"
    names = list(columns)
    width = max(len(c) for c in class_names) + 2
    lines = [" " * width + "".join(f"{n[:10]:>11}" for n in names)]
    for c in class_names:
        lines.append(f"{c:<{width}}" + "".join(f"{fmt(columns[n]['per_class_iou'][c]):>11}" for n in names))
    for key in ("pixel_acc", "d2l_pixel_acc", "mean_class_acc", "miou"):   # d2l_pixel_acc: with a background class
        if any(key in columns[n] for n in names):
            lines.append(f"{key:<{width}}" + "".join(f"{fmt(columns[n].get(key)):>11}" for n in names))
    return "\n".join(lines)


def run_prediction(args: argparse.Namespace, compare: str | None = None, compare_figure: str | None = None) -> None:
    """Show, measure or export the model of --checkpoint; with ``compare`` (an FCN checkpoint), side by side."""
    device = try_all_gpus_or_cpu(args.device)
    net, checkpoint = open_model(args.checkpoint, device)
    args = finish_predict_args(args, checkpoint)
    flags = inference_flags(args.amp, device)
    if args.images:
        return predict_images(net, checkpoint, args.images, args.save_dir, device, args.tta, **flags)
    models = [(checkpoint["model"].upper(), net, checkpoint, Path(args.checkpoint))]
    if compare and Path(compare).is_file():
        other, other_checkpoint = open_model(compare, device)
        if other_checkpoint["class_names"] == checkpoint["class_names"]:
            models.insert(0, (other_checkpoint["model"].upper(), other, other_checkpoint, Path(compare)))
        else:
            print(f"note: {compare} predicts other classes, so no comparison (pass --compare PATH)")
    elif compare:
        print(f"note: no {compare}, so no comparison (train it with origin_train.py or pass --compare PATH)")
    data = read_split(checkpoint_dataset_dir(args.voc_dir, args.demo, checkpoint), args.split,
                      checkpoint["colormap"], args.ignore_index)
    if args.eval:
        columns = {}
        for label, model, model_checkpoint, path in models:
            metrics = split_metrics(model, model_checkpoint, data, device, args.batch_size, **flags)
            out = (args.metrics if model is net else None) or path.with_name(f"metrics_{args.split}.json")
            write_json(metrics, out)
            print(f"{label} ({path}): wrote {out}")
            columns[f"{label} ({path.parent.name})"] = metrics
        print(metrics_table(columns, checkpoint["class_names"]))
        print(f"{len(data)} images of the {args.split} split")
        return
    shown = first_examples(data, args.num)
    draw = lambda chosen: prediction_figure([(label, model) for label, model, *_ in chosen], shown,
                                            checkpoint["colormap"], checkpoint["class_names"], device,
                                            args.batch_size, **flags)
    save_figure(draw(models[-1:]), args.figure)
    print(f"wrote {args.figure}")
    if len(models) == 2:
        save_figure(draw(models), compare_figure)
        print(f"wrote {compare_figure}")
