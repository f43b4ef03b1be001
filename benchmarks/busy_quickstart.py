#!/usr/bin/env python3
"""The README's quick start (after the install), timed on a quiet CPU and while another program keeps it busy.

    python benchmarks/busy_quickstart.py            # both, in a copy of the working tree under a temporary folder

"Busy" is a second process running a 2-thread fp32 matmul loop whose OpenMP threads spin (OMP_WAIT_POLICY=ACTIVE):
benchmarks/competitor.py, the one bench.py's busy section uses. Not a timed test: it prints the seconds and the load;
RESULTS.md keeps them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK_START = [["origin_train.py", "--demo"], ["my_train.py", "--demo"], ["my_predict.py"]]


def copy_tree(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree, as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def quick_start(busy: bool) -> dict:
    """Seconds of each quick-start command in a fresh copy, optionally with the competitor running."""
    from benchmarks.competitor import competitor   # imported once the repository root is on the path
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    with competitor(busy), tempfile.TemporaryDirectory() as tmp:
        copy_tree(Path(tmp))
        seconds, log = [], []
        for command in QUICK_START:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, *command], cwd=tmp, env=env, capture_output=True, text=True)
            seconds.append(time.perf_counter() - t)
            log += [line for line in r.stdout.splitlines() if line.startswith("other programs")]
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed: {r.stderr.strip().splitlines()[-1:]}")
        return {"seconds": seconds, "total": sum(seconds), "thread_lines": log, "load_end": os.getloadavg()}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(f"load average at the start: {os.getloadavg()}")
    results = {}
    for name, busy in (("quiet", False), ("busy", True)):
        results[name] = r = quick_start(busy)
        timings = ", ".join(f"{' '.join(c)} {s:.0f} s" for c, s in zip(QUICK_START, r["seconds"]))
        print(f"{name}: {r['total']:.0f} s ({timings}); load {r['load_end']}")
        for line in r["thread_lines"]:
            print(f"  {line}")
    print(f"busy / quiet time: {results['busy']['total'] / results['quiet']['total']:.2f}")


if __name__ == "__main__":
    sys.path[0] = str(ROOT)   # run as a script, Python put benchmarks/ there; the package needs the repository root
    main()
