"""The training run behind both training scripts, in named steps: set up (data, criterion, network, optimizer),
resume, one epoch, validate, save; each epoch writes history.csv, curves.png, last.pt and (the best) best.pt."""
from __future__ import annotations

import itertools
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
from .distributed import DistributedContext, wrap_for_training
from .download import find_data
from .errors import StopOnInterrupt, naming_flags
from .figures import plot_curves
from .files import check_writable_dir, link_or_copy, save_figure, write_history
from .hooks import each, progress_bar, save_on_interrupt, show_progress, stop_if_not_finite, watch_load
from .speed import (bf16_peak_flops, keep_transposed_convs_fp32_on_cpu, resolve_speed, set_threads,
                    threads_for_load, train_flops_per_image)
from .steps import make_criterion, make_step


@dataclass
class Run:
    """What a training run holds between its steps."""
    config: TrainConfig
    ctx: DistributedContext
    log: Callable
    class_names: list[str]
    colormap: list[list[int]]
    class_weights: list[float] | None
    train_set: SegDataset
    val_share: SegDataset      # this process's share of the val split: every image counted once over the processes
    speed: Speed
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: Callable
    sampler: RandomCropBatchSampler
    batches: Callable[[], Iterator]
    flops: float | None
    history: list[dict]
    first_epoch: int
    last_epoch: int
    run_start: int             # the first epoch this run trained itself: a fine-tune's best.pt is the best of its own
    skip_steps: int = 0        # steps of first_epoch that an interrupted run already did
    partial: dict | None = None
    seconds_before: float = 0.0
    best: float = field(default=-1.0)

    @property
    def out(self) -> Path:
        return Path(self.config.out)


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
        return keep_transposed_convs_fp32_on_cpu(net), None, []
    state = load_checkpoint(start_from)
    check_checkpoint_matches(state, config.model, class_names, start_from)
    net.load_state_dict(state["state_dict"])
    return keep_transposed_convs_fp32_on_cpu(net), state, list(state.get("history", []))


def set_up(config: TrainConfig) -> tuple[Run, dict | None, Path | None]:
    """Threads, processes, seed, data, criterion, network, optimizer and sampler of a run; the checkpoint to resume."""
    set_threads(config.threads)
    ctx = DistributedContext(config.device)
    seed_everything(config.seed)
    log = print if ctx.is_main else (lambda *a, **k: None)
    data_dir = find_data(config.data_dir, config.demo, config.download, config.mirror)   # before OUT is made
    if ctx.is_main:
        check_writable_dir(Path(config.out), "--out")
    if config.batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {config.batch_size} is the global batch and must divide evenly over "
                         f"{ctx.world_size} processes")
    threads_for_load(config.threads, ctx.device, ctx.world_size, log)
    train_set, val_set, class_names, colormap = read_data(config, data_dir, log)
    speed, data_on_device = resolve_speed(config.amp, config.channels_last, config.data_on_device, ctx.device,
                                          train_set.nbytes())
    loss, weights = make_criterion(config, train_set, class_names, ctx.device, log)
    resume = resume_checkpoint_path(config.resume, Path(config.out), config.finetune_from)
    net, state, history = starting_point(config, class_names, resume)
    flops = train_flops_per_image(net.to(ctx.device), tuple(config.crop), ctx.device) \
        if ctx.device.type == "cuda" else None
    net = wrap_for_training(net, ctx, speed.channels_last, config.sync_bn, config.compile)
    optimizer = make_optimizer(config.optimizer, net.parameters(), config.lr, config.wd)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=speed.amp_dtype == torch.float16)
    step = make_step(loss, speed, scaler if scaler.is_enabled() else None, config.accum_steps, ctx.world_size)
    with naming_flags("lower --batch-size (or --accum-steps)"):
        sampler = RandomCropBatchSampler(train_set, config.batch_size * config.accum_steps, seed=config.seed,
                                         rank=ctx.rank, world_size=ctx.world_size, scales=config.scale,
                                         hflip=config.hflip)
    batches = training_batches(train_set, sampler, ctx.device, data_on_device, config.workers)
    first = history[-1]["epoch"] + 1 if history else 1
    run = Run(config, ctx, log, class_names, colormap, weights, train_set, val_set.shard(ctx.rank, ctx.world_size),
              speed, net, optimizer, scaler, step, sampler, batches, flops, history, first_epoch=first,
              last_epoch=first + config.epochs - 1, run_start=first)
    log_settings(run, data_on_device)
    return run, state, resume


def log_settings(run: Run, data_on_device: bool) -> None:
    c, amp = run.config, str(run.speed.amp_dtype).replace("torch.", "") if run.speed.amp_dtype else "off"
    run.log("config: " + ", ".join(f"{k}={v}" for k, v in sorted(c.plain().items())))
    run.log(f"device {run.ctx.device} x {run.ctx.world_size} process(es); amp {amp}, channels_last "
            f"{run.speed.channels_last}, data on device {data_on_device}, {c.batch_size * c.accum_steps} images "
            f"per step")


