#!/usr/bin/env bash
# The GPU acceptance check, from the repository root, in under 9 minutes on one GPU; installs nothing.
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Parts, in this order (each with its own time limit, all within TOTAL_TIMEOUT, so one that hangs cannot eat the
# others' time):
#  bench           benchmarks/bench.py on the GPU: FCN and U-Net train steps at 320 x 480, batch 32, plain fp32 vs the
#                  default fast path (bf16 autocast, channels_last, data on the GPU) vs fast + torch.compile: images/s,
#                  peak memory, fraction of the bf16 peak; full-resolution eval; the matmul ceilings; the data loaders
#                  -> OUTDIR/bench_gpu.json
#  demo_NET_AMP    a short demo training per DEMO_RUNS entry (the FCN with origin_train.py, the U-Net with
#                  my_train.py, each in --amp bf16 and --amp fp16), checking every epoch is in history.csv once and
#                  that the train loss falls
#  resume          my_train.py started in the background, killed with SIGKILL as soon as its OUT/last.pt appears,
#                  then continued with plain `my_train.py --resume --out OUT` (on the run's own device): exit 0, it says it
#                  resumes, every epoch in history.csv once, the run's settings in its last.pt as they were
#  predict_figure  my_predict.py (the U-Net beside the FCN: OUTDIR/compare.png) and origin_predict.py figures, from
#                  the checkpoints trained above
#  predict_eval    my_predict.py --eval: both models' metrics on the whole val split
#  predict_images  --images of generated pictures: my_predict.py --tile 64 64 on a small one and a 200 x 300 one,
#                  origin_predict.py on one above 1 Mpixel (auto tiling); each NAME.png at its input's size
#  serve           my_predict.py --serve --port 0 in the background, one `curl -F file=@...` POST /predict: HTTP 200
#                  and JSON with both "models"; then stopped
#  onnx            --export-onnx of the U-Net (my_predict.py; ONNX_NET=fcn: the FCN, origin_predict.py), which the
#                  script checks against ONNX Runtime itself; skipped, with the reason, when onnx, onnxscript or
#                  onnxruntime cannot be imported
#  torchrun        python -m torch.distributed.run --nproc_per_node=N (N: the GPUs nvidia-smi lists, at least 1; one
#                  GPU is one process, so NCCL's process group is only made with 2 or more) of a short demo training
#  cpu_load        every checkpoint written above opened with the README's call, torch.load(PATH, weights_only=True),
#                  under CUDA_VISIBLE_DEVICES= (no GPU visible): it must open, and every tensor in it must be on the CPU
# Then OUTDIR/gpu_check.json: per part passed/failed/skipped, a note (the reason of a failure or a skip), seconds and
# its key numbers (val mIoU and img/s of each training, the benchmark's headline numbers, ...).
# Everything printed also goes to OUTDIR/gpu_check.log (without progress bars). Only gpu_check.log, gpu_check.json,
# bench_gpu.json and compare.png land in OUTDIR; checkpoints and the rest stay in a temporary folder, removed at the
# end (KEEP_WORK=1 keeps it and says where). Exit 1 with a FAILED list if any part failed.
#
# Environment knobs (for a dry run elsewhere; tests/test_gpu_check.py runs one on the CPU):
#   PYTHON (python3), GPU_CHECK_DEVICE (cuda; cpu for a dry run), TOTAL_TIMEOUT (540 s: no part starts or runs past it)
#   SKIP_BENCH (1: skip the benchmark, said as such), BENCH_ARGS (extra bench flags, e.g. "--quick --sections peak"),
#   BENCH_TIMEOUT (240 s)
#   DEMO_RUNS ("fcn:bf16 fcn:fp16 unet:bf16 unet:fp16"; NET:AMP with AMP auto, bf16, fp16 or off; fp16 is emulated and
#   very slow on a CPU, so a dry run keeps it to the FCN), DEMO_EPOCHS (3; at least 2 for the loss to fall),
#   DEMO_ARGS (extra training flags for every training here, e.g. "--crop 32 32 --batch-size 2"), DEMO_DATA (a
#   dataset folder to train on instead of --demo, with --pretrained none: a few demo images for a dry run; --demo has
#   no flag that makes its 160 + 40 images fewer), DEMO_TIMEOUT (70 s each)
#   RESUME_ARGS (--amp fp16: the GradScaler's state travels through the kill), RESUME_EPOCHS (5; the kill must come
#   before the last), RESUME_TIMEOUT (90 s for each of the two runs)
#   PREDICT_TIMEOUT (60 s each command), BIG_IMAGE ("1024 1100": H W of the auto-tiled picture), SERVE_TIMEOUT (60 s),
#   ONNX_NET (unet, or fcn: the network exported), ONNX_TIMEOUT (120 s)
#   DDP_NPROC (the GPUs nvidia-smi lists, at least 1; on the CPU 2, gloo), DDP_BATCH (8: images per process),
#   DDP_EPOCHS (2), DDP_ARGS (extra flags), DDP_TIMEOUT (120 s)
#   LOAD_TIMEOUT (60 s)
set -u
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-540}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
DEMO_RUNS=${DEMO_RUNS:-fcn:bf16 fcn:fp16 unet:bf16 unet:fp16}
DEMO_EPOCHS=${DEMO_EPOCHS:-3}
DEMO_ARGS=${DEMO_ARGS:-}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-70}
RESUME_ARGS=${RESUME_ARGS---amp fp16}
RESUME_EPOCHS=${RESUME_EPOCHS:-5}
RESUME_TIMEOUT=${RESUME_TIMEOUT:-90}
PREDICT_TIMEOUT=${PREDICT_TIMEOUT:-60}
BIG_IMAGE=${BIG_IMAGE:-1024 1100}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-60}
ONNX_TIMEOUT=${ONNX_TIMEOUT:-120}
ONNX_NET=${ONNX_NET:-unet}
DDP_BATCH=${DDP_BATCH:-8}
DDP_EPOCHS=${DDP_EPOCHS:-2}
DDP_ARGS=${DDP_ARGS:-}
DDP_TIMEOUT=${DDP_TIMEOUT:-120}
LOAD_TIMEOUT=${LOAD_TIMEOUT:-60}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MPLBACKEND=Agg

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)            # absolute, before moving to the repository root
cd "$(dirname "$0")/.." || exit 1
LOG="$OUT/gpu_check.log"
: > "$LOG"
rm -f "$OUT/gpu_check.json" "$OUT/bench_gpu.json" "$OUT/compare.png"   # nothing left from an earlier run
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
BG=()                              # background processes (a training to kill, the server), ended on any exit
cleanup() {
    local p
    for p in ${BG[@]+"${BG[@]}"}; do kill -9 "$p" 2>/dev/null; done
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
START=$(date +%s)
FAILED=()
PARTS="$WORK/parts.tsv"            # one line per part: name, status, seconds, note
NUMS="$WORK/numbers"               # NUMS/PART.json: a part's key numbers
mkdir -p "$NUMS"
: > "$PARTS"

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# The checks, in Python: one file, each subcommand prints one line and exits 1 on a failed check.
cat > "$WORK/check.py" <<'EOF'
import csv, json, os, sys
from pathlib import Path

NUMS = Path(os.environ["GPU_CHECK_NUMS"])


def numbers(part, **values):
    """Add key numbers to the part's record (several commands may add to one part)."""
    path = NUMS / f"{part}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **values}))


def fail(message):
    print(f"check failed: {message}")
    sys.exit(1)


def read_history(path, epochs):
    """history.csv's rows; every epoch 1..epochs exactly once, in order."""
    if not Path(path).is_file():
        fail(f"no {path}")
    rows = list(csv.DictReader(open(path)))
    got = [int(r["epoch"]) for r in rows]
    if got != list(range(1, epochs + 1)):
        fail(f"{path}: epochs {got}, expected each of 1..{epochs} once")
    return rows


def history_numbers(rows):
    return {"epochs": len(rows), "train_loss": [round(float(r["train_loss"]), 4) for r in rows],
            "val_miou": round(float(rows[-1]["val_miou"]), 4),
            "best_val_miou": round(max(float(r["val_miou"]) for r in rows), 4),
            "img_per_s": round(max(float(r["img_per_s"]) for r in rows), 1)}


def history(part, path, epochs, loss_falls="yes"):
    rows = read_history(path, int(epochs))
    n = history_numbers(rows)
    numbers(part, **n)
    losses = n["train_loss"]
    verdict = "falls" if len(losses) > 1 and losses[-1] < losses[0] else "DOES NOT FALL"
    print(f"{part}: train loss by epoch {', '.join(f'{v:.3f}' for v in losses)} -> {verdict}; "
          f"val mIoU {n['val_miou']:.3f}; {n['img_per_s']:.0f} img/s")
    if loss_falls == "yes" and verdict != "falls":
        fail(f"{part}: the train loss does not fall over {len(losses)} epochs")


def load(path):
    import torch
    return torch.load(path, weights_only=True)   # the README's call


LEAVES = {"threads", "workers", "out", "resume"}   # a resume takes these from this machine, not the run


def killed(part, path, epochs):
    c = load(path)
    epoch = int(c.get("epoch", 0))
    numbers(part, killed_after_epoch=epoch, epochs=int(epochs), amp=c["config"].get("amp"),
            resumable_state=sorted(k for k in ("optimizer", "scaler", "rng") if k in c))
    print(f"{part}: killed after epoch {epoch} of {epochs}; last.pt holds {', '.join(sorted(c))}")
    if epoch >= int(epochs):
        fail(f"{part}: the run had finished before the kill; raise RESUME_EPOCHS")
    if "optimizer" not in c:
        fail(f"{part}: {path} of an unfinished run holds no optimizer state")


def resumed(part, out, killed_path, epochs):
    rows = read_history(Path(out) / "history.csv", int(epochs))
    before = {k: v for k, v in load(killed_path)["config"].items() if k not in LEAVES}
    after = {k: v for k, v in load(Path(out) / "last.pt")["config"].items() if k not in LEAVES}
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    n = history_numbers(rows)
    numbers(part, **n)
    print(f"{part}: {n['epochs']} epochs, each once; val mIoU {n['val_miou']:.3f}; settings "
          + ("kept" if not changed else f"CHANGED {changed}"))
    if changed:
        fail(f"{part}: the resumed run changed its settings: {changed}")


def make_images(folder, big_folder, big_h, big_w):
    import numpy as np
    from support.demo import make_demo_image
    image, _ = make_demo_image(np.random.RandomState(7))          # synthetic shapes the demo models know
    Path(folder).mkdir(parents=True)
    Path(big_folder).mkdir(parents=True)
    image.save(Path(folder) / "small.png")
    image.resize((300, 200)).save(Path(folder) / "mid.jpg", quality=90)               # 200 x 300: --tile 64 64
    image.resize((int(big_w), int(big_h))).save(Path(big_folder) / "big.jpg", quality=90)   # above 1 Mpixel: auto
    print(f"images: small.png {image.height}x{image.width}, mid.jpg 200x300, big.jpg {big_h}x{big_w}")


def predictions(part, save_dir, *images):
    from PIL import Image
    sizes = {}
    for path in images:
        stem = Path(path).stem
        png, overlay = Path(save_dir) / f"{stem}.png", Path(save_dir) / f"{stem}_overlay.jpg"
        if not png.is_file() or not overlay.is_file():
            fail(f"{part}: no {png.name} or {overlay.name} in {save_dir}")
        got, want = Image.open(png), Image.open(path)
        if got.size != want.size or got.mode != "P":
            fail(f"{part}: {png} is {got.mode} {got.size}, expected a palette PNG of {want.size}")
        sizes[stem] = f"{want.height}x{want.width}"
    numbers(part, **{f"{Path(save_dir).name}": sizes})
    print(f"{part}: {', '.join(f'{k}.png {v}' for k, v in sizes.items())} at their inputs' sizes")


def metrics(part, label, path):
    if not Path(path).is_file():
        fail(f"{part}: no {path}")
    m = json.load(open(path))
    numbers(part, **{f"{label}_miou": m.get("miou"), f"{label}_pixel_acc": m.get("pixel_acc"),
                     f"{label}_images": m.get("num_images")})
    print(f"{part}: {label} val mIoU {m.get('miou')}, pixel acc {m.get('pixel_acc')} on {m.get('num_images')} images")


def serve_answer(part, code, path, models):
    if code != "200":
        fail(f"{part}: HTTP {code}, expected 200: {Path(path).read_text()[:300] if Path(path).is_file() else ''}")
    a = json.load(open(path))
    got = [m.get("label") for m in a.get("models", [])]
    numbers(part, http=200, models=got, seconds={m.get("label"): m.get("seconds") for m in a.get("models", [])},
            tile=a.get("tile"), size=[a.get("height"), a.get("width")])
    print(f"{part}: HTTP 200, models {got}, {a.get('height')}x{a.get('width')}, tile {a.get('tile')}")
    if len(got) != int(models) or not all("png" in m for m in a["models"]):
        fail(f"{part}: expected {models} models with their PNGs in the answer")


def onnx_numbers(part, log, net):
    line = next((l for l in open(log) if "argmax agreement" in l), "")
    if "argmax agreement" in line:
        numbers(part, network=net, max_logit_difference=float(line.split("max |logit difference| ")[1].split(",")[0]),
                agreement_percent=float(line.split("argmax agreement ")[1].split()[0]))


def ddp(part, out, epochs, log, nproc, device):
    rows = read_history(Path(out) / "history.csv", int(epochs))
    text = open(log).read()
    if f" x {nproc} process(es)" not in text:
        fail(f"{part}: the run did not say it trained in {nproc} processes")
    backend = "one process, no process group" if int(nproc) == 1 else "nccl" if device.startswith("cuda") else "gloo"
    numbers(part, processes=int(nproc), backend=backend, **history_numbers(rows))
    print(f"{part}: {nproc} process(es) ({backend}), {len(rows)} epochs, val mIoU {float(rows[-1]['val_miou']):.3f}")


def cpu_load(part, *paths):
    import torch
    if torch.cuda.is_available():
        fail(f"{part}: a GPU is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    total, bad = 0, []

    def walk(value, where):
        nonlocal total
        if isinstance(value, torch.Tensor):
            total += 1
            if value.device.type != "cpu":
                bad.append(f"{where} on {value.device}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    for path in paths:
        c = torch.load(path, weights_only=True)   # the README's call, with no GPU visible
        walk(c, Path(path).parent.name + "/" + Path(path).name)
    numbers(part, checkpoints=len(paths), tensors=total, off_cpu=len(bad))
    print(f"{part}: {len(paths)} checkpoints opened without a GPU, {total} tensors, {len(bad)} not on the CPU")
    if bad:
        fail(f"{part}: tensors not on the CPU: {bad[:5]}")


def bench(part, path):
    if not Path(path).is_file():
        fail(f"{part}: no {path}")
    r = json.load(open(path))
    f = lambda v, s=".1f": "-" if v is None else format(v, s)
    head = {"device": r.get("device"), "peak_gflops": r.get("peak_gflops"),
            "bf16_gflops": r.get("peak", {}).get("bf16_gflops")}
    print(f"summary on {r.get('device')}: fp32 matmul {f(r.get('peak_gflops'), '.0f')} GFLOP/s, "
          f"bf16 matmul {f(r.get('peak', {}).get('bf16_gflops'), '.0f')} GFLOP/s")
    for name, t in r.get("train_step", {}).items():
        keys = [v + k for v in ("plain", "fast", "compile") for k in ("_img_s", "_peak_mem_gib")]
        head[f"train_{name}"] = {k: t[k] for k in keys + ["speedup", "compile_speedup", "fastest_variant"] if k in t}
        parts = [f"{v} {f(t.get(v + '_img_s'))} img/s ({f(t.get(v + '_peak_mem_gib'), '.1f')} GiB, "
                 f"{f(t.get(v + '_fraction_of_bf16_peak'), '.1%')} of bf16 peak)"
                 for v in ("plain", "fast", "compile") if v + "_img_s" in t]
        errors = [f"{k}: {v}" for k, v in t.items() if k.endswith("error")]
        print(f"  {name}: " + "; ".join(parts) + f"; fast/plain x{f(t.get('speedup'), '.2f')}"
              + (f", compile/plain x{f(t.get('compile_speedup'), '.2f')}" if "compile_speedup" in t else "")
              + (f"; fastest {t['fastest_variant']}, fast/fastest x{f(t.get('default_to_fastest'), '.2f')}"
                 if "fastest_variant" in t else "")
              + ("".join("\n    " + e for e in errors)))
    if "eval" in r:
        head["eval_img_s"], head["eval_model"] = r["eval"].get("img_s"), r["eval"].get("model")
        print(f"  eval: {f(r['eval'].get('img_s'))} img/s ({r['eval'].get('model')}, full resolution)")
    d = r.get("data", {})
    if "memory_ratio" in d:
        head["data_samples_per_s"] = {k: d[k]["samples_per_s"] for k in ("project", "reference")}
        print(f"  data: project {f(d['project']['samples_per_s'])} samples/s, "
              f"{f(d['project']['dataset_mb'], '.0f')} MB; reference {f(d['reference']['samples_per_s'])} samples/s, "
              f"{f(d['reference']['dataset_mb'], '.0f')} MB")
    numbers(part, **head)


def summary(parts_tsv, out_json, seconds, device, knobs):
    parts = {}
    for line in open(parts_tsv):
        name, status, secs, note = line.rstrip("\n").split("\t")
        record = {"status": status, "seconds": float(secs), "note": note}
        path = NUMS / f"{name}.json"
        record["numbers"] = json.loads(path.read_text()) if path.exists() else {}
        parts[name] = record
    failed = [n for n, p in parts.items() if p["status"] == "failed"]
    result = {"passed": not failed, "failed": failed,
              "skipped": [n for n, p in parts.items() if p["status"] == "skipped"],
              "seconds": float(seconds), "device": device, "knobs": json.loads(knobs), "parts": parts}
    try:
        import torch
        result["torch"] = torch.__version__
        if torch.cuda.is_available():
            result["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:   # the summary must be written whatever else broke
        result["torch"] = f"not importable: {e}"
    tmp = Path(out_json).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out_json)
    print(f"wrote {out_json}: " + ", ".join(f"{n} {p['status']}" for n, p in parts.items()))


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    globals()[sys.argv[1]](*sys.argv[2:])
EOF
export GPU_CHECK_NUMS="$NUMS"
check() { $PY "$WORK/check.py" "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

# Part bookkeeping: part_start NAME WHAT; part_fail REASON (any number of times); part_end (passed unless a reason
# was given) or part_skip REASON. Every part ends in exactly one line of parts.tsv, so none is left out silently.
PART=
PART_ERR=
part_start() {
    PART=$1
    PART_ERR=
    PART_T0=$EPOCHREALTIME
    say "== $1: $2"
}
part_fail() {
    PART_ERR="${PART_ERR:+$PART_ERR; }$*"
    say "$PART: $*"
}
part_record() {   # STATUS NOTE
    local secs
    secs=$(awk -v a="$PART_T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$PART" "$1" "$secs" "${2//[$'\t\n']/ }" >> "$PARTS"
    say "$PART: $1${2:+ ($2)} in ${secs}s"
}
part_end() {
    if [ -n "$PART_ERR" ]; then
        FAILED+=("$PART")
        part_record failed "$PART_ERR"
    else
        part_record passed ""
    fi
}
part_skip() { part_record skipped "$*"; }

# The time limit of a command: its own, or what is left of TOTAL_TIMEOUT (less 20 s for the summary) if that is less.
LIMIT=0
limit() {
    local left=$(( TOTAL_TIMEOUT - 20 - ($(date +%s) - START) ))
    LIMIT=$(( $1 < left ? $1 : left ))
    if [ "$LIMIT" -lt 5 ]; then
        part_fail "no time left (TOTAL_TIMEOUT ${TOTAL_TIMEOUT}s)"
        return 1
    fi
}
# Run a command under timeout, its output (without progress bars) on the screen and in the log (and in the file
# CAPTURE names, if set); its exit status.
logged() {
    local lim=$1
    shift
    timeout -k 10 "$lim" "$@" 2>&1 | sed -u 's/\r/\n/g' | grep --line-buffered -v '%|' \
        | tee -a "$LOG" ${CAPTURE:+"$CAPTURE"}
    return "${PIPESTATUS[0]}"
}
# A command that must exit 0 within its limit (LIMIT NAME COMMAND...): a part_fail otherwise.
must() {
    local lim=$1 name=$2 rc
    shift 2
    say "$name (limit ${lim}s): ${*//$WORK/WORK}"
    logged "$lim" "$@"
    rc=$?
    [ "$rc" -eq 0 ] || part_fail "$name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"
    return "$rc"
}
# Wait up to SECONDS for a background process to end; SIGKILL it after that. Its exit status.
reap() {
    local pid=$1 until=$(( $(date +%s) + $2 ))
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$until" ]; do sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

if [ -n "${DEMO_DATA:-}" ]; then DATA=(--voc-dir "$DEMO_DATA" --pretrained none); else DATA=(--demo); fi
if [ "$DEVICE" = cpu ]; then
    NPROC_DEFAULT=2
else
    NPROC_DEFAULT=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    [ "$NPROC_DEFAULT" -ge 1 ] 2>/dev/null || NPROC_DEFAULT=1
fi
DDP_NPROC=${DDP_NPROC:-$NPROC_DEFAULT}

say "repo $(pwd), out $OUT, work $WORK, python $($PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())' 2>&1)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi
say "device $DEVICE, total limit ${TOTAL_TIMEOUT}s, demo runs '$DEMO_RUNS' x $DEMO_EPOCHS epochs, data ${DATA[*]}," \
    "extra training flags '$DEMO_ARGS'"

# 1. The benchmark. bench.py rewrites its JSON after every section, so a timeout still leaves what it measured.
part_start bench "benchmarks/bench.py"
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    part_skip "SKIP_BENCH=1"
else
    if limit "$BENCH_TIMEOUT"; then
        # shellcheck disable=SC2086
        must "$LIMIT" bench.py $PY benchmarks/bench.py --device "$DEVICE" --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-}
    fi
    check bench bench "$OUT/bench_gpu.json" || part_fail "no headline numbers"
    part_end
fi

# 2. Demo trainings, one per precision and network (bf16; fp16 with its GradScaler), on the device's fast path.
UNET_CKPT=
FCN_CKPT=
CKPTS=()
for run in $DEMO_RUNS; do
    net=${run%%:*}
    amp=${run##*:}
    case $net in
        fcn) script=origin_train.py ;;
        unet) script=my_train.py ;;
        *) part_start "demo_$run" "?"
           part_fail "DEMO_RUNS: unknown network '$net' (fcn or unet)"
           part_end
           continue ;;
    esac
    name=demo_${net}_$amp
    part_start "$name" "$script --amp $amp"
    if limit "$DEMO_TIMEOUT"; then
        # shellcheck disable=SC2086
        must "$LIMIT" "$script" $PY "$script" "${DATA[@]}" --device "$DEVICE" --epochs "$DEMO_EPOCHS" --amp "$amp" \
            $DEMO_ARGS --out "$WORK/$name"
        check history "$name" "$WORK/$name/history.csv" "$DEMO_EPOCHS" || part_fail "history or loss check failed"
    fi
    part_end
    for f in best.pt last.pt; do [ -f "$WORK/$name/$f" ] && CKPTS+=("$WORK/$name/$f"); done
    if [ -f "$WORK/$name/best.pt" ]; then
        [ "$net" = unet ] && [ -z "$UNET_CKPT" ] && UNET_CKPT="$WORK/$name/best.pt"
        [ "$net" = fcn ] && [ -z "$FCN_CKPT" ] && FCN_CKPT="$WORK/$name/best.pt"
    fi
done

# 3. Killed with SIGKILL mid-run, then continued with plain --resume: it must end the run with its own settings.
# Plain: the run's settings, its device included, come from its last.pt.
part_start resume "my_train.py killed with SIGKILL after its first last.pt, then --resume"
R="$WORK/resume"
if limit "$RESUME_TIMEOUT"; then
    # shellcheck disable=SC2086
    first=($PY my_train.py "${DATA[@]}" --device "$DEVICE" --epochs "$RESUME_EPOCHS" $DEMO_ARGS $RESUME_ARGS --out "$R")
    say "started in the background (limit ${LIMIT}s): ${first[*]//$WORK/WORK}"
    ( exec "${first[@]}" ) > "$WORK/resume_first.log" 2>&1 &
    pid=$!
    BG+=("$pid")
    until=$(( $(date +%s) + LIMIT ))
    while [ ! -f "$R/last.pt" ] && kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$until" ]; do sleep 0.05; done
    if [ -f "$R/last.pt" ] && kill -9 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null
        say "killed it (SIGKILL) once $R/last.pt appeared"
    else
        reap "$pid" 0
        part_fail "no last.pt before the run ended or its limit (see the log above)"
    fi
    tr '\r' '\n' < "$WORK/resume_first.log" | grep -v '%|' | tee -a "$LOG"
    if [ -f "$R/last.pt" ]; then
        cp "$R/last.pt" "$WORK/killed_last.pt"
        CKPTS+=("$WORK/killed_last.pt")
        if check killed resume "$WORK/killed_last.pt" "$RESUME_EPOCHS" && limit "$RESUME_TIMEOUT"; then
            if CAPTURE="$WORK/resume_second.log" must "$LIMIT" "--resume" $PY my_train.py --resume --out "$R"; then
                grep -q "^resuming" "$WORK/resume_second.log" || part_fail "the resumed run did not say it was resuming"
                check resumed resume "$R" "$WORK/killed_last.pt" "$RESUME_EPOCHS" \
                    || part_fail "history or settings check failed"
            fi
            for f in best.pt last.pt; do [ -f "$R/$f" ] && CKPTS+=("$R/$f"); done
        elif [ -z "$PART_ERR" ]; then
            part_fail "the killed run's last.pt is not one to resume"
        fi
    fi
fi
part_end

# 4. The predict scripts on the checkpoints trained above.
have_models() {
    [ -n "$UNET_CKPT" ] && [ -n "$FCN_CKPT" ] && return 0
    part_fail "no U-Net or no FCN checkpoint from the demo trainings (DEMO_RUNS '$DEMO_RUNS', or they failed)"
    return 1
}
part_start predict_figure "my_predict.py and origin_predict.py figures"
if have_models && limit "$PREDICT_TIMEOUT"; then
    must "$LIMIT" my_predict.py $PY my_predict.py --checkpoint "$UNET_CKPT" --compare "$FCN_CKPT" --device "$DEVICE" \
        --figure "$WORK/myout.png" --compare-figure "$OUT/compare.png"
    for f in "$WORK/myout.png" "$OUT/compare.png"; do [ -s "$f" ] || part_fail "no $f"; done
    if limit "$PREDICT_TIMEOUT"; then
        must "$LIMIT" origin_predict.py $PY origin_predict.py --checkpoint "$FCN_CKPT" --device "$DEVICE" \
            --figure "$WORK/origin_out.png"
        [ -s "$WORK/origin_out.png" ] || part_fail "no origin_out.png"
    fi
fi
part_end

part_start predict_eval "my_predict.py --eval, both models"
if have_models && limit "$PREDICT_TIMEOUT"; then
    if must "$LIMIT" "my_predict.py --eval" $PY my_predict.py --checkpoint "$UNET_CKPT" --compare "$FCN_CKPT" \
            --device "$DEVICE" --eval --metrics "$WORK/metrics_unet.json"; then
        check metrics predict_eval unet "$WORK/metrics_unet.json" || part_fail "no U-Net metrics"
        check metrics predict_eval fcn "$(dirname "$FCN_CKPT")/metrics_val.json" || part_fail "no FCN metrics"
    fi
fi
part_end

part_start predict_images "--images: tiled 64 x 64 windows, and auto tiling above 1 Mpixel"
IMAGES="$WORK/images"
if have_models && limit "$PREDICT_TIMEOUT"; then
    # shellcheck disable=SC2086
    check make_images "$IMAGES" "$WORK/big" $BIG_IMAGE || part_fail "could not make the images"
    if must "$LIMIT" "my_predict.py --images" $PY my_predict.py --checkpoint "$UNET_CKPT" --device "$DEVICE" \
            --images "$IMAGES" --tile 64 64 --save-dir "$WORK/pred_unet"; then
        check predictions predict_images "$WORK/pred_unet" "$IMAGES/small.png" "$IMAGES/mid.jpg" \
            || part_fail "bad output"
    fi
    if limit "$PREDICT_TIMEOUT" && must "$LIMIT" "origin_predict.py --images" $PY origin_predict.py \
            --checkpoint "$FCN_CKPT" --device "$DEVICE" --images "$WORK/big/big.jpg" --save-dir "$WORK/pred_fcn"; then
        check predictions predict_images "$WORK/pred_fcn" "$WORK/big/big.jpg" || part_fail "bad output"
    fi
fi
part_end

part_start serve "my_predict.py --serve --port 0, one POST /predict"
if have_models && limit "$SERVE_TIMEOUT"; then
    serve=($PY my_predict.py --serve --port 0 --checkpoint "$UNET_CKPT" --compare "$FCN_CKPT" --device "$DEVICE")
    say "started in the background (limit ${LIMIT}s): ${serve[*]//$WORK/WORK}"
    ( exec "${serve[@]}" ) > "$WORK/serve.log" 2>&1 &
    pid=$!
    BG+=("$pid")
    until=$(( $(date +%s) + LIMIT ))
    url=
    while [ -z "$url" ] && kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$until" ]; do
        sleep 0.2
        url=$(grep -o 'on http://[^ ]*/' "$WORK/serve.log" | head -1 | cut -c4-)
    done
    if [ ! -f "$IMAGES/mid.jpg" ]; then
        part_fail "no $IMAGES/mid.jpg to send (predict_images makes it)"
    elif [ -n "$url" ]; then
        left=$(( until - $(date +%s) ))
        say "curl -F file=@mid.jpg ${url}predict"
        code=$(curl -s -m "$(( left > 5 ? left : 5 ))" -o "$WORK/serve_answer.json" -w '%{http_code}' \
            -F "file=@$IMAGES/mid.jpg" "${url}predict")
        check serve_answer serve "$code" "$WORK/serve_answer.json" 2 || part_fail "bad answer"
    else
        part_fail "the server printed no address (exited or timed out)"
    fi
    kill -TERM "$pid" 2>/dev/null   # a background job of a script ignores SIGINT, so Ctrl-C cannot be sent
    reap "$pid" 10
    tee -a "$LOG" < "$WORK/serve.log"
fi
part_end

case $ONNX_NET in
    fcn) onnx_script=origin_predict.py; onnx_ckpt=$FCN_CKPT ;;
    *) onnx_script=my_predict.py; onnx_ckpt=$UNET_CKPT ;;
esac
part_start onnx "$onnx_script --export-onnx"
if ! missing=$($PY -c 'import onnx, onnxscript, onnxruntime' 2>&1); then
    part_skip "onnx, onnxscript or onnxruntime not importable ($(echo "$missing" | tail -1)):" \
        "pip install -r requirements-onnx.txt"
else
    if have_models && limit "$ONNX_TIMEOUT"; then
        if CAPTURE="$WORK/onnx.log" must "$LIMIT" "--export-onnx" $PY "$onnx_script" --checkpoint "$onnx_ckpt" \
                --device "$DEVICE" --export-onnx "$WORK/model.onnx"; then
            [ -s "$WORK/model.onnx" ] || part_fail "no model.onnx"
            check onnx_numbers onnx "$WORK/onnx.log" "$ONNX_NET" >/dev/null
        fi
    fi
    part_end
fi

# 5. torchrun: one process per GPU (NCCL from 2 GPUs on), or DDP_NPROC CPU processes (gloo) on a dry run.
part_start torchrun "torch.distributed.run --nproc_per_node=$DDP_NPROC"
if limit "$DDP_TIMEOUT"; then
    D="$WORK/ddp"
    # shellcheck disable=SC2086
    CAPTURE="$WORK/ddp.log" must "$LIMIT" torchrun $PY -m torch.distributed.run --standalone \
        --nproc_per_node="$DDP_NPROC" my_train.py "${DATA[@]}" --device "$DEVICE" --epochs "$DDP_EPOCHS" $DEMO_ARGS \
        --batch-size $(( DDP_BATCH * DDP_NPROC )) $DDP_ARGS --out "$D"
    if [ -f "$D/history.csv" ]; then
        check ddp torchrun "$D" "$DDP_EPOCHS" "$WORK/ddp.log" "$DDP_NPROC" "$DEVICE" \
            || part_fail "history or process check failed"
        for f in best.pt last.pt; do [ -f "$D/$f" ] && CKPTS+=("$D/$f"); done
    else
        part_fail "no history.csv"
    fi
fi
part_end

# 6. The checkpoints opened where no GPU is visible, with the README's call.
part_start cpu_load "torch.load(PATH, weights_only=True) under CUDA_VISIBLE_DEVICES="
if [ ${#CKPTS[@]} -eq 0 ]; then
    part_fail "no checkpoint was written"
elif limit "$LOAD_TIMEOUT"; then
    say "${#CKPTS[@]} checkpoints: ${CKPTS[*]//$WORK/WORK}"
    CUDA_VISIBLE_DEVICES= timeout -k 5 "$LIMIT" $PY "$WORK/check.py" cpu_load cpu_load "${CKPTS[@]}" 2>&1 \
        | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || part_fail "exit $rc"
fi
part_end

# 7. The summary.
knobs=$($PY -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    DEMO_RUNS "$DEMO_RUNS" DEMO_EPOCHS "$DEMO_EPOCHS" DEMO_ARGS "$DEMO_ARGS" DEMO_DATA "${DEMO_DATA:-}" \
    BENCH_ARGS "${BENCH_ARGS:-}" SKIP_BENCH "${SKIP_BENCH:-0}" RESUME_ARGS "$RESUME_ARGS" \
    RESUME_EPOCHS "$RESUME_EPOCHS" DDP_NPROC "$DDP_NPROC" DDP_BATCH "$DDP_BATCH" DDP_EPOCHS "$DDP_EPOCHS" \
    DDP_ARGS "$DDP_ARGS" BIG_IMAGE "$BIG_IMAGE" ONNX_NET "$ONNX_NET" TOTAL_TIMEOUT "$TOTAL_TIMEOUT")
check summary "$PARTS" "$OUT/gpu_check.json" "$(( $(date +%s) - START ))" "$DEVICE" "$knobs" || FAILED+=(summary)
if [ ${#FAILED[@]} -eq 0 ]; then
    say "all parts passed ($(grep -c $'\tskipped\t' "$PARTS") skipped, see $OUT/gpu_check.json)"
    exit 0
fi
say "FAILED: ${FAILED[*]}"
exit 1
