"""benchmarks/gpu_check.sh, the GPU acceptance script, dry-run on the CPU with tiny sizes through its environment
knobs: every part must run and pass (onnx may be skipped, with its reason, only where the extras are not installed),
the summary JSON must name every part, nothing may be left in the repository, and no work folder in TMPDIR (which
points under tmp_path, with everything the script and the tools it runs write).

The dry run trains on 16 training and 4 validation images of the demo data (copied from its cache into tmp_path;
--demo itself has no flag for fewer than its 160 + 40), 32 x 32 crops, batch 2, 2 epochs, the FCN in bf16 and the
U-Net in its default precision. No fp16 run: fp16 is emulated on the CPU (an FCN run took 47 of the dry run's 198 s)
and its step, GradScaler and resume are tested in test_speed.py; a DEMO_RUNS entry runs the same lines whatever its
precision. About 2.5 minutes on a 2-core machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, THREADS

SCRIPT = "benchmarks/gpu_check.sh"
PARTS = ["bench", "demo_fcn_bf16", "demo_unet_auto", "resume", "predict_figure", "predict_eval",
         "predict_images", "serve", "onnx", "torchrun", "cpu_load"]
OUT_FILES = {"gpu_check.log", "gpu_check.json", "bench_gpu.json", "compare.png"}
# What the script could leave in the repository if an --out, --figure, --save-dir or --metrics were not redirected.
WRITTEN_BY_SCRIPTS = ("runs/", "pictures/", "predictions", "gpu_check_out")

needs_tools = pytest.mark.skipif(not all(shutil.which(tool) for tool in ("bash", "timeout", "curl")),
                                 reason="the script needs bash, coreutils' timeout and curl")


def tiny_demo_data(root: Path, train: int = 16, val: int = 4) -> Path:
    """The first images of the demo data's splits (generated once into its cache) as a VOC tree under root."""
    from support.demo import make_demo_voc
    source = make_demo_voc()
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for split, count in (("train", train), ("val", val)):
        names = (source / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:count]
        for name in names:
            shutil.copy(source / "JPEGImages" / f"{name}.jpg", voc / "JPEGImages")
            shutil.copy(source / "SegmentationClass" / f"{name}.png", voc / "SegmentationClass")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def git_status() -> set[str]:
    return set(subprocess.run(["git", "status", "--short", "--untracked-files=all"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.splitlines())


def run_gpu_check(out: Path, tmp: Path, timeout: float, **knobs: str) -> subprocess.CompletedProcess:
    tmp.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, PYTHON=sys.executable, TMPDIR=str(tmp), GPU_CHECK_DEVICE="cpu",
               **knobs)
    for name in ("KEEP_WORK", "SKIP_BENCH", "CUDA_VISIBLE_DEVICES"):
        if name not in knobs:
            env.pop(name, None)
    return subprocess.run(["bash", SCRIPT, str(out)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def onnx_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import onnx, onnxscript, onnxruntime"],
                          capture_output=True).returncode == 0


@needs_tools
def test_dry_run_on_the_cpu_passes_every_part(tmp_path):
    before = git_status()
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    proc = run_gpu_check(
        out, tmp, timeout=600,
        DEMO_DATA=str(tiny_demo_data(tmp_path / "data")), DEMO_RUNS="fcn:bf16 unet:auto", DEMO_EPOCHS="2",
        DEMO_ARGS="--crop 32 32 --batch-size 2", BENCH_ARGS="--quick --sections peak",
        RESUME_ARGS="--model fcn", RESUME_EPOCHS="2", DDP_NPROC="1", DDP_BATCH="2", DDP_ARGS="--model fcn",
        ONNX_NET="fcn")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "all parts passed" in proc.stdout

    summary = json.loads((out / "gpu_check.json").read_text())
    assert list(summary["parts"]) == PARTS, summary["parts"].keys()
    assert summary["passed"] is True and summary["failed"] == []
    for name, part in summary["parts"].items():
        assert part["seconds"] >= 0, name
        if part["status"] == "skipped":   # never silently: only onnx, only without the extras, with the reason
            assert name == "onnx" and not onnx_importable(), (name, part)
            assert "not importable" in part["note"] and "requirements-onnx.txt" in part["note"], part
        else:
            assert part["status"] == "passed" and part["note"] == "", (name, part)
    assert summary["skipped"] == [n for n, p in summary["parts"].items() if p["status"] == "skipped"]

    parts = {name: part["numbers"] for name, part in summary["parts"].items()}
    assert parts["bench"]["peak_gflops"] > 0
    for name in ("demo_fcn_bf16", "demo_unet_auto"):
        n = parts[name]
        assert n["epochs"] == 2 and n["train_loss"][-1] < n["train_loss"][0], (name, n)
        assert 0 <= n["val_miou"] <= 1 and n["img_per_s"] > 0, (name, n)
    assert parts["resume"]["killed_after_epoch"] == 1 and parts["resume"]["epochs"] == 2
    assert "optimizer" in parts["resume"]["resumable_state"]
    assert parts["predict_eval"]["unet_images"] == parts["predict_eval"]["fcn_images"] == 4
    assert parts["predict_images"]["pred_unet"] == {"small": parts["predict_images"]["pred_unet"]["small"],
                                                    "mid": "200x300"}
    assert parts["predict_images"]["pred_fcn"] == {"big": "1024x1100"}
    assert parts["serve"]["http"] == 200 and parts["serve"]["models"] == ["FCN", "U-Net"]
    if summary["parts"]["onnx"]["status"] == "passed":
        assert parts["onnx"]["agreement_percent"] >= 99.9
    assert parts["torchrun"]["processes"] == 1 and parts["torchrun"]["epochs"] == 2
    # every best.pt and last.pt: 2 demo runs, the killed run's last.pt, the resumed run's two, torchrun's two
    assert parts["cpu_load"]["checkpoints"] == 9 and parts["cpu_load"]["tensors"] > 0
    assert parts["cpu_load"]["off_cpu"] == 0

    assert {p.name for p in out.iterdir()} == OUT_FILES
    log_file = (out / "gpu_check.log").read_text()
    assert "killed it (SIGKILL)" in log_file and "resuming" in log_file and "HTTP 200" in log_file
    assert not list(tmp.glob("gpu_check.*")), "the work folder was not removed"
    new = git_status() - before
    assert not [line for line in new if line[3:].startswith(WRITTEN_BY_SCRIPTS)], new


@needs_tools
def test_a_failed_part_is_listed_and_exits_1(tmp_path):
    """No time for anything (TOTAL_TIMEOUT below the summary's reserve) and a network DEMO_RUNS does not know: every
    part still gets its line in the JSON, failed with its reason, and the script exits 1 with the FAILED list."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    proc = run_gpu_check(out, tmp, timeout=120, TOTAL_TIMEOUT="10", SKIP_BENCH="1", DEMO_RUNS="vgg:bf16 fcn:fp16")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    parts = summary["parts"]
    assert list(parts) == ["bench", "demo_vgg:bf16", "demo_fcn_fp16", "resume", "predict_figure", "predict_eval",
                           "predict_images", "serve", "onnx", "torchrun", "cpu_load"]
    assert parts["bench"] == {"status": "skipped", "seconds": parts["bench"]["seconds"], "note": "SKIP_BENCH=1",
                              "numbers": {}}
    assert "unknown network 'vgg'" in parts["demo_vgg:bf16"]["note"]
    assert "no time left" in parts["demo_fcn_fp16"]["note"]
    failed = [name for name, part in parts.items() if part["status"] == "failed"]
    assert summary["passed"] is False and summary["failed"] == failed
    assert set(failed) == set(parts) - {"bench"} - ({"onnx"} if not onnx_importable() else set())
    assert all(parts[name]["note"] for name in failed)
    assert f"FAILED: {' '.join(failed)}" in proc.stdout
    assert not list(tmp.glob("gpu_check.*"))
