"""The command line of the scripts: their flags, the defaults --demo shrinks, and one-line errors."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from some_define import MODELS, VOID, UsageError

from .data import CLASS_WEIGHT_POWERS, VOC_TAR, VOC_URL, dataset_classes, read_classes
from .checkpoints import check_classes_match, load_checkpoint
from .speed import try_all_gpus_or_cpu
from .tiles import AUTO_TILE_PIXELS, DEFAULT_OVERLAP, DEFAULT_TILE, parse_tile

# With --demo, every default below that the user did not set shrinks to this, so a run takes minutes on a laptop CPU.
DEMO_TRAIN_DEFAULTS = {"crop": [64, 64], "epochs": 12, "batch_size": 8, "pretrained": "none", "device": "cpu"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (the full usage stays behind --help), and no abbreviations
    (--epoch would silently mean --epochs)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        quiet = int(os.environ.get("RANK", "0")) != 0   # under torchrun, rank 0 says it once
        self.exit(2, None if quiet else f"error: {message}; see --help\n")


def train_arg_parser(description: str, defaults: dict, choose_model: bool = True) -> argparse.ArgumentParser:
    """The flags of both training scripts. Defaults are None here and filled in by finish_train_args, so that
    --demo can shrink only what the user left unset; --help shows the script's ``defaults``."""
    p = ArgumentParser(description=description)
    data = p.add_argument_group("data")
    data.add_argument("--voc-dir", help="VOC2012 folder, or a folder holding VOC2012 or VOCdevkit/VOC2012, or a "
                      "folder with train.txt/val.txt lists of 'image mask' pairs (SegNet/CamVid layout)")
    demo = ", ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in DEMO_TRAIN_DEFAULTS.items())
    data.add_argument("--demo", action="store_true", help=f"use the built-in synthetic VOC-layout data (synthetic "
                      f"shapes, not photos; minutes on a CPU); it changes the defaults to {demo}")
    data.add_argument("--download", action="store_true",
                      help=f"if the data is not there, fetch {VOC_TAR} (2 GB) into the parent folder of --voc-dir, "
                      f"check its MD5 and extract VOCdevkit/VOC2012 there; an interrupted download resumes")
    data.add_argument("--mirror", metavar="URL", help=f"where --download fetches the tar (default {VOC_URL})")
    data.add_argument("--classes", metavar="FILE", help="your dataset's classes, one per line: 'name' or "
                      "'name R G B' (R G B: integers 0..255; a name may hold spaces, and without a colour it must "
                      "not end in a number); index = line number; no colours: VOC's palette; default: VOC's 21")
    data.add_argument("--ignore-index", type=int, metavar="K",
                      help="label value K is void like 255 (e.g. CamVid's 'unlabelled' 11)")
    data.add_argument("--train-split", default="train", metavar="NAME",
                      help="ImageSets/Segmentation/NAME.txt, or NAME.txt of a folder of 'image mask' pair lists")
    data.add_argument("--val-split", default="val", metavar="NAME",
                      help="ImageSets/Segmentation/NAME.txt, or NAME.txt of a folder of 'image mask' pair lists")
    data.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop (the book: 320 480)")
    data.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                      help="scale augmentation: each crop is cut at a random scale in [MIN, MAX] (1 1: the book's "
                      "crops at the image's own scale)")
    data.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                      help="mirror half of the training crops left-right")
    data.add_argument("--void", choices=["background", "ignore"],
                      help="void pixels: trained as background (the book; only where class 0 is 'background') or "
                      "ignored")
    data.add_argument("--class-weights", choices=list(CLASS_WEIGHT_POWERS),
                      help="weigh each class in the loss: none, SegNet's median-frequency balancing computed from the "
                      "training masks (rare classes count more), or its square root (a softer balance)")
    data.add_argument("--skip-bad", action="store_true",
                      help="leave out unreadable or inconsistent examples with a warning (default: stop)")
    data.add_argument("--workers", type=int, help="DataLoader worker processes (default: 4 on a GPU, 0 on the CPU, "
                      "where crops are cheap and workers would compete with the training threads)")
    model = p.add_argument_group("model and optimizer")
    if choose_model:   # origin_train.py trains the book's FCN only
        model.add_argument("--model", choices=list(MODELS))
    model.add_argument("--pretrained", help="imagenet, none, or a path to resnet18-f37072fd.pth")
    model.add_argument("--optimizer", choices=["sgd", "adam"])
    model.add_argument("--lr", type=float)
    model.add_argument("--lr-schedule", choices=["constant", "poly"],
                       help="constant: the book's; poly: lr x (1 - done/epochs)^0.9 per epoch, as torchvision's "
                       "segmentation reference")
    model.add_argument("--wd", type=float, help="weight decay")
    model.add_argument("--loss", choices=["sum", "mean"],
                       help="sum: the book's per-image mean cross-entropy summed over the batch; mean: over pixels")
    model.add_argument("--epochs", type=int)
    model.add_argument("--batch-size", type=int)
    model.add_argument("--finetune-from", metavar="CKPT",
                       help="start from this checkpoint's weights with a fresh optimizer; the history continues")
    speed = p.add_argument_group("speed and memory")
    auto = ["auto", "on", "off"]
    speed.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                       help="mixed precision (auto: bf16 on CUDA GPUs that have it and on CPUs that compute it "
                       "natively: AMX, AVX512-BF16, ARM BF16; off elsewhere)")
    speed.add_argument("--channels-last", choices=auto, default="auto",
                       help="NHWC memory format (auto: on CUDA, and on the CPU with bf16)")
    speed.add_argument("--data-on-device", choices=auto, default="auto",
                       help="keep the uint8 training split in GPU memory and crop there (auto: on CUDA if it fits)")
    speed.add_argument("--accum-steps", type=int, default=1,
                       help="gradient accumulation: each step sees accum-steps batches of --batch-size")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="under torchrun, BatchNorm statistics over the global batch")
    run = p.add_argument_group("run")
    run.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the first that exists)")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: one per core that other "
                     "programs leave free, looked at again every 10 s; OMP_NUM_THREADS fixes it too)")
    run.add_argument("--seed", type=int)
    run.add_argument("--val-every", type=int, default=1, metavar="N",
                     help="validate every N epochs and after the last (validation at full resolution costs time)")
    run.add_argument("--out", help="folder for history.csv, curves.png, last.pt and best.pt")
    run.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                     help="continue an interrupted run from OUT/last.pt (or CKPT)")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    show_defaults(p, defaults)
    return p


