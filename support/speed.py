"""Speed flags: the device, mixed precision, memory format, data on the GPU, and the fraction of the GPU's peak."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
import os
import platform
import time
from typing import Callable, Iterator

import torch
from torch import nn

from some_define import Speed, UsageError

# Dense bf16 tensor-core peaks from the vendors' datasheets, for the "fraction of peak" in the log (GPUs with bf16
# units only: compute capability 8.0 and up). The longest name found in the device's name wins (L40S before L4).
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125,
                    "4090": 165, "4080": 97, "4070": 58, "4060": 30, "3090": 71, "3080": 60, "3070": 40, "3060": 25}


def try_all_gpus_or_cpu(name: str | None = None) -> torch.device:
    """CUDA first, then Apple's MPS, then the CPU; ``name`` (e.g. 'cpu', 'cuda:1') overrides."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_threads(threads: int | None) -> None:
    """--threads N: N intra-op threads on the CPU (default: PyTorch's, one per core; see ThreadsForLoad)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads}: give at least 1")
        torch.set_num_threads(threads)


DEFAULT_THREADS = torch.get_num_threads()   # PyTorch's choice (one per core), before anything changes it


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, busy seconds of the cores this process may use, this process's CPU seconds), from Linux's
    /proc/stat."""
    cores = {f"cpu{c}" for c in os.sched_getaffinity(0)}
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *ticks = line.split()
            if name in cores:   # user nice system idle iowait irq softirq steal
                values = [int(t) for t in ticks[:8]]
                busy += sum(values) - values[3] - values[4]
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


class ThreadsForLoad:
    """On the CPU, with neither --threads nor OMP_NUM_THREADS: as many threads as cores that other programs leave
    free, checked again every ``interval`` seconds. OpenMP threads wait for each other at every operation, so a
    thread more than there are free cores makes each step wait for a descheduled sibling: 10-20x slower
    (benchmarks/RESULTS.md, "A busy CPU")."""

    def __init__(self, interval: float = 10.0, read: Callable[[], tuple[float, float, float]] = cpu_seconds,
                 log: Callable[[str], None] = print, cores: int = DEFAULT_THREADS,
                 clock: Callable[[], float] = time.monotonic):
        self.interval, self.read, self.log, self.clock = interval, read, log, clock
        self.cores = self.threads = cores
        torch.set_num_threads(cores)   # a run after another in one process (the study) starts afresh
        self.last = read()
        time.sleep(0.2)   # a first look before the first step
        self.update(force=True)

    def update(self, force: bool = False) -> None:
        if not force and self.clock() < self.last[0] + self.interval:
            return   # called every step: only the clock until a look is due
        now = self.read()
        wall, busy, own = (b - a for a, b in zip(self.last, now))
        self.last = now
        others = max(0.0, (busy - own) / wall)
        threads = max(1, min(self.cores, self.cores - math.floor(others + 0.5)))
        if threads != self.threads:
            self.log(f"other programs keep {others:.1f} of {self.cores} cores busy: {threads} thread(s) now "
                     f"(--threads N to choose)")
            torch.set_num_threads(threads)
            self.threads = threads


WATCHED: list[ThreadsForLoad] = []   # the process's thread count is global: at most one watcher, for look_at_load


def threads_for_load(threads: int | None, device: torch.device, world_size: int = 1,
                     log: Callable[[str], None] = print) -> ThreadsForLoad | None:
    """A ThreadsForLoad where it applies (a single process on the CPU, Linux, threads left to us), watched from now
    on by look_at_load."""
    WATCHED.clear()
    if threads is not None or "OMP_NUM_THREADS" in os.environ or device.type != "cpu" or world_size > 1 \
            or not os.path.exists("/proc/stat"):
        return None
    WATCHED.append(ThreadsForLoad(log=log))
    return WATCHED[0]


def look_at_load() -> None:
    """Between two pieces of work (a training step, an image, a row of tiles, a request): the watched
    ThreadsForLoad looks at the load again when its interval is up (a clock comparison until then)."""
    for watcher in WATCHED:
        watcher.update()


