"""What a training run does after every step, one small hook per concern: stop on a diverged loss, look at the
CPU's load, show progress, save and stop on Ctrl-C. Each is ``hook(totals, loss)``."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

from some_define import UsageError

from .errors import Interrupted, StopOnInterrupt
from .speed import look_at_load

Hook = Callable[[dict, float], None]


class TrainingStopped(UsageError):
    """The loss diverged; the message says what to do next."""


def stop_if_not_finite(all_sum: Callable[..., list[float]], last_pt: Path, epoch: int, lr: float) -> Hook:
    def hook(totals: dict, loss: float) -> None:
        loss = all_sum(loss)[0]   # every process sees the same loss, so all stop together
        if not math.isfinite(loss):
            raise TrainingStopped(f"the loss became {loss} at epoch {epoch}, step {totals['steps']}; {last_pt} keeps "
                                  f"the last good epoch ({epoch - 1}); try a lower --lr (now {lr:g})")
    return hook


def watch_load(totals: dict, loss: float) -> None:
    look_at_load()


def progress_bar(total: int, done: int, description: str, shown: bool):
    """A progress bar only on a terminal: redirected to a log (nohup ... > log), its frames would fill it."""
    from tqdm import tqdm
    return tqdm(total=total, initial=done, leave=False, desc=description, dynamic_ncols=True,
                disable=not (shown and sys.stderr.isatty()))


def show_progress(bar) -> Hook:
    def hook(totals: dict, loss: float) -> None:
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")
    return hook


def save_on_interrupt(interrupt: StopOnInterrupt, save: Callable[[dict, float], None], last_pt: Path, epoch: int,
                      start: float) -> Hook:
    """Ctrl-C: ``save(totals, seconds)`` of the epoch so far after this step, then stop."""
    def hook(totals: dict, loss: float) -> None:
        if not interrupt.requested:
            return
        step = totals["steps"]   # a resumed epoch's totals count the steps done before
        save(dict(totals), time.perf_counter() - start)
        raise Interrupted(f"stopped at epoch {epoch}, step {step}, saved in {last_pt}; continue with the same "
                          f"command plus --resume")
    return hook


def each(hooks: list[Hook]) -> Hook:
    """One hook that runs ``hooks`` in order."""
    def hook(totals: dict, loss: float) -> None:
        for h in hooks:
            h(totals, loss)
    return hook
