"""How a script ends: a problem the user can fix as one line and exit 2, Ctrl-C or SIGTERM as a clean stop and exit
130."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from some_define import UsageError

from .distributed import env_rank


class Interrupted(Exception):
    """The run was stopped on purpose (Ctrl-C, SIGTERM); the message says how to continue."""


class StopOnInterrupt:
    """The first Ctrl-C or SIGTERM (a batch system's time limit, ``timeout``, ``kill``) asks the loop to stop after
    the current step, which is then saved; a second one aborts."""
    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        import signal

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\ninterrupted ({signal.Signals(signum).name}): finishing this step and saving (a second one "
                  f"aborts)", file=sys.stderr)
        for name in self.SIGNALS:
            number = getattr(signal, name)
            try:
                self.previous[number] = signal.signal(number, handler)
            except ValueError:     # not the main thread: leave the signals alone
                pass
        return self

    def __exit__(self, *exc):
        import signal
        for number, previous in self.previous.items():
            signal.signal(number, previous)


@contextmanager
def naming_flags(advice: str) -> Iterator[None]:
    """The book's file speaks of data and files; around its calls, support/ adds the flags that choose them."""
    try:
        yield
    except UsageError as e:
        raise UsageError(f"{e}; {advice}") from None


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a script's main(); a UsageError becomes one line on stderr and exit 2 (``--debug`` shows the traceback),
    Ctrl-C one line and exit 130. Under torchrun only rank 0 prints it (torchrun names any other failing rank)."""
    argv = sys.argv[1:] if argv is None else argv
    quiet = env_rank() != 0
    try:
        main(argv)
    except Interrupted as e:
        if not quiet:
            print(str(e), file=sys.stderr)
        sys.exit(130)
    except UsageError as e:
        if "--debug" in argv:
            raise
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
