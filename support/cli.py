"""The command line of the scripts: their flags, the defaults --demo shrinks, and one-line errors."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from some_define import MODELS, STRIDE, UsageError

from .data import CLASS_WEIGHT_POWERS, VOC_TAR, VOC_URL, dataset_classes
from .checkpoints import load_checkpoint, resume_checkpoint_path
from .config import (APPLIED_QUIETLY, DEMO_DEFAULTS, FIELDS, PREDICT_FIELDS, PredictConfig, Start, TrainConfig,
                     check_train_config, merge_settings, void_rule)
from .distributed import env_rank
from .speed import try_all_gpus_or_cpu
from .tiles import AUTO_TILE_PIXELS, DEFAULT_OVERLAP, DEFAULT_TILE, parse_tile

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help says it in words (what None or auto means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        # --tile takes auto, off or H W; nargs="+" alone would show "TILE [TILE ...]"
        return "auto|off|H W" if action.dest == "tile" else super()._format_args(action, default_metavar)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (the full usage stays behind --help), and no abbreviations
    (--epoch would silently mean --epochs)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(2, None if env_rank() else f"error: {message}; see --help\n")   # under torchrun, rank 0 says it once


DEMO_CHANGES = ", ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in DEMO_DEFAULTS.items())
# The flags both kinds of script take, each defined once: (argparse settings, help in training, help in prediction).
SHARED_FLAGS = {
    "--voc-dir": (dict(dest="data_dir", metavar="DIR"),
                  "VOC2012 folder, or a folder holding VOC2012 or VOCdevkit/VOC2012, or a folder with "
                  "train.txt/val.txt lists of 'image mask' pairs (SegNet/CamVid layout)",
                  "dataset folder (default: the one the checkpoint was trained on)"),
    "--demo": (dict(action="store_true"),
               f"use the built-in synthetic VOC-layout data (synthetic shapes, not photos; minutes on a CPU); it "
               f"changes the defaults to {DEMO_CHANGES}", "use the built-in synthetic data"),
    "--classes": (dict(metavar="FILE"),
                  "your dataset's classes, one per line: 'name' or 'name R G B' (R G B: integers 0..255; a name may "
                  "hold spaces, and without a colour it must not end in a number); index = line number; classes "
                  "without colours get well-separated ones, none black; default: VOC's 21",
                  "the class file the checkpoint was trained with (checked against the classes the checkpoint "
                  "carries)"),
    "--ignore-index": (dict(type=int, metavar="K"), "label value K is void like 255 (e.g. CamVid's 'unlabelled' 11)",
                       "label value K is void (default: as in training)"),
    "--amp": (dict(choices=["auto", "bf16", "fp16", "off"], default="auto"),
              "mixed precision (auto: bf16 on CUDA GPUs that have it and on CPUs that compute it natively: AMX, "
              "AVX512-BF16, ARM BF16; off elsewhere)", "mixed precision, as in training (auto: bf16 on CUDA GPUs "
              "that have it and on CPUs that compute it natively)"),
    "--device": (dict(), "cuda, cuda:N, mps or cpu (default: the first that exists)",
                 "cuda, cuda:N, mps or cpu (default: the first that exists)"),
    "--threads": (dict(type=int, metavar="N"), "CPU threads (default: one per core that other programs leave free, "
                  "looked at again every 10 s; OMP_NUM_THREADS fixes it too)",
                  "CPU threads (default: one per core that other programs leave free, looked at again between images "
                  "and rows of tiles)"),
    "--debug": (dict(action="store_true"), "show tracebacks", "show tracebacks"),
}


def add_shared(group, flag: str, training: bool) -> None:
    """One of SHARED_FLAGS, with its help for a training or a predict script."""
    settings, train_help, predict_help = SHARED_FLAGS[flag]
    group.add_argument(flag, **settings, help=train_help if training else predict_help)


def train_arg_parser(description: str, defaults: dict, choose_model: bool = True) -> argparse.ArgumentParser:
    """The flags of both training scripts, with the script's ``defaults`` (shown by --help); train_config merges
    them with the flags given."""
    p = ArgumentParser(description=description)
    add_data_flags(p.add_argument_group("data"))
    add_model_flags(p.add_argument_group("model and optimizer"), choose_model)
    add_speed_flags(p.add_argument_group("speed and memory"))
    run = p.add_argument_group("run")
    add_shared(run, "--device", True)
    add_shared(run, "--threads", True)
    run.add_argument("--seed", type=int, help="seed of the weights' init, the crops and their order")
    run.add_argument("--val-every", type=int, default=1, metavar="N",
                     help="validate every N epochs and after the last (validation at full resolution costs time)")
    run.add_argument("--out", help="folder for history.csv, curves.png, last.pt and best.pt")
    run.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                     help="continue an interrupted run from OUT/last.pt (or CKPT) with the settings it was started "
                     "with; a flag given beside it changes that setting (said in one line), --epochs N extends the "
                     "run to N epochs")
    add_shared(run, "--debug", True)
    p.set_defaults(**defaults)
    return p


def add_data_flags(data) -> None:
    add_shared(data, "--voc-dir", True)
    add_shared(data, "--demo", True)
    data.add_argument("--download", action="store_true",
                      help=f"if the data is not there, fetch {VOC_TAR} (2 GB) into the parent folder of --voc-dir, "
                      f"check its MD5 and extract VOCdevkit/VOC2012 there; an interrupted download resumes")
    data.add_argument("--mirror", metavar="URL", help=f"where --download fetches the tar (default {VOC_URL})")
    add_shared(data, "--classes", True)
    add_shared(data, "--ignore-index", True)
    for split in ("train", "val"):
        data.add_argument(f"--{split}-split", default=split, metavar="NAME",
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
    data.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes (default: 4 on a GPU, "
                      "0 on the CPU, where crops are cheap and workers would compete with the training threads)")


def add_model_flags(model, choose_model: bool) -> None:
    if choose_model:   # origin_train.py trains the book's FCN only
        model.add_argument("--model", choices=list(MODELS), help="the network: the book's FCN or the U-Net of the "
                           "same ResNet-18")
    model.add_argument("--pretrained", metavar="WHICH", help="the ResNet-18's starting weights: imagenet, none "
                       "(random init), or a path to resnet18-f37072fd.pth")
    model.add_argument("--optimizer", choices=["sgd", "adam"], help="sgd: plain SGD, no momentum (the book's); adam")
    model.add_argument("--lr", type=float, help="learning rate (of the first epoch, with --lr-schedule poly)")
    model.add_argument("--lr-schedule", choices=["constant", "poly"],
                       help="constant: the book's; poly: lr x (1 - done/epochs)^0.9, lowered once per epoch "
                       "(torchvision's segmentation reference lowers it every iteration)")
    model.add_argument("--wd", type=float, help="weight decay")
    model.add_argument("--loss", choices=["sum", "mean"],
                       help="sum: the book's per-image mean cross-entropy summed over the batch; mean: over pixels")
    model.add_argument("--epochs", type=int, help="epochs of this run (of a fine-tune: on top of its base run's)")
    model.add_argument("--batch-size", type=int, help="images per optimizer step; under torchrun the global batch, "
                       "split evenly over the processes")
    model.add_argument("--finetune-from", metavar="CKPT",
                       help="start from this checkpoint's weights with a fresh optimizer; the history continues "
                       "(a .pth file of the original repository works too)")


def add_speed_flags(speed) -> None:
    auto = ["auto", "on", "off"]
    add_shared(speed, "--amp", True)
    speed.add_argument("--channels-last", choices=auto, default="auto",
                       help="NHWC memory format (auto: on CUDA, and on the CPU with bf16)")
    speed.add_argument("--data-on-device", choices=auto, default="auto",
                       help="keep the uint8 training split in GPU memory and crop there (auto: on CUDA if it fits)")
    speed.add_argument("--accum-steps", type=int, default=1, metavar="N",
                       help="gradient accumulation: each step sees accum-steps batches of --batch-size")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="under torchrun, BatchNorm statistics over the global batch")


UNSET = object()


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The training settings given on the command line, and only those: argparse fills in a default only where the
    namespace it is handed has no value yet."""
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(FIELDS, UNSET)))
    return {key: value for key, value in vars(given).items() if key in FIELDS and value is not UNSET}


