#!/usr/bin/env bash
# One GPU check in under 8 minutes, from the repository root; installs nothing.
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
#  1. benchmarks/bench.py on the GPU: FCN and UNet train steps at 320 x 480, batch 32, plain fp32 vs the default fast
#     path (bf16 autocast, channels_last, data on the GPU) vs fast + torch.compile: images/s, peak memory, fraction of
#     the bf16 peak; full-resolution eval; the matmul ceilings; the data loaders  -> OUTDIR/bench_gpu.json
#  2. a short demo training of each script on the GPU path (3 epochs of the synthetic data), showing the loss falls
#     -> OUTDIR/demo_fcn_history.csv, OUTDIR/demo_unet_history.csv
# Everything printed also goes to OUTDIR/gpu_check.log (without the progress bars). At most 5 files land in OUTDIR
# (checkpoints stay in a temporary folder). Each part has its own time limit, so one that hangs cannot eat the others' time.
#
# Environment knobs (for a dry run elsewhere): PYTHON (python3), GPU_CHECK_DEVICE (cuda), BENCH_ARGS (extra bench
# flags), BENCH_TIMEOUT (300 s), DEMO_TIMEOUT (70 s each), DEMO_EPOCHS (3).
set -u
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-70}
DEMO_EPOCHS=${DEMO_EPOCHS:-3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MPLBACKEND=Agg

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)            # absolute, before moving to the repository root
cd "$(dirname "$0")/.." || exit 1
LOG="$OUT/gpu_check.log"
: > "$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
FAILED=()

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

say "repo $(pwd), out $OUT, python $($PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())' 2>&1)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi

# 1. The benchmark. bench.py rewrites its JSON after every section, so a timeout still leaves what it measured.
say "bench.py (limit ${BENCH_TIMEOUT}s)"
timeout -k 10 "$BENCH_TIMEOUT" $PY benchmarks/bench.py --device "$DEVICE" --json "$OUT/bench_gpu.json" \
    ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { say "bench.py: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"; FAILED+=(bench); }

# 2. Demo trainings on the GPU path (the auto flags: bf16, channels_last, data on the device).
for pair in origin_train.py:fcn my_train.py:unet; do
    script=${pair%%:*}
    name=${pair##*:}
    say "$script --demo --device $DEVICE --epochs $DEMO_EPOCHS (limit ${DEMO_TIMEOUT}s)"
    timeout -k 10 "$DEMO_TIMEOUT" $PY "$script" --demo --device "$DEVICE" --epochs "$DEMO_EPOCHS" \
        --out "$WORK/demo_$name" 2>&1 | sed -u 's/\r/\n/g' | grep --line-buffered -v '%|' | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { say "$script: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"; FAILED+=("demo_$name"); }
    if [ -f "$WORK/demo_$name/history.csv" ]; then
        cp "$WORK/demo_$name/history.csv" "$OUT/demo_${name}_history.csv"
        $PY - "$WORK/demo_$name/history.csv" "$name" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
losses = [float(r["train_loss"]) for r in rows]
speed = [float(r["img_per_s"]) for r in rows]
verdict = "falls" if len(losses) > 1 and losses[-1] < losses[0] else "DOES NOT FALL"
print(f"demo {sys.argv[2]}: train loss by epoch {', '.join(f'{v:.3f}' for v in losses)} -> {verdict}; "
      f"val mIoU {float(rows[-1]['val_miou']):.3f}; {max(speed):.0f} img/s")
sys.exit(0 if verdict == "falls" else 1)
EOF
        [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("loss_$name")
    else
        say "demo $name: no history.csv"
        FAILED+=("history_$name")
    fi
done

# Summary: the headline numbers again, short.
if [ -f "$OUT/bench_gpu.json" ]; then
    $PY - "$OUT/bench_gpu.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
f = lambda v, s=".1f": "-" if v is None else format(v, s)
print(f"summary on {r.get('device')}: fp32 matmul {f(r.get('peak_gflops'), '.0f')} GFLOP/s, "
      f"bf16 matmul {f(r.get('peak', {}).get('bf16_gflops'), '.0f')} GFLOP/s")
for name, t in r.get("train_step", {}).items():
    parts = [f"{v} {f(t.get(v + '_img_s'))} img/s ({f(t.get(v + '_peak_mem_gib'), '.1f')} GiB, "
             f"{f(t.get(v + '_fraction_of_bf16_peak'), '.1%')} of bf16 peak)"
             for v in ("plain", "fast", "compile") if v + "_img_s" in t]
    errors = [f"{k}: {v}" for k, v in t.items() if k.endswith("error")]
    print(f"  {name}: " + "; ".join(parts) + f"; fast/plain x{f(t.get('speedup'), '.2f')}"
          + (f", compile/plain x{f(t.get('compile_speedup'), '.2f')}" if "compile_speedup" in t else "")
          + (f"; fastest {t['fastest_variant']}, fast/fastest x{f(t.get('default_to_fastest'), '.2f')}"
             if "fastest_variant" in t else "")
          + ("".join("\n    " + e for e in errors)))
print(f"  eval: {f(r.get('eval', {}).get('img_s'))} img/s ({r.get('eval', {}).get('model')}, full resolution)")
d = r.get("data", {})
if "memory_ratio" in d:
    print(f"  data: project {f(d['project']['samples_per_s'])} samples/s, {f(d['project']['dataset_mb'], '.0f')} MB; "
          f"reference {f(d['reference']['samples_per_s'])} samples/s, {f(d['reference']['dataset_mb'], '.0f')} MB")
EOF
fi
if [ ${#FAILED[@]} -eq 0 ]; then
    say "all parts passed"
    exit 0
fi
say "FAILED: ${FAILED[*]}"
exit 1
