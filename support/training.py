"""The training run behind both training scripts, in named steps: set up (data, criterion, network, optimizer),
resume, one epoch, validate, save; each epoch writes history.csv, curves.png, last.pt and (the best) best.pt."""
from __future__ import annotations

import itertools
from contextlib import nullcontext
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from some_define import (RESNET18_FILE, RandomCropBatchSampler, SegDataset, Speed, UsageError, build_model, evaluate,
                         make_optimizer, train_epoch)

from .checkpoints import (check_checkpoint_matches, load_checkpoint, make_checkpoint, resume_checkpoint_path,
                          rng_states, save_checkpoint, set_rng_states, unwrap)
from .config import TrainConfig
from .data import dataset_classes, read_split, training_batches
from .distributed import DistributedContext, env_rank, wrap_for_training
from .download import find_data
from .errors import Interrupted, StopOnInterrupt, naming_flags
from .figures import plot_curves
from .files import check_writable_dir, link_or_copy, new_folder_removed_on_failure, save_figure, write_history
from .hooks import StopRequested, each, progress, show_progress, stop_together, watch_load
from .speed import (bf16_peak_flops, cudnn_autotuning, resolve_speed, set_threads, threads_for_load,
                    train_flops_per_image, use_cpu_kernels)
from .steps import make_criterion, make_step


@dataclass(frozen=True)
class Parts:
    """What a run decides once and trains with: its data, network, optimizer and step, on its device."""
    config: TrainConfig
    ctx: DistributedContext
    log: Callable
    class_names: list[str]
    colormap: list[list[int]]
    class_weights: list[float] | None
    val_share: SegDataset      # this process's share of the val split: every image counted once over the processes
    speed: Speed
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: Callable
    sampler: RandomCropBatchSampler
    batches: Callable[[], Iterator]
    flops: float | None


@dataclass(frozen=True)
class MidEpoch:
    """An epoch stopped by Ctrl-C: its steps done, the running totals of train_epoch and the seconds it took. A
    checkpoint keeps it as ``step`` and ``partial``."""
    epoch: int
    totals: dict
    seconds: float

    @classmethod
    def from_checkpoint(cls, state: dict, rank: int = 0) -> MidEpoch | None:
        """The totals saved are the sums over the processes: rank 0 goes on from them, the others from zero."""
        if not state.get("partial"):
            return None
        partial = dict(state["partial"])
        seconds = partial.pop("seconds")
        totals = partial if rank == 0 else dict.fromkeys(partial, 0)
        return cls(state["epoch"] + 1, dict(totals, steps=state["step"]), seconds)

    def to_checkpoint(self) -> dict:
        return {"step": self.totals["steps"], "partial": dict(self.totals, seconds=self.seconds)}


@dataclass
class Run:
    """What changes while a run trains: the history, the epochs still to train and the best val mIoU so far."""
    parts: Parts
    history: list[dict]
    first_epoch: int
    last_epoch: int
    run_start: int             # the first epoch this run trained itself: a fine-tune's best.pt is the best of its own
    resumed: MidEpoch | None = None
    best: float = -1.0

    @property
    def out(self) -> Path:
        return Path(self.parts.config.out)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_data(config: TrainConfig, data_dir: Path, log: Callable
              ) -> tuple[SegDataset, SegDataset, list[str], list[list[int]]]:
    """The train and val splits and the classes."""
    class_names, colormap = dataset_classes(config.classes)
    log(f"reading {data_dir} ...")
    splits = [read_split(data_dir, split, colormap, config.ignore_index, config.skip_bad, config.crop)
              for split in (config.train_split, config.val_split)]
    log(f"read {len(splits[0])} training and {len(splits[1])} validation examples "
        f"({splits[0].nbytes() / 2**20:.0f} MB as uint8)")
    return splits[0], splits[1], class_names, colormap


def starting_point(config: TrainConfig, class_names: list[str], resume: Path | None
                   ) -> tuple[nn.Module, dict | None, list[dict]]:
    """The network to train, the checkpoint it starts from and the history it continues: fresh, fine-tuned from
    another run's weights (with a fresh optimizer), or resumed (everything restored later)."""
    start_from = resume or config.finetune_from
    # Weights that a checkpoint replaces need no ImageNet download (resuming offline must work).
    with naming_flags(f"--pretrained {config.pretrained}: use imagenet, none (random init) or a path to "
                      f"{RESNET18_FILE}"):
        net = build_model(config.model, len(class_names), "none" if start_from else config.pretrained)
    if not start_from:
        return use_cpu_kernels(net), None, []
    state = load_checkpoint(start_from)
    check_checkpoint_matches(state, config.model, class_names, start_from)
    net.load_state_dict(state["state_dict"])
    return use_cpu_kernels(net), state, list(state.get("history", []))