def show_defaults(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """Add each flag's default to its help: the script's value for flags filled in later, argparse's otherwise."""
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) and action.dest != "help":
            action.help = ""
        if "default" in action.help or action.dest == "help":
            continue
        if action.dest in defaults and action.default is None:
            value = defaults[action.dest]
            shown = "auto" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value
            action.help = f"{action.help} (default: {shown})".strip()
        elif action.default not in (None, False, argparse.SUPPRESS):
            action.help = f"{action.help} (default: %(default)s)".strip()


DATA_FLAGS = ("voc_dir", "demo", "classes", "ignore_index")   # what a fine-tune or a resume takes from its checkpoint


def inherit_data_flags(args: argparse.Namespace, out: str) -> None:
    """--finetune-from and --resume train on the checkpoint's dataset, classes and void label unless any of
    --voc-dir, --demo, --classes or --ignore-index is given."""
    start = args.finetune_from or (args.resume and (Path(out) / "last.pt" if args.resume == "auto" else args.resume))
    if not start or any(getattr(args, key) is not None and getattr(args, key) is not False for key in DATA_FLAGS) \
            or not Path(start).is_file():
        return   # a missing file is reported where the run opens it
    config = load_checkpoint(start).get("config", {})
    for key in DATA_FLAGS:
        setattr(args, key, config.get(key, False if key == "demo" else None))
    data = "the synthetic demo data" if args.demo else args.voc_dir or "VOC2012"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: training on the data of {start}: {data}, classes {args.classes or 'VOC'}, ignore index "
              f"{args.ignore_index} (--voc-dir, --demo, --classes or --ignore-index to choose others)")


