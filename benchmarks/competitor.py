"""The other program of the busy measurements (bench.py's busy section, busy_quickstart.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

CODE = "import torch; torch.set_num_threads(2); a = torch.randn(1024, 1024)\nwhile True: a @ a"


@contextmanager
def competitor(busy: bool = True) -> Iterator[None]:
    """If ``busy``: while the block runs, a second process runs a 2-thread fp32 matmul loop whose OpenMP threads spin
    (OMP_WAIT_POLICY=ACTIVE, as most programs' do); it gets 2 s to reach full speed before the block starts."""
    if not busy:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", CODE],
                               env=dict(os.environ, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="2"))
    try:
        time.sleep(2)
        yield
    finally:
        process.kill()
        process.wait()