def set_up(config: TrainConfig, resume: Path | None) -> tuple[Parts, dict | None, list[dict]]:
    """Threads, processes, seed, data, criterion, network, optimizer and sampler of a run; the checkpoint it starts
    from (``resume``, or config.finetune_from) and the history it continues."""
    set_threads(config.threads)
    ctx = DistributedContext(config.device)
    seed_everything(config.seed)
    log = print if ctx.is_main else (lambda *a, **k: None)
    data_dir = find_data(config.data_dir, config.demo, config.download, config.mirror)   # before OUT is made
    check_global_batch(config.batch_size, ctx.world_size)
    if ctx.is_main:
        check_writable_dir(Path(config.out), "--out")
    threads_for_load(config.threads, ctx.device, ctx.world_size, log)
    train_set, val_set, class_names, colormap = read_data(config, data_dir, log)
    speed, data_on_device = resolve_speed(config.amp, config.channels_last, config.data_on_device, ctx.device,
                                          train_set.nbytes())
    loss, weights = make_criterion(config, train_set, class_names, ctx.device, log)
    net, state, history = starting_point(config, class_names, resume)
    flops = train_flops_per_image(net.to(ctx.device), tuple(config.crop), ctx.device) \
        if ctx.device.type == "cuda" else None
    net = wrap_for_training(net, ctx, speed.channels_last, config.sync_bn, config.compile)
    optimizer = make_optimizer(config.optimizer, net.parameters(), config.lr, config.wd)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=speed.amp_dtype == torch.float16)
    step = make_step(loss, speed, scaler if scaler.is_enabled() else None, config.accum_steps, ctx.world_size)
    sampler = crop_sampler(config, train_set, ctx)
    batches = training_batches(train_set, sampler, ctx.device, data_on_device, config.workers)
    parts = Parts(config, ctx, log, class_names, colormap, weights, val_set.shard(ctx.rank, ctx.world_size), speed,
                  net, optimizer, scaler, step, sampler, batches, flops)
    log_settings(parts, data_on_device)
    return parts, state, history


