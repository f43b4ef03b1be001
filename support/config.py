"""The run configurations: what a training run or a prediction is told, built once in a script's main from its
DEFAULTS and flags; a training run's is stored in every checkpoint as plain values."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from some_define import STRIDE, VOID, UsageError

from .distributed import env_rank


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the flags of the training scripts, by the same names)."""
    # data
    data_dir: str                   # --voc-dir: a VOC2012 folder, a folder holding one, or a folder of pair lists
    demo: bool
    download: bool
    mirror: str | None
    classes: str | None             # a class file; None: VOC's 21
    ignore_index: int | None        # a label value that is void besides 255
    train_split: str
    val_split: str
    crop: list[int]
    scale: list[float]
    hflip: bool
    void: str                       # 'background' (the book) or 'ignore'
    class_weights: str
    skip_bad: bool
    workers: int
    # model and optimizer
    model: str
    pretrained: str
    optimizer: str
    lr: float
    lr_schedule: str
    wd: float
    loss: str                       # the reduction: 'sum' (the book) or 'mean'
    epochs: int
    batch_size: int
    finetune_from: str | None
    # speed and memory
    amp: str
    channels_last: str
    data_on_device: str
    accum_steps: int
    compile: bool
    sync_bn: bool
    # the run
    device: str | None
    threads: int | None
    seed: int
    val_every: int
    out: str
    resume: str | None

    def plain(self) -> dict:
        """As a checkpoint stores it: plain values only (loadable with weights_only=True)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PredictConfig:
    """Every setting of a predict script (its flags, by the same names); split and ignore_index default to the
    checkpoint's."""
    checkpoint: str
    data_dir: str | None
    demo: bool
    split: str | None
    classes: str | None
    ignore_index: int | None
    num: int
    figure: str
    eval: bool
    metrics: str | None
    batch_size: int
    device: str | None
    threads: int | None
    amp: str
    convert: str | None
    export_onnx: str | None
    images: list[str] | None
    save_dir: str
    tta: bool
    tile: tuple[int, int] | str      # (H, W), "auto" or "off"
    tile_overlap: float
    serve: bool
    host: str
    port: int
    max_upload_mb: float
    max_waiting: int
    compare: str | None = None           # my_predict.py: the FCN beside the U-Net
    compare_figure: str | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
PREDICT_FIELDS = tuple(f.name for f in dataclasses.fields(PredictConfig))

# Checkpoints written before TrainConfig stored the training script's argparse namespace: its keys, once, here.
RENAMED = {"voc_dir": "data_dir"}


def stored_config(config: dict) -> dict:
    """A checkpoint's config in TrainConfig's names (older checkpoints: renamed keys, flags of no run dropped)."""
    renamed = {RENAMED.get(key, key): value for key, value in config.items()}
    return {key: value for key, value in renamed.items() if key in FIELDS or key == "source"}


def check_train_config(c: TrainConfig) -> None:
    """Each value in its range, or one line naming the flag."""
    checks = [(c.epochs >= 1, "--epochs must be at least 1"),
              (c.batch_size >= 1, "--batch-size must be at least 1"),
              (c.lr > 0, "--lr must be positive"),
              (c.wd >= 0, "--wd must not be negative"),
              (0 < c.scale[0] <= c.scale[1], f"--scale {c.scale[0]:g} {c.scale[1]:g}: need 0 < MIN <= MAX"),
              (c.workers >= 0, "--workers must not be negative"),
              (c.accum_steps >= 1, "--accum-steps must be at least 1"),
              (c.val_every >= 1, "--val-every must be at least 1"),
              (c.ignore_index is None or 0 <= c.ignore_index < VOID,
               f"--ignore-index must be a label value 0..{VOID - 1} ({VOID} is always void)"),
              (c.mirror is None or c.download, "--mirror goes with --download"),
              (not (c.download and c.demo), "--download and --demo do not go together"),
              (all(n > 0 and n % STRIDE == 0 for n in c.crop),
               f"--crop {c.crop[0]} {c.crop[1]}: both sides must be positive multiples of {STRIDE} "
               f"(the networks downsample by {STRIDE})")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def void_rule(void: str, void_given: str | None, first_class: str) -> str:
    """The book trains void pixels as class 0, which only means something where class 0 is 'background': there a
    default of 'background' becomes 'ignore' (said once), and an explicit --void background is an error."""
    if void != "background" or first_class == "background":
        return void
    if void_given == "background":
        raise UsageError(f"--void background trains void pixels as class 0, which is {first_class!r} here, not a "
                         f"background; use --void ignore")
    if env_rank() == 0:
        print(f"note: class 0 is {first_class!r}, not 'background', so void pixels are ignored (--void ignore)")
    return "ignore"