def finish_train_args(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill unset flags from the checkpoint a run starts from, then from the script's defaults (shrunk by --demo),
    and check their ranges."""
    inherit_data_flags(args, args.out or defaults["out"])
    void_given = args.void
    chosen = dict(defaults, **(DEMO_TRAIN_DEFAULTS if args.demo else {}))
    for key, value in chosen.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1) if try_all_gpus_or_cpu(args.device).type == "cuda" else 0
    checks = [(args.epochs >= 1, "--epochs must be at least 1"),
              (args.batch_size >= 1, "--batch-size must be at least 1"),
              (args.lr > 0, "--lr must be positive"),
              (args.wd >= 0, "--wd must not be negative"),
              (0 < args.scale[0] <= args.scale[1], f"--scale {args.scale[0]:g} {args.scale[1]:g}: need "
               f"0 < MIN <= MAX"),
              (args.workers >= 0, "--workers must not be negative"),
              (args.accum_steps >= 1, "--accum-steps must be at least 1"),
              (args.val_every >= 1, "--val-every must be at least 1"),
              (args.ignore_index is None or 0 <= args.ignore_index < VOID,
               f"--ignore-index must be a label value 0..{VOID - 1} ({VOID} is always void)"),
              (args.mirror is None or args.download, "--mirror goes with --download"),
              (not (args.download and args.demo), "--download and --demo do not go together"),
              (all(c > 0 and c % 32 == 0 for c in args.crop),
               f"--crop {args.crop[0]} {args.crop[1]}: both sides must be positive multiples of 32 "
               f"(the networks downsample by 32)")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    args.void = void_rule(args.void, void_given, dataset_classes(args.classes)[0][0])
    return args


def void_rule(void: str, void_given: str | None, first_class: str) -> str:
    """The book trains void pixels as class 0, which only means something where class 0 is 'background': there a
    default of 'background' becomes 'ignore' (said once), and an explicit --void background is an error."""
    if void != "background" or first_class == "background":
        return void
    if void_given == "background":
        raise UsageError(f"--void background trains void pixels as class 0, which is {first_class!r} here, not a "
                         f"background; use --void ignore")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: class 0 is {first_class!r}, not 'background', so void pixels are ignored (--void ignore)")
    return "ignore"


def predict_arg_parser(description: str, checkpoint: str, figure: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--checkpoint", default=checkpoint, help="the trained model: best.pt (best val mIoU) or last.pt "
                   "(the last epoch) of a training run")
    p.add_argument("--voc-dir", help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--demo", action="store_true", help="use the built-in synthetic data")
    p.add_argument("--split", help="split to show or evaluate (default: the checkpoint's validation split)")
    p.add_argument("--classes", metavar="FILE", help="the class file the checkpoint was trained with (checked "
                   "against the classes the checkpoint carries)")
    p.add_argument("--ignore-index", type=int, metavar="K", help="label value K is void (default: as in training)")
    p.add_argument("--num", type=int, default=4, help="images in the figure")
    p.add_argument("--figure", default=figure, help="where the figure is written")
    p.add_argument("--eval", action="store_true", help="full-resolution metrics over the whole split")
    p.add_argument("--metrics", help="JSON file for --eval (default: metrics_SPLIT.json next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the first that exists)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: one per core that other programs leave free)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision, as in training (auto: bf16 on CUDA GPUs that have it and on CPUs that "
                   "compute it natively)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    own = p.add_argument_group("your own images")
    own.add_argument("--images", nargs="+", metavar="PATH", help="predict these image files, folders or globs "
                     "(JPEG/PNG, any size) instead of a dataset split")
    own.add_argument("--save-dir", default="predictions", help="where --images writes NAME.png (class indices as a "
                     "palette PNG) and NAME_overlay.jpg")
    own.add_argument("--tta", action="store_true", help="with --images or --serve: average the logits with those "
                     "of the mirrored image")
    own.add_argument("--tile", nargs="+", metavar=("auto|off|H", "W"),
                     help=f"predict in overlapping H x W windows (multiples of 32) whose logits are blended, so any "
                     f"size fits in bounded memory; off: the whole image at once; default: auto, i.e. "
                     f"{DEFAULT_TILE[0]} {DEFAULT_TILE[1]} for images above {AUTO_TILE_PIXELS / 2**20:g} Mpixel")
    own.add_argument("--tile-overlap", type=float, metavar="F",
                     help=f"fraction of a window shared with its neighbour, at least: the step between windows is "
                     f"rounded down to a multiple of 32 (default: {DEFAULT_OVERLAP})")
    web = p.add_argument_group("in your browser")
    web.add_argument("--serve", action="store_true", help="a local web page: drop a photo, see the models' overlays "
                     "side by side")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every machine that can "
                     "reach this one)")
    web.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    web.add_argument("--max-upload-mb", type=float, default=25, metavar="MB", help="larger uploads are refused")
    web.add_argument("--max-waiting", type=int, default=4, metavar="N",
                     help="requests that may wait for the model (one runs at a time); more are refused as busy")
    show_defaults(p, {})
    return p


def finish_predict_args(args: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """Fill --split and --ignore-index from the checkpoint's training run, and refuse a --classes file that
    disagrees with the classes the checkpoint carries."""
    config = checkpoint.get("config", {})
    if args.split is None:
        args.split = config.get("val_split", "val")
    if args.ignore_index is None:
        args.ignore_index = config.get("ignore_index")
    if args.tta and not (args.images or args.serve):
        raise UsageError("--tta applies to --images and --serve")
    if (args.tile or args.tile_overlap is not None) and not (args.images or args.serve):
        raise UsageError("--tile and --tile-overlap apply to --images and --serve")
    args.tile_overlap = DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap
    args.tile = parse_tile(args.tile or ["auto"], args.tile_overlap)
    if args.images and args.eval:
        raise UsageError("--images and --eval do not go together (--eval measures a dataset split)")
    if args.serve and (args.images or args.eval):
        raise UsageError("--serve goes alone: not with --images or --eval")
    for ok, message in ((0 <= args.port <= 65535, f"--port {args.port}: must be 0..65535 (0: any free port)"),
                        (args.max_upload_mb > 0, "--max-upload-mb must be positive"),
                        (args.max_waiting >= 0, "--max-waiting must not be negative")):
        if args.serve and not ok:
            raise UsageError(message)
    if args.classes:
        check_classes_match(*read_classes(args.classes), checkpoint, args.classes)
    return args
