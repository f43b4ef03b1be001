"""The prediction flow of both predict scripts: a figure of a split, --eval metrics, --images of your own, the page,
or the model written out (--convert, --export-onnx)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from some_define import SegDataset, Speed, UsageError, evaluate

from .checkpoints import check_classes_match, half_weights, load_checkpoint, restore_model, save_checkpoint
from .config import PredictConfig
from .data import chosen_examples, read_classes, read_split
from .demo import DEMO_DIR, DEMO_NOTE
from .download import find_data
from .export import predict_files
from .figures import prediction_figure
from .files import save_figure, write_json
from .hooks import progress
from .speed import inference_speed, set_threads, threads_for_load, try_all_gpus_or_cpu

Model = tuple[str, nn.Module, dict, Path]   # (row label, network, checkpoint, its file)


def open_model(path: str | os.PathLike, device: torch.device) -> tuple[nn.Module, dict]:
    """A checkpoint's network on ``device``, ready to predict, and the checkpoint."""
    checkpoint = load_checkpoint(path)
    return restore_model(checkpoint, path).to(device).eval(), checkpoint


def checkpoint_data(config: PredictConfig, checkpoint: dict) -> tuple[Path, str, int | None]:
    """The dataset folder, split and void label to read: the flags' where given, else the checkpoint's training's."""
    trained = checkpoint.get("config", {})
    folder = find_data(config.data_dir, config.demo) if config.data_dir or config.demo else \
        find_data(trained.get("data_dir"), bool(trained.get("demo")))
    ignore_index = trained.get("ignore_index") if config.ignore_index is None else config.ignore_index
    return folder, config.split or trained.get("val_split", "val"), ignore_index


def split_metrics(net: nn.Module, checkpoint: dict, data: SegDataset, device: torch.device, batch_size: int,
                  speed: Speed = Speed()) -> dict:
    """The metrics JSON of --eval and the study: num_images, pixel_acc, mean_class_acc, miou, per_class_iou,
    d2l_pixel_acc, confusion_matrix."""
    metrics = evaluate(net, data, device, checkpoint["num_classes"], batch_size, speed,
                       lambda images: progress(images, len(data), "evaluating"))
    return {"num_images": len(data), **metrics.compute(checkpoint["class_names"])}


# When SegMetrics.compute gives a class no IoU (None): its union is empty, as confusion_matrix leaves void pixels out.
ABSENT_NOTE = ("-: no pixel of the split has this class in the ground truth or in the prediction (void pixels "
               "aside), so its IoU is 0/0; left out of miou")


def metrics_table(columns: dict[str, dict], class_names: Sequence[str]) -> str:
    """A readable table, one column per model: each class's IoU (headed 'per-class IoU'; '-' where the class has
    none, explained below the table), then the split's pixel accuracies and means."""
    names = list(columns)
    cell = max([10] + [len(n) for n in names]) + 2   # a column as wide as its model's name
    fmt = lambda v: f"{'-' if v is None else f'{v:.3f}':>{cell}}"
    width = max(len(c) for c in [*class_names, "d2l_pixel_acc"]) + 2
    lines = [f"{'per-class IoU':<{width}}" + "".join(f"{n:>{cell}}" for n in names)]
    for c in class_names:
        lines.append(f"{c:<{width}}" + "".join(fmt(columns[n]["per_class_iou"][c]) for n in names))
    for key in ("pixel_acc", "d2l_pixel_acc", "mean_class_acc", "miou"):   # d2l_pixel_acc: with a background class
        if any(key in columns[n] for n in names):
            lines.append(f"{key:<{width}}" + "".join(fmt(columns[n].get(key)) for n in names))
    if any(columns[n]["per_class_iou"][c] is None for n in names for c in class_names):
        lines.append(ABSENT_NOTE)
    return "\n".join(lines)


NETWORK_NAMES = {"fcn": "FCN", "unet": "U-Net"}
A_NETWORK = {"fcn": "an FCN", "unet": "a U-Net"}
SCRIPT = {"fcn": "origin_predict.py", "unet": "my_predict.py"}   # the predict script that shows each network


def describe(checkpoint: dict, path: Path) -> str:
    """Which network, which file, which epoch: said before any prediction."""
    epoch = f", epoch {checkpoint['epoch']}" if "epoch" in checkpoint else ""
    return f"{NETWORK_NAMES[checkpoint['model']]} from {path}{epoch}"


def run_prediction(config: PredictConfig, network: str) -> None:
    """Show, measure or write out the ``network`` (fcn or unet) of --checkpoint; with config.compare (an FCN
    checkpoint), side by side. A checkpoint of the other network is refused, naming the script that shows it."""
    device = try_all_gpus_or_cpu(config.device)
    set_threads(config.threads)
    threads_for_load(config.threads, device)
    path = Path(config.checkpoint)
    net, checkpoint = open_model(path, device)
    check_network(checkpoint, network, path)
    if config.classes:
        check_classes_match(*read_classes(config.classes), checkpoint, config.classes)
    if config.convert or config.export_onnx:
        return write_model(config, net, checkpoint, path)
    speed = inference_speed(config.amp, device)
    print(f"using {describe(checkpoint, path)}")
    if config.images:
        warn_if_demo_model(checkpoint, config.images)
        return predict_files(net, checkpoint, config.images, config.save_dir, device, config.tta, config.tile,
                             config.tile_overlap, speed)
    models = models_to_show(net, checkpoint, path, config.compare, device)
    if config.serve:
        from .serve import serve   # Flask is loaded only to serve
        return serve(models, device, config.host, config.port, tile=config.tile, overlap=config.tile_overlap,
                     max_upload_mb=config.max_upload_mb, max_waiting=config.max_waiting, speed=speed,
                     tta=config.tta)
    folder, split, ignore_index = checkpoint_data(config, checkpoint)
    data = read_split(folder, split, checkpoint["colormap"], ignore_index)
    if config.eval:
        return evaluate_models(models, data, split, config, device, speed)
    draw_figures(models, data, config, device, speed)


