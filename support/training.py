"""The training run behind both training scripts: data, model, resume and fine-tune, the epoch loop with Ctrl-C and
NaN handling, and what each epoch writes (history.csv, curves.png, last.pt, best.pt)."""
from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from some_define import (RandomCropBatchSampler, SegDataset, UsageError, build_model, collate_crops, evaluate,
                         make_optimizer, train_epoch)

from .errors import Interrupted, StopOnInterrupt
from .checkpoints import (check_checkpoint_matches, load_checkpoint, make_checkpoint, plain_config, rng_states,
                          save_checkpoint, set_rng_states, unwrap)
from .data import CLASS_WEIGHT_POWERS, dataset_classes, median_frequency_weights, read_split, to_device
from .distributed import DistributedContext, wrap_for_training
from .download import training_data_dir
from .figures import plot_curves
from .files import check_writable_dir, link_or_copy, save_figure, write_history
from .speed import (bf16_peak_flops, keep_transposed_convs_fp32_on_cpu, look_at_load, resolve_speed_flags,
                    set_threads, threads_for_load, train_flops_per_image)


class TrainingStopped(UsageError):
    """The loss diverged; the message says what to do next."""


def crop_batches_on_device(dataset: SegDataset, sampler: RandomCropBatchSampler
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The data path when the split lives in GPU memory: slice crops there, no worker processes, no copies."""
    for batch in sampler:
        yield collate_crops([dataset[key] for key in batch])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_checkpoint_path(resume: str | None, out: Path, finetune_from: str | None) -> Path | None:
    """--resume alone means OUT/last.pt; --resume PATH names the file."""
    if not resume:
        return None
    path = out / "last.pt" if resume == "auto" else Path(resume)
    if not path.is_file():
        raise UsageError(f"--resume: {path} not found; nothing to resume (drop --resume to start afresh)")
    if finetune_from:
        raise UsageError("--resume and --finetune-from do not go together")
    return path


def training_batches(train_set: SegDataset, sampler: RandomCropBatchSampler, device: torch.device,
                     data_on_device: bool, workers: int) -> Callable[[], Iterator]:
    """A function that starts one epoch's batches: crops sliced on the GPU, or a DataLoader."""
    if data_on_device:
        device_set = to_device(train_set, device)
        return lambda: crop_batches_on_device(device_set, sampler)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_crops,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    return lambda: iter(loader)


def starting_point(model: str, class_names: list[str], pretrained: str, resume: Path | None,
                   finetune_from: str | None) -> tuple[nn.Module, dict | None, list[dict]]:
    """The network to train, the checkpoint it starts from and the history it continues: fresh, fine-tuned from
    another run's weights (with a fresh optimizer), or resumed (everything restored later)."""
    start_from = resume or finetune_from
    # Weights that a checkpoint replaces need no ImageNet download (resuming offline must work).
    net = build_model(model, len(class_names), "none" if start_from else pretrained)
    if not start_from:
        return net, None, []
    state = load_checkpoint(start_from)
    check_checkpoint_matches(state, model, class_names, start_from)
    net.load_state_dict(state["state_dict"])
    return net, state, list(state.get("history", []))


def restore_progress(state: dict, path: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
                     ) -> tuple[int, int, int, dict | None, float]:
    """Restore optimizer, scaler and random state of an interrupted run; return where it goes on: the epoch, the
    steps of it already done, the last epoch, and that epoch's running totals and seconds so far."""
    if "optimizer" not in state:
        raise UsageError(f"{path}: that run finished at epoch {state['epoch']}, nothing to resume; to train on, "
                         f"start from its weights with --finetune-from {path}")
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    partial = dict(state["partial"], steps=state["step"]) if state.get("partial") else None
    seconds = partial.pop("seconds") if partial else 0.0
    return state["epoch"] + 1, state["step"], state["last_epoch"], partial, seconds


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


def epoch_lr(lr: float, schedule: str, done: int, epochs: int) -> float:
    """The learning rate of an epoch after ``done`` of a run's ``epochs``."""
    return lr * (1 - done / epochs) ** 0.9 if schedule == "poly" else lr


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


def train(args: argparse.Namespace) -> list[dict]:
    """Train args.model on the train split, validating on val after each epoch; write OUT/history.csv,
    OUT/curves.png, OUT/last.pt (every epoch) and OUT/best.pt (best val mIoU). Returns the history."""
    from tqdm import tqdm
    set_threads(args.threads)
    ctx = DistributedContext(args.device)
    device = ctx.device
    seed_everything(args.seed)
    data_dir = training_data_dir(args.voc_dir, args.demo, args.download, args.mirror)
    class_names, colormap = dataset_classes(args.classes)
    out = Path(args.out)
    if ctx.is_main:
        check_writable_dir(out, "--out")
    if args.batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch and must divide evenly over "
                         f"{ctx.world_size} processes")
    log = print if ctx.is_main else (lambda *a, **k: None)
    threads_for_load(args.threads, device, ctx.world_size, log)
    log(f"reading {data_dir} ...")
    train_set = read_split(data_dir, args.train_split, colormap, args.ignore_index, args.skip_bad, args.crop)
    val_set = read_split(data_dir, args.val_split, colormap, args.ignore_index, args.skip_bad, args.crop)
    log(f"read {len(train_set)} training and {len(val_set)} validation examples "
        f"({train_set.nbytes() / 2**20:.0f} MB as uint8)")
    speed = resolve_speed_flags(args.amp, args.channels_last, args.data_on_device, device, train_set.nbytes())
    config = plain_config(vars(args))
    class_weights = None
    power = CLASS_WEIGHT_POWERS[args.class_weights]
    if power is not None:
        config["class_weight_values"] = median_frequency_weights(train_set.labels, len(class_names), power)
        class_weights = torch.tensor(config["class_weight_values"], dtype=torch.float32, device=device)
        log(f"class weights ({args.class_weights}): " + ", ".join(
            f"{name} {w:.2f}" for name, w in zip(class_names, config["class_weight_values"])))

    resume = resume_checkpoint_path(args.resume, out, args.finetune_from)
    net, state, history = starting_point(args.model, class_names, args.pretrained, resume, args.finetune_from)
    keep_transposed_convs_fp32_on_cpu(net)
    flops = train_flops_per_image(net.to(device), tuple(args.crop), device) if device.type == "cuda" else None
    net = wrap_for_training(net, ctx, speed["channels_last"], args.sync_bn, args.compile)
    optimizer = make_optimizer(args.optimizer, net.parameters(), args.lr, args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=speed["amp_dtype"] == torch.float16)

    first_epoch = history[-1]["epoch"] + 1 if history else 1
    last_epoch, skip_steps, partial, seconds_before = first_epoch + args.epochs - 1, 0, None, 0.0
    run_start = first_epoch   # a fine-tune's best.pt is the best of its own epochs
    if resume:
        first_epoch, skip_steps, last_epoch, partial, seconds_before = restore_progress(state, resume, optimizer,
                                                                                        scaler)
        run_start = state.get("run_start", last_epoch - args.epochs + 1)
        log(f"resuming {resume}: epoch {first_epoch}" + (f", step {skip_steps}" if skip_steps else ""))

    micro = args.batch_size // ctx.world_size
    sampler = RandomCropBatchSampler(train_set, args.batch_size * args.accum_steps, seed=args.seed,
                                     rank=ctx.rank, world_size=ctx.world_size, scales=args.scale, hflip=args.hflip)
    batches = training_batches(train_set, sampler, device, speed["data_on_device"], args.workers)
    val_share = val_set.shard(ctx.rank, ctx.world_size)   # every val image counted once over the processes
    amp = str(speed["amp_dtype"]).replace("torch.", "") if speed["amp_dtype"] else "off"
    log("config: " + ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if k not in ("debug",
                                                                                             "class_weight_values")))
    log(f"device {device} x {ctx.world_size} process(es); amp {amp}, channels_last {speed['channels_last']}, "
        f"data on device {speed['data_on_device']}, {args.batch_size * args.accum_steps} images per step")
    best = (best_of_run(history, run_start) or {"val_miou": -1.0})["val_miou"]

    def weights(epoch: int) -> dict:   # best.pt, and last.pt once the run is over: nothing left to resume
        return make_checkpoint(net, args.model, class_names, colormap, config, epoch=epoch, history=history,
                               run_start=run_start)

    def checkpoint(epoch: int, step: int, partial_stats: dict | None) -> dict:
        return make_checkpoint(net, args.model, class_names, colormap, config, epoch=epoch,
                               step=step, last_epoch=last_epoch, run_start=run_start, history=history,
                               partial=partial_stats,
                               optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng_states())

    with StopOnInterrupt() as interrupt:
        for epoch in range(first_epoch, last_epoch + 1):
            sampler.set_epoch(epoch)
            lr = epoch_lr(args.lr, args.lr_schedule, epoch - (last_epoch - args.epochs + 1), args.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            resumed = epoch == first_epoch and skip_steps
            start = time.perf_counter() - (seconds_before if epoch == first_epoch else 0.0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # A progress bar only on a terminal: redirected to a log (nohup ... > log), its frames would fill it.
            bar = tqdm(total=len(sampler), initial=skip_steps if resumed else 0, leave=False,
                       desc=f"epoch {epoch}/{last_epoch}", dynamic_ncols=True,
                       disable=not (ctx.is_main and sys.stderr.isatty()))

            def on_step(totals: dict, loss: float) -> None:
                step = totals["steps"]   # a resumed epoch's totals count the steps done before
                loss = ctx.all_sum(loss)[0]   # every process sees the same loss, so all stop together
                if not math.isfinite(loss):
                    raise TrainingStopped(
                        f"the loss became {loss} at epoch {epoch}, step {step}; {out / 'last.pt'} keeps the last good "
                        f"epoch ({epoch - 1}); try a lower --lr (now {args.lr:g})")
                look_at_load()
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                if interrupt.requested:
                    if ctx.is_main:
                        save_checkpoint(out / "last.pt", checkpoint(epoch - 1, step, dict(
                            totals, steps=step, seconds=time.perf_counter() - start)))
                    raise Interrupted(
                        f"stopped at epoch {epoch}, step {step}, saved in {out / 'last.pt'}; continue with the same "
                        f"command plus --resume")

            # The sampler is seeded per epoch, so skipping replays exactly the steps a resumed run already did.
            epoch_batches = itertools.islice(batches(), skip_steps, None) if resumed else batches()
            totals = train_epoch(net, optimizer, epoch_batches, device=device, void=args.void,
                                 reduction=args.loss, accum_steps=args.accum_steps, amp_dtype=speed["amp_dtype"],
                                 scaler=scaler if scaler.is_enabled() else None,
                                 channels_last=speed["channels_last"], world_size=ctx.world_size,
                                 class_weights=class_weights, totals=partial if resumed else None, on_step=on_step)
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            loss_sum, correct, counted, seen = ctx.all_sum(totals["loss"], totals["correct"], totals["counted"],
                                                           totals["seen"])
            val = {"pixel_acc": None, "miou": None}
            if epoch % args.val_every == 0 or epoch == last_epoch:
                metrics = evaluate(unwrap(net), val_share, device, len(class_names), micro, speed["amp_dtype"],
                                   speed["channels_last"])
                metrics.reduce_from_all_processes(device)
                val = metrics.compute(class_names)
            history.append({"epoch": epoch, "lr": lr, "train_loss": loss_sum / len(sampler),
                            "train_acc": correct / max(counted, 1), "val_acc": val["pixel_acc"],
                            "val_miou": val["miou"], "img_per_s": seen / seconds, "seconds": seconds})
            log(epoch_line(history[-1], last_epoch, device, flops), flush=True)
            if ctx.is_main:   # the checkpoint first: it is what a crash must not lose
                save_checkpoint(out / "last.pt", checkpoint(epoch, 0, None))
                if val["miou"] is not None and val["miou"] > best:
                    best = val["miou"]
                    save_checkpoint(out / "best.pt", weights(epoch))
                write_history(history, out / "history.csv")
                save_figure(plot_curves(history, title=f"{args.model}, {args.optimizer} lr {args.lr:g}"),
                            out / "curves.png")
    best = best_of_run(history, run_start)
    if ctx.is_main and best:
        save_checkpoint(out / "last.pt", weights(history[-1]["epoch"]))
        if best["epoch"] == history[-1]["epoch"]:   # the same weights: one file on disk, not two
            link_or_copy(out / "last.pt", out / "best.pt")
        log(best_line(best, history, run_start))
        log(f"wrote {out / 'history.csv'}, {out / 'curves.png'}, {out / 'last.pt'} (epoch {history[-1]['epoch']}) "
            f"and {out / 'best.pt'} (epoch {best['epoch']})")
    return history
