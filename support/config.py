"""The run configurations: what a training run or a prediction is told, built once in a script's main; a training
run's settings are merged once, in merge_settings, and stored in every checkpoint as plain values."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass, field

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
    # where each setting that is not the script's default came from: not a setting, not stored
    origins: dict = field(default_factory=dict, compare=False, repr=False)

    def plain(self) -> dict:
        """As a checkpoint stores it: plain values only (loadable with weights_only=True)."""
        return {key: getattr(self, key) for key in FIELDS}


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
    half: bool
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


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "origins")
PREDICT_FIELDS = tuple(f.name for f in dataclasses.fields(PredictConfig))

# Checkpoints written before TrainConfig stored the training script's argparse namespace: its keys, once, here.
RENAMED = {"voc_dir": "data_dir"}


def stored_config(config: dict) -> dict:
    """A checkpoint's config in TrainConfig's names (older checkpoints: renamed keys, flags of no run dropped)."""
    renamed = {RENAMED.get(key, key): value for key, value in config.items()}
    return {key: value for key, value in renamed.items() if key in FIELDS or key == "source"}


# With --demo, every default below that the user did not set shrinks to this, so a run takes minutes on a laptop CPU.
DEMO_DEFAULTS = {"crop": [64, 64], "epochs": 12, "batch_size": 8, "pretrained": "none", "device": "cpu"}
# A fine-tune trains on its checkpoint's data; a resume continues the whole run, on its device unless told otherwise,
# with this machine's threads and loader workers.
FINETUNE_TAKES = ("data_dir", "demo", "classes", "ignore_index")
RESUME_LEAVES = ("threads", "workers", "out", "resume")
APPLIED_QUIETLY = ("device",)   # given with --resume: no note, the run goes on elsewhere


@dataclass(frozen=True)
class Start:
    """The checkpoint a run starts from: ``how`` is 'resume' or 'finetune'; ``config`` its stored settings."""
    how: str
    path: str
    config: dict

    def settings(self) -> dict:
        """What the run takes from it: every training setting for a resume, the data settings for a fine-tune."""
        if self.how == "finetune":
            return {key: self.config.get(key, False if key == "demo" else None) for key in FINETUNE_TAKES}
        taken = {key: value for key, value in self.config.items() if key in FIELDS and key not in RESUME_LEAVES}
        return dict(taken, out=str(Path(self.path).parent))   # it goes on writing beside its last.pt


def merge_settings(defaults: dict, given: dict, preset: tuple[str, dict] | None = None,
                   start: Start | None = None) -> tuple[dict, dict]:
    """A run's settings, each from the last of these that has it: the script's DEFAULTS < the demo's (when the run
    is a demo) < the preset's < the checkpoint's it resumes or fine-tunes from < the flags given. Returns the
    values and, for each value that is not a default, where it came from."""
    name, preset_values = preset or ("", {})
    taken = start.settings() if start else {}
    demo = given.get("demo", taken.get("demo", preset_values.get("demo", defaults.get("demo", False))))
    layers = [("default", defaults), ("--demo", DEMO_DEFAULTS if demo else {}), (f"preset {name}", preset_values),
              ("checkpoint", taken), ("flag", given)]
    values, origins = {}, {}
    for origin, layer in layers:
        for key, value in layer.items():
            values[key] = value
            if origin != "default":
                origins[key] = origin
    return values, origins


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
