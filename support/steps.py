"""The criterion and the training step of a run: the book's train_step, or the same pieces composed for gradient
accumulation and DDP."""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable

import torch
from torch import nn

from some_define import (SegDataset, SegmentationLoss, Speed, forward_backward, optimizer_step, step_totals,
                         train_step)

from .config import TrainConfig
from .data import CLASS_WEIGHT_POWERS, median_frequency_weights


class AccumulatedStep:
    """One optimizer step on this process's share of a batch, in ``accum_steps`` micro-batches whose gradients add up
    to the whole batch's, under DDP synchronised once. Returns what train_step returns, for this process's share."""

    def __init__(self, loss: SegmentationLoss, speed: Speed, scaler: torch.amp.GradScaler | None, accum_steps: int,
                 world_size: int):
        self.loss, self.speed, self.scaler = loss, speed, scaler
        self.accum_steps, self.world_size = accum_steps, world_size
        # DDP averages gradients over the processes: times world_size, a step is one process's on the whole
        # (global) batch, for the summed loss and the mean alike.
        self.scaled = lambda logits, targets, denominator: loss(logits, targets, denominator) * world_size

    def __call__(self, net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[float, int, int]:
        device = next(net.parameters()).device
        targets_all = self.loss.targets(labels.to(device, non_blocking=True))
        denominator = self.global_denominator(targets_all)
        optimizer.zero_grad(set_to_none=True)
        micro_totals = []
        chunks = list(zip(images.chunk(self.accum_steps), targets_all.chunk(self.accum_steps)))
        for k, (micro_images, targets) in enumerate(chunks):
            # Under DDP, synchronise gradients only on the last micro-batch: the others only add to them.
            sync = net.no_sync() if k < len(chunks) - 1 and hasattr(net, "no_sync") else nullcontext()
            with sync:
                l, logits = forward_backward(net, micro_images, targets, self.scaled, self.speed, self.scaler,
                                             denominator)
            micro_totals.append(step_totals(l, logits, targets))
        optimizer_step(optimizer, self.scaler)
        # One host sync per step; the micro-batches' float32 totals add up on the host, in Python's float64.
        loss_total, correct, labelled = map(sum, zip(*torch.stack(micro_totals).tolist()))
        share = self.loss.per_image(loss_total / self.world_size, len(images) * self.world_size)
        return share, int(correct), int(labelled)

    def global_denominator(self, targets: torch.Tensor) -> torch.Tensor | None:
        """A 'mean' loss's denominator over every micro-batch and process of the step."""
        denominator = self.loss.denominator(targets)
        if denominator is not None and self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(denominator)
        return denominator


def make_step(loss: SegmentationLoss, speed: Speed, scaler: torch.amp.GradScaler | None, accum_steps: int = 1,
              world_size: int = 1) -> Callable:
    """``step(net, optimizer, images, labels)``: the book's train_step for one process without accumulation."""
    if accum_steps == 1 and world_size == 1:
        return partial(train_step, loss=loss, speed=speed, scaler=scaler)
    return AccumulatedStep(loss, speed, scaler, accum_steps, world_size)


def make_criterion(config: TrainConfig, train_set: SegDataset, class_names: list[str], device: torch.device,
                   log: Callable) -> tuple[SegmentationLoss, list[float] | None]:
    """The loss of the run (void rule, reduction, class weights from the training masks) and the weights."""
    power = CLASS_WEIGHT_POWERS[config.class_weights]
    if power is None:
        return SegmentationLoss(config.loss, config.void), None
    weights = median_frequency_weights(train_set.labels, len(class_names), power)
    log(f"class weights ({config.class_weights}): " + ", ".join(f"{n} {w:.2f}" for n, w in zip(class_names, weights)))
    return SegmentationLoss(config.loss, config.void, torch.tensor(weights, device=device)), weights