def script_defaults(parser: argparse.ArgumentParser) -> dict:
    """Every training setting's default, as the script's parser holds it (its DEFAULTS and the flags' own)."""
    return {key: parser.get_default(key) for key in FIELDS}


def starting_checkpoint(given: dict, defaults: dict, preset: dict) -> Start | None:
    """The checkpoint that --resume continues (OUT/last.pt, or the file named) or --finetune-from starts from."""
    finetune = given.get("finetune_from") or preset.get("finetune_from")
    if given.get("resume"):
        if given.get("finetune_from"):
            raise UsageError("--resume and --finetune-from do not go together")
        path = resume_checkpoint_path(given["resume"], Path(given.get("out") or preset.get("out") or defaults["out"]))
        return Start("resume", str(path), load_checkpoint(path).get("config", {}))
    if finetune and Path(finetune).is_file():   # a missing file is reported where the run opens it
        return Start("finetune", finetune, load_checkpoint(finetune).get("config", {}))
    return None


def say_start(start: Start, given: dict) -> None:
    """One line on what a fine-tune takes from its checkpoint, or what a resume changes of the run it continues."""
    if start.how == "finetune":
        if set(start.settings()) - set(given):   # some data setting comes from the checkpoint
            d = dict(start.settings(), **given)
            data = "the synthetic demo data" if d.get("demo") else d.get("data_dir") or "VOC2012"
            print(f"note: training on the data of {start.path}: {data}, classes {d.get('classes') or 'VOC'}, "
                  f"ignore index {d.get('ignore_index')} (--voc-dir, --demo, --classes or --ignore-index to "
                  f"choose others)")
        return
    taken = start.settings()
    changed = [f"--{key.replace('_', '-')} {shown(given[key])} (was {shown(taken[key])})"
               for key in given if key in taken and given[key] != taken[key] and key not in APPLIED_QUIETLY]
    if changed:
        print(f"note: resuming {start.path} with other settings than it started with: {', '.join(changed)}")


def shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def train_config(given: dict, defaults: dict, preset: tuple[str, dict] | None = None) -> TrainConfig:
    """The run's configuration, merged once (merge_settings: DEFAULTS < demo < preset < checkpoint < flags given),
    with the number of loader workers and the void rule settled; checked."""
    start = starting_checkpoint(given, defaults, preset[1] if preset else {})
    if start and env_rank() == 0:
        say_start(start, given)
    values, origins = merge_settings(defaults, given, preset, start)
    if values.get("workers") is None:
        values["workers"] = min(4, os.cpu_count() or 1) if try_all_gpus_or_cpu(values["device"]).type == "cuda" else 0
    first_class = dataset_classes(values.get("classes"))[0][0]
    values["void"] = void_rule(values["void"], given.get("void"), first_class)
    config = TrainConfig(**{key: values.get(key) for key in FIELDS}, origins=origins)
    check_train_config(config)
    return config


def predict_arg_parser(description: str, checkpoint: str, figure: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--checkpoint", default=checkpoint, help="the trained model: best.pt (best val mIoU) or last.pt "
                   "(the last epoch) of a training run, or a .pth file of the original repository")
    add_shared(p, "--voc-dir", False)
    add_shared(p, "--demo", False)
    p.add_argument("--split", help="split to show or evaluate (default: the checkpoint's validation split)")
    add_shared(p, "--classes", False)
    add_shared(p, "--ignore-index", False)
    p.add_argument("--num", type=int, default=4, metavar="N", help="how many images of the split the figure shows")
    p.add_argument("--figure", default=figure, help="where the figure is written")
    p.add_argument("--eval", action="store_true", help="full-resolution metrics over the whole split")
    p.add_argument("--metrics", help="JSON file for --eval (default: metrics_SPLIT.json next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    add_shared(p, "--device", False)
    add_shared(p, "--threads", False)
    add_shared(p, "--amp", False)
    add_shared(p, "--debug", False)
    out = p.add_argument_group("models out")
    out.add_argument("--convert", metavar="OUT.pt", help="write the --checkpoint model (e.g. a .pth file of the "
                     "original repository) as this project's checkpoint, loadable with weights_only=True, and stop")
    out.add_argument("--half", action="store_true", help="with --convert: store the weights as fp16 (half the file; "
                     "they load into fp32 networks), leaving out the optimizer state a --resume would need")
    out.add_argument("--export-onnx", metavar="PATH", help="write the --checkpoint model as ONNX (any batch and image "
                     "size; classes, colours and normalisation in its metadata), checked with ONNX Runtime on sample "
                     "images of the checkpoint's split, and stop (pip install -r requirements-onnx.txt)")
    own = p.add_argument_group("your own images")
    own.add_argument("--images", nargs="+", metavar="PATH", help="predict these image files, folders or globs, of "
                     "any size, instead of a dataset split: a folder gives the JPEG, PNG, WebP, BMP, GIF and TIFF "
                     "files directly inside it; a file or glob may be any image Pillow reads")
    own.add_argument("--save-dir", default="predictions", help="where --images writes NAME.png (class indices as a "
                     "palette PNG) and NAME_overlay.jpg")
    own.add_argument("--tta", action="store_true", help="with --images or --serve: average the logits with those "
                     "of the mirrored image")
    own.add_argument("--tile", nargs="+", help=f"auto (the default): {DEFAULT_TILE[0]} x {DEFAULT_TILE[1]} windows "
                     f"for images above {AUTO_TILE_PIXELS / 2**20:g} Mpixel, smaller ones whole; off: the whole image "
                     f"at once; H W: overlapping H x W windows (multiples of {STRIDE}) whose logits are blended, so "
                     f"any size fits in bounded memory")
    own.add_argument("--tile-overlap", type=float, metavar="F",
                     help=f"fraction of a window shared with its neighbour, at least: the step between windows is "
                     f"rounded down to a multiple of {STRIDE} (default: {DEFAULT_OVERLAP})")
    web = p.add_argument_group("in your browser")
    web.add_argument("--serve", action="store_true", help="a local web page: drop a photo, see the models' overlays "
                     "side by side")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every machine that can "
                     "reach this one)")
    web.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    web.add_argument("--max-upload-mb", type=float, default=25, metavar="MB", help="larger uploads are refused")
    web.add_argument("--max-waiting", type=int, default=4, metavar="N",
                     help="requests that may wait for the model (one runs at a time); more are refused as busy")
    return p