def check_global_batch(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise UsageError(f"--batch-size {batch_size} is the global batch and must divide evenly over {world_size} "
                         f"processes")


def crop_sampler(config: TrainConfig, train_set: SegDataset, ctx: DistributedContext) -> RandomCropBatchSampler:
    """The random crops of every step: this process's share of each batch, the same keys for a seed and epoch."""
    with naming_flags("lower --batch-size (or --accum-steps)"):
        return RandomCropBatchSampler(train_set, config.batch_size * config.accum_steps, seed=config.seed,
                                      rank=ctx.rank, world_size=ctx.world_size, scales=config.scale,
                                      hflip=config.hflip)


def log_settings(parts: Parts, data_on_device: bool) -> None:
    """The configuration, each value not the script's default marked with where it came from, and the device."""
    c, amp = parts.config, str(parts.speed.amp_dtype).replace("torch.", "") if parts.speed.amp_dtype else "off"
    parts.log("config: " + ", ".join(f"{k}={v}" + (f" ({c.origins[k]})" if k in c.origins else "")
                                     for k, v in sorted(c.plain().items())))
    parts.log(f"device {parts.ctx.device} x {parts.ctx.world_size} process(es); amp {amp}, channels_last "
              f"{parts.speed.channels_last}, data on device {data_on_device}, {c.batch_size * c.accum_steps} images "
              f"per step")


def new_run(parts: Parts, history: list[dict]) -> Run:
    """A fresh run or a fine-tune: its epochs follow the history it continues."""
    first = history[-1]["epoch"] + 1 if history else 1
    return Run(parts, history, first_epoch=first, last_epoch=first + parts.config.epochs - 1, run_start=first)


def resumed_run(parts: Parts, state: dict, history: list[dict], path: Path) -> Run:
    """Restore optimizer, scaler and random state of an interrupted run, and where it goes on: the epoch, the steps of
    it already done, and its last epoch (--epochs counts from the run's start, so a larger one extends it)."""
    if "optimizer" not in state:   # a finished run, or a file of the original repository: weights only
        finished = f"that run finished at epoch {state['epoch']}" if "epoch" in state else "it holds weights only"
        raise UsageError(f"{path}: {finished}, nothing to resume; to train on, start from its weights with "
                         f"--finetune-from {path}")
    parts.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    run_start = state.get("run_start", state["last_epoch"] - state["config"].get("epochs", 0) + 1)
    run = Run(parts, history, first_epoch=state["epoch"] + 1, last_epoch=run_start + parts.config.epochs - 1,
              run_start=run_start, resumed=MidEpoch.from_checkpoint(state, parts.ctx.rank))
    parts.log(f"resuming {path}: epoch {run.first_epoch}" +
              (f", step {run.resumed.totals['steps']}" if run.resumed else ""))
    return run


def epoch_lr(lr: float, schedule: str, done: int, epochs: int) -> float:
    """The learning rate of an epoch after ``done`` of a run's ``epochs``."""
    return lr * (1 - done / epochs) ** 0.9 if schedule == "poly" else lr


def checkpoint(run: Run, epoch: int, resumable: bool, mid_epoch: MidEpoch | None = None) -> dict:
    """last.pt during the run (``resumable``: optimizer, scaler and random state too, and how far an interrupted
    epoch got), or weights only: best.pt, and last.pt once the run is over."""
    p = run.parts
    extra = dict(step=0, partial=None, last_epoch=run.last_epoch, optimizer=p.optimizer.state_dict(),
                 scaler=p.scaler.state_dict(), rng=rng_states()) if resumable else {}
    if mid_epoch:
        extra.update(mid_epoch.to_checkpoint())
    return make_checkpoint(p.net, p.config.model, p.class_names, p.colormap, p.config.plain(), epoch=epoch,
                           history=run.history, run_start=run.run_start, class_weights=p.class_weights, **extra)


def train_one_epoch(run: Run, epoch: int, interrupt: StopOnInterrupt) -> dict:
    """One epoch's steps (the rest of it, for a resumed one) at its lr; its row of the history, unvalidated."""
    p = run.parts
    p.sampler.set_epoch(epoch)
    lr = epoch_lr(p.config.lr, p.config.lr_schedule, epoch - run.run_start, p.config.epochs)
    for group in p.optimizer.param_groups:
        group["lr"] = lr
    resumed = run.resumed if run.resumed and run.resumed.epoch == epoch else None
    done = resumed.totals["steps"] if resumed else 0
    start = time.perf_counter() - (resumed.seconds if resumed else 0.0)
    if p.ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(p.ctx.device)
    bar = progress(None, len(p.sampler), f"epoch {epoch}/{run.last_epoch}", p.ctx.is_main, done)
    last_pt = run.out / "last.pt"

    on_step = each([stop_together(p.ctx.all_sum, interrupt, last_pt, epoch, p.config.lr), watch_load,
                    show_progress(bar)])
    # The sampler is seeded per epoch, so skipping replays exactly the steps a resumed run already did.
    batches = itertools.islice(p.batches(), done, None)
    try:
        with cudnn_autotuning(p.ctx.device):
            totals = train_epoch(p.net, p.optimizer, batches, p.step, resumed.totals if resumed else None, on_step)
    except StopRequested as stop:   # Ctrl-C: the epoch so far, resumable
        bar.close()
        if p.ctx.is_main:
            mid_epoch = MidEpoch(epoch, stop.totals, time.perf_counter() - start)
            save_checkpoint(last_pt, checkpoint(run, epoch - 1, True, mid_epoch))
        raise Interrupted(f"stopped at epoch {epoch}, step {stop.totals['steps']}, saved in {last_pt}; continue "
                          f"with the same command plus --resume") from None
    bar.close()
    if p.ctx.device.type == "cuda":
        torch.cuda.synchronize(p.ctx.device)
    seconds = time.perf_counter() - start
    loss_sum, correct, counted, seen = p.ctx.all_sum(totals["loss"], totals["correct"], totals["counted"],
                                                     totals["seen"])
    return {"epoch": epoch, "lr": lr, "train_loss": loss_sum / len(p.sampler), "train_acc": correct / max(counted, 1),
            "val_acc": None, "val_miou": None, "img_per_s": seen / seconds, "seconds": seconds}


def validate(run: Run, epoch: int) -> dict:
    """Full-resolution val pixel accuracy and mIoU, every --val-every epochs and after the last."""
    p = run.parts
    if epoch % p.config.val_every and epoch != run.last_epoch:
        return {}
    metrics = evaluate(unwrap(p.net), p.val_share, p.ctx.device, len(p.class_names),
                       p.config.batch_size // p.ctx.world_size, p.speed,
                       lambda images: progress(images, len(p.val_share), "validating", p.ctx.is_main))
    metrics.reduce_from_all_processes(p.ctx.device)
    values = metrics.compute(p.class_names)
    return {"val_acc": values["pixel_acc"], "val_miou": values["miou"]}


def epoch_line(row: dict, epochs: int, device: torch.device, flops_per_image: float | None) -> str:
    """The book's per-epoch summary, plus mIoU, speed, and on a GPU how close the speed is to the bf16 peak."""
    line = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f}, train acc {row['train_acc']:.3f}, "
    if row["val_miou"] is not None:
        line += f"val acc {row['val_acc']:.3f}, val mIoU {row['val_miou']:.3f}, "
    line += f"{row['img_per_s']:.1f} examples/sec on {device}"
    peak = bf16_peak_flops(device)
    if peak and flops_per_image:
        line += f" ({row['img_per_s'] * flops_per_image / peak:.1%} of bf16 peak)"
    if device.type == "cuda":
        line += f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return line


