"""The study: train every preset (a diff of the U-Net defaults), evaluate each, and write the table and figure."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from some_define import SegDataset, Speed

from .cli import train_config
from .config import TrainConfig
from .data import chosen_examples, dataset_classes, is_voc_dir, read_split
from .download import find_data
from .figures import median_epoch_seconds, prediction_figure, study_curves
from .files import read_json, save_figure, write_json, write_text
from .prediction import open_model, split_metrics
from .speed import inference_speed, try_all_gpus_or_cpu
from .checkpoints import load_checkpoint
from .training import train


def preset_config(given: dict, name: str, out: Path, presets: dict, defaults: dict,
                  finetune_epochs: int) -> TrainConfig:
    """The configuration of one preset, trained into OUT/NAME: the preset is a layer of the merge (the flags given
    win over it); under --study --resume, only a preset that was interrupted resumes."""
    preset = dict(presets[name], out=str(out / name))
    then = preset.pop("then", None)
    preset.pop("only_with_background", None)
    if then:
        preset.update(finetune_from=str(out / then / "last.pt"), epochs=finetune_epochs)
    # --out is the folder of all presets; --epochs the length of the trained-from-scratch ones: a fine-tune is
    # the original repository's "then N more epochs" on top of its base, however long that base ran.
    given = {key: value for key, value in given.items() if key != "out" and not (then and key == "epochs")}
    if given.get("resume") == "auto" and finished_or_new(out / name):
        del given["resume"]
    return train_config(given, defaults, (name, preset))


def finished_or_new(folder: Path) -> bool:
    """No run in ``folder`` to resume: none was started, or it finished (its last.pt keeps weights only)."""
    path = folder / "last.pt"
    return not path.is_file() or "optimizer" not in load_checkpoint(path)


def train_preset(given: dict, name: str, out: Path, presets: dict, defaults: dict, finetune_epochs: int) -> None:
    """Train a preset into OUT/NAME (first the preset it fine-tunes, if that has not been trained yet)."""
    then = presets[name].get("then")
    if then and not ((out / then / "last.pt").is_file() and finished_or_new(out / then)):   # none, or interrupted
        train_preset(given, then, out, presets, defaults, finetune_epochs)
    config = preset_config(given, name, out, presets, defaults, finetune_epochs)
    print(f"=== preset {name}")
    train(config)


def evaluate_preset(given: dict, name: str, out: Path, presets: dict, defaults: dict, finetune_epochs: int,
                    split: Callable[[str], SegDataset], device: torch.device, speed: Speed) -> tuple[dict, nn.Module]:
    """A preset's eval.json (trained first unless it finished before, and measured on the val split and on the
    train split it learned from, unless eval.json holds both: a rerun skips finished presets) and its network."""
    result_path = out / name / "eval.json"
    result = read_json(result_path) if result_path.is_file() else {}
    done = "train" in result
    started = time.perf_counter()
    if done:
        print(f"=== preset {name}: done before, skipped ({result_path})")
    elif (out / name / "last.pt").is_file() and finished_or_new(out / name):
        print(f"=== preset {name}: trained before, evaluating {out / name / 'last.pt'}")
    else:
        train_preset(given, name, out, presets, defaults, finetune_epochs)
    net, checkpoint = open_model(out / name / "last.pt", device)
    if not done:
        metrics = split_metrics(net, checkpoint, split("val"), device, 8, speed)
        # Does the network fit what it saw? Whole train images, no augmentation: the val split's conditions.
        fit = split_metrics(net, checkpoint, split("train"), device, 8, speed)
        train = {key: fit[key] for key in ("num_images", "pixel_acc", "mean_class_acc", "miou", "per_class_iou")}
        write_json({"preset": name, "config": checkpoint["config"], "history": checkpoint["history"],
                    "wall_seconds": time.perf_counter() - started, **metrics, "train": train}, result_path)
        result = read_json(result_path)   # as a rerun will read it
    return result, net


def run_study(given: dict, presets: dict, defaults: dict, finetune_epochs: int, chosen: list[str] | None = None,
              pictures: str | None = None, num: int = 4) -> None:
    """Train and evaluate the ``chosen`` presets (default: every one) that make sense for the dataset; write study.md,
    study.png and study_curves.png. A chosen fine-tune trains the preset it continues first, chosen or not."""
    out = Path(given.get("out", "runs/study"))
    base = train_config({key: value for key, value in given.items() if key != "resume"}, defaults)   # the shared data
    device = try_all_gpus_or_cpu(base.device)
    speed = inference_speed(base.amp, device)
    data_dir = find_data(base.data_dir, base.demo, base.download, base.mirror)
    class_names, colormap = dataset_classes(base.classes)

    @functools.cache
    def split(which: str) -> SegDataset:
        """Read when first needed: a rerun whose presets are all measured never reads the train split."""
        return read_split(data_dir, getattr(base, f"{which}_split"), colormap, base.ignore_index)

    rows, models = [], []
    chosen = chosen or list(presets)
    for k, name in enumerate(chosen, 1):
        preset = presets[name]
        print(f"=== {k} of {len(chosen)} presets")   # a study takes hours on a CPU: how far it is
        if preset.get("only_with_background") and class_names[0] != "background":
            print(f"=== preset {name}: left out, class 0 is {class_names[0]!r}, not a background")
            continue
        row, net = evaluate_preset(given, name, out, presets, defaults, finetune_epochs, split, device, speed)
        rows.append(row)
        models.append((name, net))
    pictures = Path(pictures) if pictures else study_pictures_dir(base.demo, data_dir)
    what = "synthetic demo data (random-init backbones)" if base.demo else data_dir.name   # not its path on this disk
    write_text(study_table(rows, what), pictures / "study.md")
    # Evenly spaced over the val split: CamVid's val split is consecutive frames of a few drives.
    examples = chosen_examples(split("val"), num, spread=True)
    save_figure(prediction_figure(models, examples, colormap, class_names, device, title=what, speed=speed),
                pictures / "study.png")
    runs = {r["preset"]: (r["config"]["model"], r["history"]) for r in rows}
    save_figure(study_curves(runs, what), pictures / "study_curves.png")
    print(f"wrote {pictures / 'study.md'}, {pictures / 'study.png'} and {pictures / 'study_curves.png'}")


def study_pictures_dir(demo: bool, data_dir: Path) -> Path:
    """pictures/ for VOC and the demo data; pictures/DATASET/ for others, so their studies leave those alone."""
    return Path("pictures") if demo or is_voc_dir(data_dir) else Path("pictures") / data_dir.name.lower()


def augmentation(config: dict) -> str:
    """A run's data augmentation in words: 'crop' (the book's), plus flips and the scale range."""
    scale = config.get("scale", [1.0, 1.0])
    words = ["crop"] + (["flip"] if config.get("hflip") else []) + \
        ([f"scale {scale[0]:g}-{scale[1]:g}"] if scale != [1.0, 1.0] else [])
    return ", ".join(words)


def study_table(rows: list[dict], data: str) -> str:
    """study.md: one row per preset, then per-class IoU."""
    head = ["preset", "network", "optimizer", "lr", "wd", "loss", "void", "class weights", "augmentation", "epochs",
            "pixel acc", "d2l pixel acc", "mean class acc", "mIoU", "train mIoU", "train time (s)", "images/s"]
    lines = [f"# The study on {data}", "", "Validation metrics at full resolution over the whole val split; train "
             "mIoU: the same over the whole train split (does the network fit what it learned from?); train time: "
             "epochs x the median epoch.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c, h = r["config"], r["history"]
        own = h[-c["epochs"]:]   # a fine-tuned preset's history starts with the epochs of the preset it continues
        epochs = f"{len(h) - len(own)}+{len(own)}" if c.get("finetune_from") else str(len(h))
        seconds = len(h) * median_epoch_seconds(h)
        speed = sum(float(e["img_per_s"]) for e in own) / len(own)
        d2l = f"{r['d2l_pixel_acc']:.3f}" if "d2l_pixel_acc" in r else "-"   # only with a background class
        lr = f"{c['lr']:g}" + (" poly" if c.get("lr_schedule") == "poly" else "")
        lines.append(f"| {r['preset']} | {c['model']} | {c['optimizer']} | {lr} | {c['wd']:g} | {c['loss']} | "
                     f"{c['void']} | {c.get('class_weights', 'none')} | {augmentation(c)} | {epochs} | "
                     f"{r['pixel_acc']:.3f} | {d2l} | {r['mean_class_acc']:.3f} | {r['miou']:.3f} | "
                     f"{r['train']['miou']:.3f} | {seconds:.0f} | {speed:.1f} |")
    classes = [k for k in rows[0]["per_class_iou"] if any(r["per_class_iou"][k] is not None for r in rows)]
    lines += ["", "Per-class IoU (classes absent from the val split and from every prediction are left out):", "",
              "| preset | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for r in rows:
        cells = ["-" if r["per_class_iou"][k] is None else f"{r['per_class_iou'][k]:.3f}" for k in classes]
        lines.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