def cpu_native_bf16() -> str | None:
    """The unit that computes bf16 natively on this CPU (Intel AMX, AVX512-BF16 on AMD Zen 4/5 and Intel Cooper Lake,
    ARM's BF16), or None: without one, oneDNN emulates bf16 and runs it slower than fp32."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    if platform.machine() in ("aarch64", "arm64") and mkldnn_bf16():
        return "ARM BF16"
    return None


def mkldnn_bf16() -> bool:
    """oneDNN's own bf16 check: on ARM, the BF16 extension; on x86 it is true for any AVX-512, so ask it on ARM only."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on ``device``. 'auto': bf16 where the hardware computes it (CUDA compute
    capability 8.0 and up: A100, H100, RTX 30xx/40xx, L4; CPUs with AMX, AVX512-BF16 or ARM BF16); fp16, with a
    GradScaler, on CUDA GPUs that have fp16 tensor cores but no bf16 units (7.x: V100, T4, RTX 20xx; torch would
    emulate bf16 there, slowly); off elsewhere: older GPUs, other CPUs, and Apple's MPS, where torch's autocast
    exists but nothing here has measured it."""
    if amp == "auto":
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)   # of this device, not of GPU 0
            return torch.bfloat16 if major >= 8 else torch.float16 if major == 7 else None
        return torch.bfloat16 if device.type == "cpu" and cpu_native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def prefers_channels_last(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """channels_last pays on CUDA and with bf16 on the CPU; in fp32 on the CPU its slower backward outweighs the
    faster forward."""
    return device.type == "cuda" or (device.type == "cpu" and amp_dtype == torch.bfloat16)


def data_fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Keep the uint8 split on the GPU when it takes under a fifth of the card (VOC train: about 0.6 GB)."""
    return device.type == "cuda" and nbytes < 0.2 * torch.cuda.get_device_properties(device).total_memory


def resolve_speed(amp: str, channels_last: str, data_on_device: str, device: torch.device,
                  nbytes: int) -> tuple[Speed, bool]:
    """The auto flags of training as choices for this device: its Speed, and whether the data lives on the device."""
    auto = lambda flag, default: default if flag == "auto" else flag == "on"
    amp_dtype = resolve_amp(amp, device)
    return (Speed(amp_dtype, auto(channels_last, prefers_channels_last(device, amp_dtype))),
            auto(data_on_device, data_fits_on_device(nbytes, device)))


def inference_speed(amp: str, device: torch.device) -> Speed:
    """amp and memory format for prediction, as training picks them by default. (No cuDNN autotuning here: photos
    come in many sizes, and tuning a large one costs more time and memory than it saves.)"""
    amp_dtype = resolve_amp(amp, device)
    return Speed(amp_dtype, prefers_channels_last(device, amp_dtype))


class CPUFloat32ConvTranspose2d(nn.ConvTranspose2d):
    """A transposed conv that stays in fp32 under CPU autocast: oneDNN has no fast bf16 kernel for the FCN's
    (kernel 64, stride 32) one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ChannelsLastGradUpsample(nn.Upsample):
    """nn.Upsample whose incoming gradient is made channels_last-contiguous first, on the CPU. In the U-Net it arrives
    as a channel slice of torch.cat's gradient, contiguous in no format, and the CPU's bilinear backward then takes a
    slow path: 3.4x slower for the largest upsample, the same gradient (benchmarks/RESULTS.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if y.requires_grad and y.device.type == "cpu" and y.is_contiguous(memory_format=torch.channels_last):
            y.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))
        return y


CPU_KERNELS = {nn.ConvTranspose2d: CPUFloat32ConvTranspose2d, nn.Upsample: ChannelsLastGradUpsample}


def use_cpu_kernels(net: nn.Module) -> nn.Module:
    """Swap in the modules above (same computation, weights and state_dict), in place: the FCN's transposed conv in
    fp32 under autocast, the U-Net's upsampling with a channels_last gradient."""
    for module in net.modules():
        if type(module) in CPU_KERNELS:
            module.__class__ = CPU_KERNELS[type(module)]
    return net


@contextmanager
def cudnn_autotuning(device: torch.device) -> Iterator[None]:
    """Around the training steps: cuDNN picks its fastest kernels once for the crop's shape. Not during validation or
    prediction, where every new image shape would be tuned again, at a cost in time and memory."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def bf16_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    found = [key for key in BF16_PEAK_TFLOPS if key in name]
    return BF16_PEAK_TFLOPS[max(found, key=len)] * 1e12 if found else None


def train_flops_per_image(net: nn.Module, crop_hw: tuple[int, int], device: torch.device) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    net = copy.deepcopy(net)   # the counting pass must not touch the real BatchNorm statistics or gradients
    x = torch.zeros(1, 3, *crop_hw, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x).sum().backward()
    return float(counter.get_total_flops())
