"""The machinery around some_define.py's book pieces, one module per concern; the scripts import from here."""
import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a CPU that other work shares,
# spinning threads wait for a descheduled sibling and a step gets 10-20x slower; see benchmarks/RESULTS.md.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
