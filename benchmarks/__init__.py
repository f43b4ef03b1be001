"""The speed and memory benchmark, one module per section; `python benchmarks/bench.py` runs it (benchmarks/runner.py
says what each section measures)."""
