"""Train the improved model, a U-Net built from ResNet-18 stages, and run the seed's study (which change buys what?).

    python my_train.py                                    # ResNetUNet, Adam lr 1e-4, 30 epochs -> runs/my
    python my_train.py --finetune-from runs/my/last.pt --lr 1e-5 --epochs 10 --out runs/my-ft
    python my_train.py --preset unet-sgd-1e-3             # one row of the study -> runs/unet-sgd-1e-3 (--out OUT: OUT/...)
    python my_train.py --study --demo                     # every preset -> runs/study/*, pictures/study.{md,png}
"""
import argparse
import copy
import time
from pathlib import Path

from some_define import (UsageError, atomic_write, dataset_classes, evaluate_checkpoint, finish_train_args,
                         inference_flags, open_model, prediction_figure, read_json, read_split, run_main,
                         save_figure, train, train_arg_parser, training_dataset_dir, try_all_gpus_or_cpu, write_json)

DEFAULTS = {
    "voc_dir": "VOC2012",
    "model": "unet",
    "pretrained": "imagenet",
    "optimizer": "adam",
    "lr": 1e-4,
    "wd": 1e-3,
    "loss": "mean",             # mean cross-entropy over labelled pixels
    "void": "ignore",           # void (boundary) pixels carry no label, so they get no loss
    "epochs": 30,
    "batch_size": 32,
    "crop": [320, 480],
    "device": None,
    "seed": 0,
    "workers": None,
    "out": "runs/my",
}
FINETUNE_EPOCHS = {"full": 10, "demo": 4}   # the seed's "then 10 more epochs at lr 1e-5"

# Each row of the seed's study: what differs from the defaults above. "then" fine-tunes another preset's result.
PRESETS = {
    "fcn-sgd-1e-3": dict(model="fcn", optimizer="sgd", lr=1e-3, loss="sum", void="background"),   # the book
    "unet-sgd-1e-3": dict(model="unet", optimizer="sgd", lr=1e-3, loss="sum", void="background"),  # only the network
    "unet-adam-1e-3": dict(optimizer="adam", lr=1e-3),
    "unet-adam-1e-4": dict(),                                                                     # the default
    "unet-adam-1e-4-ft-1e-5": dict(lr=1e-5, then="unet-adam-1e-4"),                               # 30 + 10 epochs
    "unet-adam-1e-4-void-bg": dict(void="background"),                # what ignoring void buys
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = train_arg_parser(__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), help="train one row of the study (output OUT/PRESET, "
                   "OUT defaulting to runs)")
    p.add_argument("--study", action="store_true", help="train and evaluate every preset, then write the study")
    p.add_argument("--pictures", default="pictures", help="where --study writes study.md and study.png")
    p.add_argument("--num", type=int, default=4, help="val images in study.png")
    args = p.parse_args(argv)
    if args.preset and args.study:
        raise UsageError("--preset and --study do not go together (--study runs every preset)")
    return args


def preset_args(args: argparse.Namespace, name: str, out: Path) -> argparse.Namespace:
    """The arguments of one preset: the user's flags win, then the preset, then the defaults."""
    preset = dict(PRESETS[name])
    then = preset.pop("then", None)
    run = copy.copy(args)
    run.out = str(out / name)
    if then:
        run.finetune_from = str(out / then / "last.pt")
        if args.epochs is None:
            run.epochs = FINETUNE_EPOCHS["demo" if args.demo else "full"]
    return finish_train_args(run, dict(DEFAULTS, **preset))


def train_preset(args: argparse.Namespace, name: str, out: Path) -> None:
    """Train a preset into OUT/NAME (first the preset it fine-tunes, if that has not been trained yet)."""
    then = PRESETS[name].get("then")
    if then and not (out / then / "last.pt").is_file():
        train_preset(args, then, out)
    run = preset_args(args, name, out)
    print(f"=== preset {name}")
    train(run)


def run_study(args: argparse.Namespace) -> None:
    """Train and evaluate every preset; a preset whose eval.json exists is done and skipped on a rerun."""
    out = Path(args.out or "runs/study")
    device = try_all_gpus_or_cpu(args.device or ("cpu" if args.demo else None))
    flags = inference_flags(args.amp, device)
    voc_dir = training_dataset_dir(args)
    _, colormap = dataset_classes(args)
    val_images, val_labels, val_names = read_split(voc_dir, args.val_split, colormap, args.ignore_index)
    rows, models = [], []
    for name in PRESETS:
        result_path = out / name / "eval.json"
        done = result_path.is_file()
        started = time.perf_counter()
        if done:
            print(f"=== preset {name}: done before, skipped ({result_path})")
        else:
            train_preset(args, name, out)
        net, checkpoint = open_model(out / name / "last.pt", device)
        if not done:
            metrics = evaluate_checkpoint(net, checkpoint, val_images, val_labels, device, 8, **flags)
            write_json({"preset": name, "config": checkpoint["config"], "history": checkpoint["history"],
                        "wall_seconds": time.perf_counter() - started, **metrics}, result_path)
        rows.append(read_json(result_path))
        models.append((name, net))
    write_study_table(rows, Path(args.pictures) / "study.md", args)
    n = args.num
    fig = prediction_figure(models, val_images[:n], val_labels[:n], val_names[:n], checkpoint["colormap"],
                            checkpoint["class_names"], device, **flags)
    save_figure(fig, Path(args.pictures) / "study.png")
    print(f"wrote {Path(args.pictures) / 'study.md'} and {Path(args.pictures) / 'study.png'}")


def write_study_table(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    """pictures/study.md: one row per preset, then per-class IoU."""
    data = "synthetic demo data (random-init backbones)" if args.demo else f"VOC2012 at {args.voc_dir or 'VOC2012'}"
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
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.study:
        run_study(args)
    elif args.preset:
        train_preset(args, args.preset, Path(args.out or "runs"))
    else:
        train(finish_train_args(args, DEFAULTS))


if __name__ == "__main__":
    run_main(main)