def predict_config(flags: dict) -> PredictConfig:
    """A predict script's configuration from its flags, checked (what depends on the checkpoint is filled later)."""
    c = PredictConfig(**{key: flags.get(key) for key in PREDICT_FIELDS if key not in ("tile", "tile_overlap")},
                      tile_overlap=DEFAULT_OVERLAP if flags["tile_overlap"] is None else flags["tile_overlap"],
                      tile=flags["tile"] or ["auto"])
    rules = [(not c.tta or c.images or c.serve, "--tta applies to --images and --serve"),
             (not (flags["tile"] or flags["tile_overlap"] is not None) or c.images or c.serve,
              "--tile and --tile-overlap apply to --images and --serve"),
             (not (c.images and c.eval), "--images and --eval do not go together (--eval measures a dataset split)"),
             (not (c.serve and (c.images or c.eval)), "--serve goes alone: not with --images or --eval"),
             (not ((c.convert or c.export_onnx) and (c.images or c.eval or c.serve)),
              "--convert and --export-onnx go alone: not with --images, --eval or --serve"),
             (not c.half or c.convert, "--half goes with --convert"),
             (not c.serve or 0 <= c.port <= 65535, f"--port {c.port}: must be 0..65535 (0: any free port)"),
             (not c.serve or c.max_upload_mb > 0, "--max-upload-mb must be positive"),
             (not c.serve or c.max_waiting >= 0, "--max-waiting must not be negative")]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    return dataclasses.replace(c, tile=parse_tile(c.tile, c.tile_overlap))
