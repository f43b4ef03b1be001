"""What a training run does after every step, one small hook per concern: stop together on a diverged loss or
Ctrl-C, look at the CPU's load, show progress. Each is ``hook(totals, loss)``."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Iterable

from some_define import UsageError

from .errors import StopOnInterrupt
from .speed import look_at_load

Hook = Callable[[dict, float], None]


class TrainingStopped(UsageError):
    """The loss diverged; the message says what to do next."""


def stop_together(all_sum: Callable[..., list[float]], interrupt: StopOnInterrupt, last_pt: Path, epoch: int,
                  lr: float) -> Hook:
    """One all-reduce a step tells every process the loss and whether any was interrupted (Ctrl-C reaches the ranks
    at different steps), so all stop after the same step: on a diverged loss with advice, on Ctrl-C by raising
    StopRequested, whose totals are the sums over the processes."""
    def hook(totals: dict, loss: float) -> None:
        loss, stops = all_sum(loss, float(interrupt.requested))
        if not math.isfinite(loss):
            raise TrainingStopped(f"the loss became {loss} at epoch {epoch}, step {totals['steps']}; {last_pt} keeps "
                                  f"the last good epoch ({epoch - 1}); try a lower --lr (now {lr:g})")
        if stops:
            summed = dict(zip(SUMMED, all_sum(*(totals[key] for key in SUMMED))), steps=totals["steps"])
            raise StopRequested(summed)
    return hook


SUMMED = ("loss", "correct", "counted", "seen")   # the running totals of train_epoch that add up over processes


class StopRequested(Exception):
    """Ctrl-C, agreed by every process after the same step; ``totals`` are the epoch's so far, summed."""

    def __init__(self, totals: dict):
        super().__init__("stop requested")
        self.totals = totals


def watch_load(totals: dict, loss: float) -> None:
    look_at_load()


def progress(items: Iterable | None, total: int, description: str, shown: bool = True, done: int = 0):
    """``items`` with a progress bar, for the long parts that would be silent (validation, --eval, a large photo's
    windows, reading a dataset); with ``items`` None, a bar that show_progress moves (an epoch's steps, ``done`` of
    them before a resume). Only on a terminal: redirected to a log (nohup ... > log), its frames would fill it."""
    from tqdm import tqdm
    return tqdm(items, total=total, initial=done, leave=False, desc=description, dynamic_ncols=True,
                disable=not (shown and sys.stderr.isatty()))


def show_progress(bar) -> Hook:
    def hook(totals: dict, loss: float) -> None:
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")
    return hook


def each(hooks: list[Hook]) -> Hook:
    """One hook that runs ``hooks`` in order."""
    def hook(totals: dict, loss: float) -> None:
        for h in hooks:
            h(totals, loss)
    return hook