def check_network(checkpoint: dict, network: str, path: Path, flag: str = "--checkpoint") -> None:
    """The ``network`` that ``flag`` takes, else one line: the file, the network it holds and the script that shows
    it. The same rule in both scripts: each writes its own network's files (pictures/myout.png is the U-Net's),
    and my_predict.py sets the FCN of --compare beside its U-Net."""
    held = checkpoint["model"]
    if held != network:
        takes = "" if flag == "--checkpoint" else f", and {flag} takes {A_NETWORK[network]}"
        raise UsageError(f"{path} holds {A_NETWORK[held]}{takes}; show it with {SCRIPT[held]} --checkpoint {path}")


def write_model(config: PredictConfig, net: nn.Module, checkpoint: dict, path: Path) -> None:
    """--convert: this project's checkpoint file; --export-onnx: an ONNX file, checked with ONNX Runtime."""
    if config.convert:
        save_checkpoint(config.convert, half_weights(checkpoint) if config.half else checkpoint)
        return print(f"wrote {config.convert}: {describe(checkpoint, path)}, as this project's checkpoint"
                     f"{' with fp16 weights' if config.half else ''} (it loads with torch.load(..., weights_only=True))")
    from .onnx_export import export_onnx, sample_images   # onnx and onnxruntime are optional: only to export
    samples = sample_images(lambda: checkpoint_data(config, checkpoint)[:2])
    export_onnx(net, checkpoint, config.export_onnx, samples)


def models_to_show(net: nn.Module, checkpoint: dict, path: Path, compare: str | None,
                   device: torch.device) -> list[Model]:
    """The model, and before it the FCN of the ``compare`` checkpoint when that exists and predicts the same
    classes."""
    models = [(NETWORK_NAMES[checkpoint["model"]], net, checkpoint, path)]
    if compare and not Path(compare).is_file():
        print(f"note: no {compare}, so no comparison (train it with origin_train.py or pass --compare PATH)")
    if not (compare and Path(compare).is_file()):
        return models
    other, other_checkpoint = open_model(compare, device)
    check_network(other_checkpoint, "fcn", Path(compare), "--compare")
    if other_checkpoint["class_names"] != checkpoint["class_names"]:
        print(f"note: {compare} predicts other classes, so no comparison (pass --compare PATH)")
        return models
    print(f"compared with {describe(other_checkpoint, Path(compare))}")
    return [(NETWORK_NAMES["fcn"], other, other_checkpoint, Path(compare)), *models]


def evaluate_models(models: list[Model], data: SegDataset, split: str, config: PredictConfig,
                    device: torch.device, speed: Speed) -> None:
    """--eval: each model's metrics JSON (metrics_SPLIT.json beside its checkpoint, or --metrics) and one table."""
    columns = {}
    for label, model, model_checkpoint, model_path in models:
        metrics = split_metrics(model, model_checkpoint, data, device, config.batch_size, speed)
        own = model_path == Path(config.checkpoint)
        out = (config.metrics if own else None) or model_path.with_name(f"metrics_{split}.json")
        write_json(metrics, out)
        print(f"{label} ({model_path}): wrote {out}")
        columns[label] = metrics
    print(metrics_table(columns, models[-1][2]["class_names"]))
    print(f"{len(data)} images of the {split} split")


def draw_figures(models: list[Model], data: SegDataset, config: PredictConfig, device: torch.device,
                 speed: Speed) -> None:
    """The figure of the model (--figure), and with a second model the comparison (--compare-figure)."""
    checkpoint = models[-1][2]
    shown = chosen_examples(data, config.num)
    title = "synthetic demo data (shapes, not photos)" if checkpoint["config"].get("demo") else ""
    draw = lambda chosen: prediction_figure([(label, model) for label, model, *_ in chosen], shown,
                                            checkpoint["colormap"], checkpoint["class_names"], device,
                                            config.batch_size, title=title, speed=speed)
    save_figure(draw(models[-1:]), config.figure)
    print(f"wrote {config.figure}")
    if len(models) == 2:
        save_figure(draw(models), config.compare_figure)
        print(f"wrote {config.compare_figure}")


def warn_if_demo_model(checkpoint: dict, images: Sequence[str]) -> None:
    """One line when a model of the synthetic demo data is asked about other pictures."""
    demo_dir = DEMO_DIR.resolve()
    if checkpoint["config"].get("demo") and not all(demo_dir in Path(p).resolve().parents for p in images):
        print(f"note: this model was {DEMO_NOTE}")
