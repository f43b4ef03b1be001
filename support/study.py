"""The study: train every preset (a diff of the U-Net defaults), evaluate each, and write the table and figure."""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from some_define import prediction_figure

from .cli import finish_train_args
from .data import dataset_classes, first_examples, read_split
from .download import training_data_dir
from .files import read_json, save_figure, write_json, write_text
from .prediction import open_model, split_metrics
from .speed import inference_flags, try_all_gpus_or_cpu
from .training import train


def preset_args(args: argparse.Namespace, name: str, out: Path, presets: dict, defaults: dict,
                finetune_epochs: int) -> argparse.Namespace:
    """The arguments of one preset: the user's flags win, then the preset, then the defaults."""
    preset = dict(presets[name])
    then = preset.pop("then", None)
    run = copy.copy(args)
    run.out = str(out / name)
    if then:
        run.finetune_from = str(out / then / "last.pt")
        if args.epochs is None:
            run.epochs = finetune_epochs
    return finish_train_args(run, dict(defaults, **preset))


def train_preset(args: argparse.Namespace, name: str, out: Path, presets: dict, defaults: dict,
                 finetune_epochs: int) -> None:
    """Train a preset into OUT/NAME (first the preset it fine-tunes, if that has not been trained yet)."""
    then = presets[name].get("then")
    if then and not (out / then / "last.pt").is_file():
        train_preset(args, then, out, presets, defaults, finetune_epochs)
    run = preset_args(args, name, out, presets, defaults, finetune_epochs)
    print(f"=== preset {name}")
    train(run)


def run_study(args: argparse.Namespace, presets: dict, defaults: dict, finetune_epochs: int) -> None:
    """Train and evaluate every preset; a preset whose eval.json exists is done and skipped on a rerun."""
    out = Path(args.out or "runs/study")
    device = try_all_gpus_or_cpu(args.device or ("cpu" if args.demo else None))
    flags = inference_flags(args.amp, device)
    data_dir = training_data_dir(args.voc_dir, args.demo, args.download, args.mirror)
    _, colormap = dataset_classes(args.classes)
    val_set = read_split(data_dir, args.val_split, colormap, args.ignore_index)
    rows, models = [], []
    for name in presets:
        result_path = out / name / "eval.json"
        done = result_path.is_file()
        started = time.perf_counter()
        if done:
            print(f"=== preset {name}: done before, skipped ({result_path})")
        else:
            train_preset(args, name, out, presets, defaults, finetune_epochs)
        net, checkpoint = open_model(out / name / "last.pt", device)
        if not done:
            metrics = split_metrics(net, checkpoint, val_set, device, 8, **flags)
            write_json({"preset": name, "config": checkpoint["config"], "history": checkpoint["history"],
                        "wall_seconds": time.perf_counter() - started, **metrics}, result_path)
        rows.append(read_json(result_path))
        models.append((name, net))
    pictures = Path(args.pictures)
    data = "synthetic demo data (random-init backbones)" if args.demo else f"VOC2012 at {args.voc_dir or 'VOC2012'}"
    write_text(study_table(rows, data), pictures / "study.md")
    save_figure(prediction_figure(models, first_examples(val_set, args.num), checkpoint["colormap"], checkpoint["class_names"], device, **flags),
                pictures / "study.png")
    print(f"wrote {pictures / 'study.md'} and {pictures / 'study.png'}")


def study_table(rows: list[dict], data: str) -> str:
    """study.md: one row per preset, then per-class IoU."""
    head = ["preset", "network", "optimizer", "lr", "loss", "void", "epochs", "pixel acc", "d2l pixel acc", "mIoU",
            "train time (s)", "images/s"]
    lines = [f"# The study on {data}", "", "Validation metrics at full resolution over the whole val split.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c, h = r["config"], r["history"]
        own = h[-c["epochs"]:]   # a fine-tuned preset's history starts with the epochs of the preset it continues
        epochs = f"{len(h) - len(own)}+{len(own)}" if c.get("finetune_from") else str(len(h))
        seconds = sum(float(e["seconds"]) for e in h)
        speed = sum(float(e["img_per_s"]) for e in own) / len(own)
        lines.append(f"| {r['preset']} | {c['model']} | {c['optimizer']} | {c['lr']:g} | {c['loss']} | {c['void']} | "
                     f"{epochs} | {r['pixel_acc']:.3f} | {r['d2l_pixel_acc']:.3f} | {r['miou']:.3f} | "
                     f"{seconds:.0f} | {speed:.1f} |")
    classes = [k for k in rows[0]["per_class_iou"] if any(r["per_class_iou"][k] is not None for r in rows)]
    lines += ["", "Per-class IoU (classes absent from the val split and from every prediction are left out):", "",
              "| preset | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for r in rows:
        cells = ["-" if r["per_class_iou"][k] is None else f"{r['per_class_iou'][k]:.3f}" for k in classes]
        lines.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
