"""Train the improved model, a U-Net built from ResNet-18 stages, and run the study (which change buys what?).

    python my_train.py                                    # ResNetUNet, Adam lr 1e-4, 30 epochs -> runs/my
    python my_train.py --finetune-from runs/my/last.pt --lr 1e-5 --epochs 10 --out runs/my-ft
    python my_train.py --preset unet-sgd-1e-3             # one row of the study -> runs/unet-sgd-1e-3 (--out OUT: OUT/...)
    python my_train.py --study --demo                     # every preset -> runs/study/*, pictures/study.{md,png}
"""
import argparse
from pathlib import Path

from origin_train import DEFAULTS as BOOK_DEFAULTS
from some_define import UsageError
from support.cli import given_flags, script_defaults, train_arg_parser, train_config
from support.errors import run_main
from support.study import run_study, train_preset
from support.training import train

DEFAULTS = {
    **BOOK_DEFAULTS,
    "model": "unet",
    "optimizer": "adam",
    "lr": 1e-4,
    "loss": "mean",             # mean cross-entropy over labelled pixels
    "void": "ignore",           # void (boundary) pixels carry no label, so they get no loss
    "out": "runs/my",
}
FINETUNE_EPOCHS = {"full": 10, "demo": 4}   # the original repository's "then 10 more epochs at lr 1e-5"

# The book's training recipe, and the common one of torchvision's segmentation reference (less weight decay under
# Adam, poly decay, flips and scales 0.5-2), each as a diff of the defaults above.
BOOK = {key: BOOK_DEFAULTS[key] for key in ("optimizer", "lr", "loss", "void")}
REFERENCE = dict(lr=1e-3, wd=1e-4, lr_schedule="poly", hflip=True, scale=[0.5, 2.0])

# Each row of the study: what differs from the defaults above. "then" fine-tunes another preset's result.
PRESETS = {
    "fcn-sgd-1e-3": dict(BOOK, model="fcn"),                                        # the book
    "unet-sgd-1e-3": dict(BOOK, model="unet"),                                      # only the network
    "unet-adam-1e-3": dict(lr=1e-3),
    "unet-adam-1e-4": dict(),                                                       # the default
    "unet-adam-1e-4-ft-1e-5": dict(lr=1e-5, then="unet-adam-1e-4"),                 # 30 + 10 epochs
    "unet-adam-1e-4-void-bg": dict(void="background", only_with_background=True),   # what ignoring void buys
    "fcn-reference": dict(REFERENCE, model="fcn"),                                  # the book's network, today's recipe
    "unet-reference": dict(REFERENCE),
    "unet-reference-mfw": dict(REFERENCE, class_weights="median-freq"),             # + SegNet's class balancing
    "unet-reference-mfw-sqrt": dict(REFERENCE, class_weights="median-freq-sqrt"),   # a softer balance
    "fcn-reference-mfw": dict(REFERENCE, model="fcn", class_weights="median-freq"), # the balance without skips
}


def arg_parser() -> argparse.ArgumentParser:
    p = train_arg_parser(__doc__.splitlines()[0], DEFAULTS)
    p.add_argument("--preset", choices=list(PRESETS), help="train one row of the study (output OUT/PRESET, "
                   "OUT defaulting to runs)")
    p.add_argument("--study", action="store_true", help="train and evaluate every preset, then write the study")
    p.add_argument("--presets", nargs="+", choices=list(PRESETS), metavar="NAME",
                   help="with --study: only these presets (default: all that make sense for the dataset)")
    p.add_argument("--pictures", help="where --study writes study.md and study.png (default: pictures/ for VOC "
                   "and the demo data, pictures/DATASET/ for others)")
    p.add_argument("--num", type=int, default=4, help="val images in study.png")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.preset and args.study:
        raise UsageError("--preset and --study do not go together (--study runs every preset)")
    if args.presets and not args.study:
        raise UsageError("--presets goes with --study")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser()
    args = parse_args(parser, argv)
    given, defaults = given_flags(parser, argv), script_defaults(parser)   # merged once, in train_config
    finetune_epochs = FINETUNE_EPOCHS["demo" if args.demo else "full"]
    if args.study:
        run_study(given, PRESETS, defaults, finetune_epochs, args.presets, args.pictures, args.num)
    elif args.preset:
        train_preset(given, args.preset, Path(given.get("out", "runs")), PRESETS, defaults, finetune_epochs)
    else:
        train(train_config(given, defaults))


if __name__ == "__main__":
    run_main(main)
