"""How a script ends: a problem the user can fix as one line and exit 2, Ctrl-C as a clean stop and exit 130."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from some_define import UsageError

from .distributed import env_rank


class Interrupted(Exception):
    """The user stopped the run on purpose (Ctrl-C); the message says how to continue."""


class StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step (which is then saved); a second one aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        import signal
        self.previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\ninterrupted: finishing this step and saving (Ctrl-C again to abort)", file=sys.stderr)
        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:     # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        import signal
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


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
