"""What several sections use: the VOC image size, device syncs, error records, child processes, number formats."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from support.speed import threads_for_load

ROOT = Path(__file__).resolve().parent.parent   # the repository root: children run `python -m benchmarks.X` there
VOC_IMAGE_HW = (375, 500)                        # the usual VOC image (height, width)


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timing ends when the work does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cuda_cache(device: torch.device) -> None:
    """After a variant is done or failed (e.g. out of memory), so that the next one starts from a clean GPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    """An exception as the one line the JSON records."""
    return f"{type(e).__name__}: {e}"[:2000]


def dtype_name(dtype: torch.dtype | None) -> str:
    """'bfloat16', 'float32', ... ('None' for no dtype), as the JSON names them."""
    return str(dtype).replace("torch.", "")


def flags_json(flags: dict) -> dict:
    """Speed flags with the autocast dtype written as its name."""
    return {k: dtype_name(v) if k == "amp_dtype" else v for k, v in flags.items()}


def fmt(v: float | None, spec: str = ".1f") -> str:
    """A number for the printed table; '-' where it was not measured."""
    return "-" if v is None else format(v, spec)


def choose_threads(threads: int | None, for_load: bool) -> None:
    """--threads N, or (--threads-for-load) the count the scripts would take now from the other programs' load."""
    if threads:
        torch.set_num_threads(threads)
    if for_load:   # the choice at the start; the scripts look again every 10 s
        threads_for_load(None, torch.device("cpu"))


def run_child(module: str, args: list[str], timeout: float, env: dict | None = None) -> dict:
    """``python -m benchmarks.MODULE ARGS`` in a fresh process: the JSON on its last line of output, or
    {"error": its last line of errors}."""
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])
