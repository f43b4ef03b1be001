"""Train the book's FCN (d2l, "Fully Convolutional Networks") on PASCAL VOC 2012 with the book's settings.

    python origin_train.py                 # ./VOC2012, or --voc-dir PATH
    python origin_train.py --demo          # the built-in synthetic data, on the CPU, in about 2 minutes
    python origin_train.py --download      # fetch and extract VOC 2012 first (--mirror URL if its host is down)
    python origin_train.py --voc-dir mine --classes mine/classes.txt   # your own dataset in VOC layout
"""
from support.cli import given_flags, script_defaults, train_arg_parser, train_config
from support.errors import run_main
from support.training import train

# The book's settings (the original repository trained 30 epochs; the book 5).
DEFAULTS = {
    "data_dir": "VOC2012",      # --voc-dir
    "model": "fcn",
    "pretrained": "imagenet",
    "optimizer": "sgd",         # plain SGD, no momentum
    "lr": 1e-3,
    "lr_schedule": "constant",
    "wd": 1e-3,
    "loss": "sum",              # per-image mean cross-entropy summed over the batch, as the book's l.sum().backward()
    "void": "background",       # the book's colormap has no boundary colour, so void pixels are trained as class 0
    "class_weights": "none",    # every class counts the same
    "epochs": 30,
    "batch_size": 32,
    "crop": [320, 480],
    "scale": [1.0, 1.0],        # random crops at the image's own scale, no mirroring: the book's only augmentation
    "hflip": False,
    "device": None,             # cuda, else mps, else cpu
    "seed": 0,
    "workers": None,            # 4 on a GPU, 0 on the CPU
    "out": "runs/origin",
}


def arg_parser():
    return train_arg_parser(__doc__.splitlines()[0], DEFAULTS, choose_model=False)   # the book's FCN only


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser()
    parser.parse_args(argv)   # --help and bad flags first
    train(train_config(given_flags(parser, argv), script_defaults(parser)))


if __name__ == "__main__":
    run_main(main)