def resume_progress(run: Run, state: dict, path: Path) -> None:
    """Restore optimizer, scaler and random state of an interrupted run, and where it goes on: the epoch, the steps
    of it already done, the last epoch, and that epoch's running totals and seconds so far."""
    if "optimizer" not in state:   # a finished run, or a file of the original repository: weights only
        finished = f"that run finished at epoch {state['epoch']}" if "epoch" in state else "it holds weights only"
        raise UsageError(f"{path}: {finished}, nothing to resume; to train on, start from its weights with "
                         f"--finetune-from {path}")
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    run.partial = dict(state["partial"], steps=state["step"]) if state.get("partial") else None
    run.seconds_before = run.partial.pop("seconds") if run.partial else 0.0
    run.first_epoch, run.skip_steps, run.last_epoch = state["epoch"] + 1, state["step"], state["last_epoch"]
    run.run_start = state.get("run_start", run.last_epoch - run.config.epochs + 1)
    run.log(f"resuming {path}: epoch {run.first_epoch}" + (f", step {run.skip_steps}" if run.skip_steps else ""))


def epoch_lr(lr: float, schedule: str, done: int, epochs: int) -> float:
    """The learning rate of an epoch after ``done`` of a run's ``epochs``."""
    return lr * (1 - done / epochs) ** 0.9 if schedule == "poly" else lr


def checkpoint(run: Run, epoch: int, resumable: bool, step: int = 0, partial: dict | None = None) -> dict:
    """last.pt during the run (``resumable``: optimizer, scaler and random state too), or weights only: best.pt,
    and last.pt once the run is over."""
    c = run.config
    extra = dict(step=step, last_epoch=run.last_epoch, partial=partial, optimizer=run.optimizer.state_dict(),
                 scaler=run.scaler.state_dict(), rng=rng_states()) if resumable else {}
    return make_checkpoint(run.net, c.model, run.class_names, run.colormap, c.plain(), epoch=epoch,
                           history=run.history, run_start=run.run_start, class_weights=run.class_weights, **extra)


def train_one_epoch(run: Run, epoch: int, interrupt: StopOnInterrupt) -> dict:
    """One epoch's steps (the rest of it, for a resumed one) at its lr; its row of the history, unvalidated."""
    run.sampler.set_epoch(epoch)
    lr = epoch_lr(run.config.lr, run.config.lr_schedule, epoch - run.run_start, run.config.epochs)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    resumed = epoch == run.first_epoch and run.skip_steps > 0
    start = time.perf_counter() - (run.seconds_before if epoch == run.first_epoch else 0.0)
    if run.ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.ctx.device)
    bar = progress_bar(len(run.sampler), run.skip_steps if resumed else 0, f"epoch {epoch}/{run.last_epoch}",
                       run.ctx.is_main)
    last_pt = run.out / "last.pt"

    def save(partial: dict) -> None:   # Ctrl-C: the epoch so far, resumable
        if run.ctx.is_main:
            save_checkpoint(last_pt, checkpoint(run, epoch - 1, True, partial["steps"], partial))
    on_step = each([stop_if_not_finite(run.ctx.all_sum, last_pt, epoch, run.config.lr), watch_load,
                    show_progress(bar), save_on_interrupt(interrupt, save, last_pt, epoch, start)])
    # The sampler is seeded per epoch, so skipping replays exactly the steps a resumed run already did.
    batches = itertools.islice(run.batches(), run.skip_steps, None) if resumed else run.batches()
    totals = train_epoch(run.net, run.optimizer, batches, run.step, run.partial if resumed else None,
                         on_step)
    bar.close()
    if run.ctx.device.type == "cuda":
        torch.cuda.synchronize(run.ctx.device)
    seconds = time.perf_counter() - start
    loss_sum, correct, counted, seen = run.ctx.all_sum(totals["loss"], totals["correct"], totals["counted"],
                                                       totals["seen"])
    return {"epoch": epoch, "lr": lr, "train_loss": loss_sum / len(run.sampler), "train_acc": correct / max(counted, 1),
            "val_acc": None, "val_miou": None, "img_per_s": seen / seconds, "seconds": seconds}


def validate(run: Run, epoch: int) -> dict:
    """Full-resolution val pixel accuracy and mIoU, every --val-every epochs and after the last."""
    if epoch % run.config.val_every and epoch != run.last_epoch:
        return {}
    metrics = evaluate(unwrap(run.net), run.val_share, run.ctx.device, len(run.class_names),
                       run.config.batch_size // run.ctx.world_size, run.speed)
    metrics.reduce_from_all_processes(run.ctx.device)
    values = metrics.compute(run.class_names)
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
    c = run.config
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
    if not (run.ctx.is_main and best):
        return
    last = run.history[-1]["epoch"]
    save_checkpoint(run.out / "last.pt", checkpoint(run, last, False))
    if best["epoch"] == last:   # the same weights: one file on disk, not two
        link_or_copy(run.out / "last.pt", run.out / "best.pt")
    run.log(best_line(best, run.history, run.run_start))
    run.log(f"wrote {run.out / 'history.csv'}, {run.out / 'curves.png'}, {run.out / 'last.pt'} (epoch {last}) and "
            f"{run.out / 'best.pt'} (epoch {best['epoch']})")


def train(config: TrainConfig) -> list[dict]:
    """Train config.model on the train split, validating on val; returns the history."""
    run, state, resume = set_up(config)
    if resume:
        resume_progress(run, state, resume)
    run.best = (best_of_run(run.history, run.run_start) or {"val_miou": -1.0})["val_miou"]
    with StopOnInterrupt() as interrupt:
        for epoch in range(run.first_epoch, run.last_epoch + 1):
            row = train_one_epoch(run, epoch, interrupt)
            run.history.append({**row, **validate(run, epoch)})
            run.log(epoch_line(run.history[-1], run.last_epoch, run.ctx.device, run.flops), flush=True)
            if run.ctx.is_main:
                save_epoch(run)
    finish(run)
    return run.history