def save_epoch(run: Run) -> None:
    """last.pt first (what a crash must not lose), best.pt when this run's best val mIoU improved, the curves."""
    row = run.history[-1]
    save_checkpoint(run.out / "last.pt", checkpoint(run, row["epoch"], True))
    if row["val_miou"] is not None and row["val_miou"] > run.best:
        run.best = row["val_miou"]
        save_checkpoint(run.out / "best.pt", checkpoint(run, row["epoch"], False))
    write_history(run.history, run.out / "history.csv")
    c = run.parts.config
    finetune_start = run.run_start if run.run_start > 1 else None   # epochs before it are the base run's
    save_figure(plot_curves(run.history, f"{c.model}, {c.optimizer}", finetune_start), run.out / "curves.png")


def best_of_run(history: list[dict], run_start: int) -> dict | None:
    """The validated epoch with the best val mIoU among this run's own epochs (a fine-tune's, not its base run's)."""
    own = [h for h in history if h["epoch"] >= run_start and h["val_miou"] is not None]
    return max(own, key=lambda h: h["val_miou"], default=None)


def best_line(best: dict, history: list[dict], run_start: int) -> str:
    """Which epoch best.pt holds; for a fine-tune, beside the base run's best."""
    line = f"best.pt: epoch {best['epoch']}, val mIoU {best['val_miou']:.3f}"
    base = best_of_run([h for h in history if h["epoch"] < run_start], 1)
    if base:
        line += (f" (the best of this fine-tune; its base run's best was {base['val_miou']:.3f} at epoch "
                 f"{base['epoch']})")
    return line


def finish(run: Run) -> None:
    """A finished run keeps weights only in last.pt (nothing left to resume); best.pt is the same file when the
    last epoch was the best. The last lines name the files and the best epoch."""
    best = best_of_run(run.history, run.run_start)
    if not (run.parts.ctx.is_main and best):
        return
    last = run.history[-1]["epoch"]
    save_checkpoint(run.out / "last.pt", checkpoint(run, last, False))
    if best["epoch"] == last:   # the same weights: one file on disk, not two
        link_or_copy(run.out / "last.pt", run.out / "best.pt")
    run.parts.log(best_line(best, run.history, run.run_start))
    run.parts.log(f"wrote {run.out / 'history.csv'}, {run.out / 'curves.png'}, {run.out / 'last.pt'} (epoch {last}) "
                  f"and {run.out / 'best.pt'} (epoch {best['epoch']})")


def train(config: TrainConfig) -> list[dict]:
    """Train config.model on the train split, validating on val; returns the history."""
    # A run that fails before its first epoch leaves no OUT; rank 0 made it, so only rank 0 may take it away.
    with new_folder_removed_on_failure(config.out) if env_rank() == 0 else nullcontext():
        resume = resume_checkpoint_path(config.resume, Path(config.out))
        parts, state, history = set_up(config, resume)
        with parts.ctx:   # under torchrun, the process group is closed however the run ends
            run = resumed_run(parts, state, history, resume) if resume else new_run(parts, history)
            run.best = (best_of_run(run.history, run.run_start) or {"val_miou": -1.0})["val_miou"]
            with StopOnInterrupt() as interrupt:
                for epoch in range(run.first_epoch, run.last_epoch + 1):
                    row = train_one_epoch(run, epoch, interrupt)
                    run.history.append({**row, **validate(run, epoch)})
                    parts.log(epoch_line(run.history[-1], run.last_epoch, parts.ctx.device, parts.flops), flush=True)
                    if parts.ctx.is_main:
                        save_epoch(run)
            finish(run)
    return run.history
