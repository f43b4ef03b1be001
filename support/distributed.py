"""Several processes under torchrun: rank and device, sums over processes, BatchNorm over the global batch."""
from __future__ import annotations

import os

import torch
from torch import nn

from .speed import try_all_gpus_or_cpu


def env_rank() -> int:
    """This process's rank under torchrun (0 in a single process): only rank 0 prints."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes torchrun started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class DistributedContext:
    """Rank, world size and device of this process: under torchrun, one process per GPU (or per CPU rank with gloo),
    else a single process. Only rank 0 prints and writes files."""

    def __init__(self, device_name: str | None):
        self.world_size, self.rank = env_world_size(), env_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = try_all_gpus_or_cpu(device_name)
        if self.device.type == "cuda" and self.world_size == 1 and self.device.index is not None:
            torch.cuda.set_device(self.device)   # --device cuda:N: pinned memory and cuDNN on GPU N, not GPU 0
        if self.world_size > 1:
            import torch.distributed as dist
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc) -> None:
        """Close the process group: a rank that exits with it open can abort in gloo's teardown ("terminate called
        without an active exception", seen in a 2-process CPU run), and torch warns of leaked resources."""
        import torch.distributed as dist
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over all ranks (a no-op in a single process)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist
        # float64: an epoch's pixel counts pass 2**24; DDP runs on CUDA (NCCL) and the CPU (gloo), which have it
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with batch statistics over all processes, as nn.SyncBatchNorm does on GPUs, for CPU (gloo) runs.
    Its state_dict is a BatchNorm2d's, so checkpoints load into the plain model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce   # differentiable: gradients flow across processes
        dtype = x.dtype
        x = x.float()   # statistics in fp32, also when autocast (bf16 on the CPU) hands over bf16 activations
        c, shape = x.shape[1], (1, x.shape[1], 1, 1)
        local_count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum((0, 2, 3)), local_count]))
        count = sums[-1]
        mean = sums[:c] / count
        # A second pass for the variance: E[x^2] - mean^2 loses digits and drifts from the single-process step.
        var = all_reduce(((x - mean.view(shape)) ** 2).sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return (x_hat * self.weight.view(shape) + self.bias.view(shape)).to(dtype)


def convert_sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers whose statistics cover the global batch: nn.SyncBatchNorm on CUDA, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, child in net.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = DistributedBatchNorm2d(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(net, name, bn)
        else:
            convert_sync_batchnorm(child, device)
    return net


def wrap_for_training(net: nn.Module, ctx: DistributedContext, channels_last: bool, sync_bn: bool,
                      compile_model: bool) -> nn.Module:
    """Move to the device, convert memory format and BatchNorm, wrap in DDP, compile: in that order."""
    if ctx.world_size > 1 and sync_bn:
        net = convert_sync_batchnorm(net, ctx.device)
    net = net.to(ctx.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if ctx.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    if compile_model:
        net = torch.compile(net)
    return net
