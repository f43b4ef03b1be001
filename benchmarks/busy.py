"""Section 5, busy (CPU, only when asked for): the default train step quiet and while another process runs a 2-thread
matmul loop, with OpenMP's default wait policy, with threads that always spin, with threads that sleep, and with the
thread count chosen from the load as the scripts choose it. Each measurement is a fresh process."""
from __future__ import annotations

import argparse
import os

from benchmarks.common import fmt, run_child
from benchmarks.competitor import competitor

# (OMP_WAIT_POLICY, name): None leaves it unset (OpenMP's default); "load" leaves it unset and lets the child choose
# its thread count from the load, as the scripts do.
POLICIES = ((None, "default"), ("ACTIVE", "spin"), ("PASSIVE", "sleep"), ("load", "load"))
POLICY_NAMES = [name for _, name in POLICIES]


def busy_child(model: str, policy: str | None, busy: bool, args: argparse.Namespace) -> dict:
    """The default train step of ``model`` (python -m benchmarks.train_step) under ``policy``, optionally while the
    competitor runs: its images/s, or its error."""
    command = [model, "--device", "cpu", "--variants", "fast", "--crop", *map(str, args.crop),
               "--batch", str(args.batch)]
    command += [arg for key in ("warmup", "steps", "rounds") if getattr(args, key) is not None
                for arg in (f"--{key}", str(getattr(args, key)))]
    if policy == "load":
        command, policy = command + ["--threads-for-load"], None
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    with competitor(busy):
        step = run_child("train_step", command, timeout=1800, env=dict(env, **({"OMP_WAIT_POLICY": policy}
                                                                               if policy else {})))
    return {"img_s": step.get("fast_img_s"), "error": step.get("error") or step.get("fast_error")}


def bench_busy(args: argparse.Namespace) -> dict:
    """Quiet and busy images/s per model and wait policy, and busy / quiet (a fair share of 2 cores is 0.5)."""
    out = {}
    for model in args.models:
        for policy, name in POLICIES:
            if name not in args.busy_policies:
                continue
            quiet, busy = busy_child(model, policy, False, args), busy_child(model, policy, True, args)
            row = {"quiet_img_s": quiet.get("img_s"), "busy_img_s": busy.get("img_s")}
            if row["quiet_img_s"] and row["busy_img_s"]:
                row["busy_over_quiet"] = row["busy_img_s"] / row["quiet_img_s"]
            row.update({f"{k}_error": v.get("error") for k, v in (("quiet", quiet), ("busy", busy)) if v.get("error")})
            out[f"{model}_{name}"] = row
            print(f"  {model:5s} {name:7s}: quiet {fmt(row['quiet_img_s'], '.2f')} img/s, busy "
                  f"{fmt(row['busy_img_s'], '.2f')} img/s, busy/quiet {fmt(row.get('busy_over_quiet'), '.2f')}",
                  flush=True)
    return out
