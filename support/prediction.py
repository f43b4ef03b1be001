"""The prediction flow of both predict scripts: a figure of a split, --eval metrics, or --images of your own."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from some_define import SegDataset, UsageError, evaluate

from .checkpoints import load_checkpoint, restore_model
from .cli import finish_predict_args
from .data import dataset_dir, first_examples, read_split
from .export import predict_images
from .figures import prediction_figure
from .files import save_figure, write_json
from .demo import DEMO_DIR
from .speed import inference_flags, set_threads, threads_for_load, try_all_gpus_or_cpu


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
    names = list(columns)
    cell = max([10] + [len(n) for n in names]) + 2   # a column as wide as its model's name
    fmt = lambda v: f"{'-' if v is None else f'{v:.3f}':>{cell}}"
    width = max(len(c) for c in [*class_names, "d2l_pixel_acc"]) + 2
    lines = [" " * width + "".join(f"{n:>{cell}}" for n in names)]
    for c in class_names:
        lines.append(f"{c:<{width}}" + "".join(fmt(columns[n]["per_class_iou"][c]) for n in names))
    for key in ("pixel_acc", "d2l_pixel_acc", "mean_class_acc", "miou"):   # d2l_pixel_acc: with a background class
        if any(key in columns[n] for n in names):
            lines.append(f"{key:<{width}}" + "".join(fmt(columns[n].get(key)) for n in names))
    return "\n".join(lines)


NETWORK_NAMES = {"fcn": "FCN", "unet": "U-Net"}
A_NETWORK = {"fcn": "an FCN", "unet": "a U-Net"}


def describe(checkpoint: dict, path: Path) -> str:
    """Which network, which file, which epoch: said before any prediction."""
    epoch = f", epoch {checkpoint['epoch']}" if "epoch" in checkpoint else ""
    return f"{NETWORK_NAMES[checkpoint['model']]} from {path}{epoch}"


def run_prediction(args: argparse.Namespace, network: str, strict: bool, compare: str | None = None,
                   compare_figure: str | None = None) -> None:
    """Show, measure or export the ``network`` of --checkpoint (another network: an error if ``strict``, else a
    warning); with ``compare`` (an FCN checkpoint), side by side."""
    device = try_all_gpus_or_cpu(args.device)
    set_threads(args.threads)
    threads_for_load(args.threads, device)
    path = Path(args.checkpoint)
    net, checkpoint = open_model(path, device)
    if checkpoint["model"] != network:
        message = f"{path} holds {A_NETWORK[checkpoint['model']]}, not the {NETWORK_NAMES[network]} this script shows"
        if strict:
            raise UsageError(f"{message}; use my_predict.py --checkpoint {path}")
        print(f"warning: {message}")
    args = finish_predict_args(args, checkpoint)
    flags = inference_flags(args.amp, device)
    print(f"using {describe(checkpoint, path)}")
    if args.images:
        warn_if_demo_model(checkpoint, args.images)
        return predict_images(net, checkpoint, args.images, args.save_dir, device, args.tta, args.tile,
                              args.tile_overlap, **flags)
    models = [(NETWORK_NAMES[checkpoint["model"]], net, checkpoint, path)]
    if compare and Path(compare).is_file():
        other, other_checkpoint = open_model(compare, device)
        if other_checkpoint["class_names"] != checkpoint["class_names"]:
            print(f"note: {compare} predicts other classes, so no comparison (pass --compare PATH)")
        else:
            print(f"compared with {describe(other_checkpoint, Path(compare))}")
            models.insert(0, (NETWORK_NAMES[other_checkpoint["model"]], other, other_checkpoint, Path(compare)))
            if models[0][0] == models[1][0]:   # the same network twice: tell the rows apart by their files
                print(f"warning: both checkpoints hold {A_NETWORK[checkpoint['model']]}")
                models = [(f"{label} ({p.parent.name}/{p.name})", *rest, p) for label, *rest, p in models]
    elif compare:
        print(f"note: no {compare}, so no comparison (train it with origin_train.py or pass --compare PATH)")
    if args.serve:
        from .serve import serve   # Flask is loaded only to serve
        return serve(models, device, args.host, args.port, tile=args.tile, overlap=args.tile_overlap,
                     max_upload_mb=args.max_upload_mb, max_waiting=args.max_waiting, tta=args.tta, **flags)
    data = read_split(checkpoint_dataset_dir(args.voc_dir, args.demo, checkpoint), args.split,
                      checkpoint["colormap"], args.ignore_index)
    if args.eval:
        columns = {}
        for label, model, model_checkpoint, model_path in models:
            metrics = split_metrics(model, model_checkpoint, data, device, args.batch_size, **flags)
            out = (args.metrics if model is net else None) or model_path.with_name(f"metrics_{args.split}.json")
            write_json(metrics, out)
            print(f"{label} ({model_path}): wrote {out}")
            columns[label] = metrics
        print(metrics_table(columns, checkpoint["class_names"]))
        print(f"{len(data)} images of the {args.split} split")
        return
    shown = first_examples(data, args.num)
    title = "synthetic demo data (shapes, not photos)" if checkpoint["config"].get("demo") else ""
    draw = lambda chosen: prediction_figure([(label, model) for label, model, *_ in chosen], shown,
                                            checkpoint["colormap"], checkpoint["class_names"], device,
                                            args.batch_size, title=title, **flags)
    save_figure(draw(models[-1:]), args.figure)
    print(f"wrote {args.figure}")
    if len(models) == 2:
        save_figure(draw(models), compare_figure)
        print(f"wrote {compare_figure}")


def warn_if_demo_model(checkpoint: dict, images: Sequence[str]) -> None:
    """One line when a model of the synthetic demo data is asked about other pictures."""
    demo_dir = DEMO_DIR.resolve()
    if checkpoint["config"].get("demo") and not all(demo_dir in Path(p).resolve().parents for p in images):
        print("note: this model was trained on the synthetic demo data (coloured shapes, not photos), so its "
              "predictions on photos mean little; train on VOC or your own data for those")
