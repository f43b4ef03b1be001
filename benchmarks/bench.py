#!/usr/bin/env python3
"""Speed and memory benchmark of the project's evaluation, data path and training step (not a timed test).

    python benchmarks/bench.py --quick --json /tmp/bench.json     # a CPU run in under 5 minutes
    python benchmarks/bench.py --json bench_gpu.json              # on a GPU: 320 x 480, batch 32, plain/fast/compile

The sections and their order: benchmarks/runner.py; one module each in benchmarks/. Results: benchmarks/RESULTS.md.
"""
import sys
from pathlib import Path


def use_repository_root() -> None:
    """Run as a script, Python puts benchmarks/ first on the module path; the package needs the repository root."""
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> None:
    """The benchmark with these arguments; a flag or file the user can fix is one line and exit 2."""
    from benchmarks.runner import main as run_benchmark   # imported once the repository root is on the path
    from support.errors import run_main
    run_main(run_benchmark, argv)


if __name__ == "__main__":
    use_repository_root()
    main()
