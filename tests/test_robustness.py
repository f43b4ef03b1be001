"""Nothing lost, nothing trusted blindly: resume after SIGKILL and Ctrl-C, atomic checkpoints, safe loading, bad input."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, THREADS, make_voc_tree, run_script
import some_define as sd
from support import checkpoints, data, errors

TRAIN = [(64, 64)] * 12
VAL = [(64, 64)] * 2
# Settings other than the script's defaults: a plain --resume must continue with these, not today's defaults.
RUN = ["--pretrained", "none", "--device", "cpu", "--crop", "32", "32", "--batch-size", "2", "--seed", "3",
       "--workers", "0", "--lr", "3e-4", "--lr-schedule", "poly", "--hflip"]


def train_cmd(voc: Path, out: Path, *extra: str) -> list[str]:
    return ["my_train.py", "--voc-dir", str(voc), "--out", str(out), "--epochs", "3", *RUN, *extra]


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, TQDM_DISABLE="1", MPLBACKEND="Agg", OMP_NUM_THREADS=THREADS)
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_epoch_1(out: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def final_state(out: Path) -> tuple[dict, list[dict]]:
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    drop = ("img_per_s", "seconds")
    return checkpoint["state_dict"], [{k: v for k, v in h.items() if k not in drop} for h in checkpoint["history"]]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_tree(tmp_path_factory.mktemp("voc"), TRAIN, VAL)


@pytest.fixture(scope="module")
def uninterrupted(voc, tmp_path_factory) -> tuple[dict, list[dict]]:
    out = tmp_path_factory.mktemp("whole")
    result = run_script(*train_cmd(voc, out))
    assert result.returncode == 0, result.stderr
    return final_state(out)


def assert_same_run(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]]) -> None:
    assert [h["epoch"] for h in b[1]] == [1, 2, 3]
    assert a[1] == b[1]
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key


def test_sigkill_then_resume_loses_at_most_the_unfinished_epoch(voc, uninterrupted, tmp_path):
    proc = start(train_cmd(voc, tmp_path))
    wait_for_epoch_1(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "last.pt", weights_only=True)["epoch"]
    assert killed_at in (1, 2)          # the file on disk is always a whole, loadable epoch
    result = run_script(*train_cmd(voc, tmp_path, "--resume"))
    assert result.returncode == 0, result.stderr
    assert f"resuming {tmp_path / 'last.pt'}: epoch {killed_at + 1}" in result.stdout
    assert_same_run(uninterrupted, final_state(tmp_path))
    with open(tmp_path / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]


def test_ctrl_c_saves_mid_epoch_and_resume_gives_the_same_weights(voc, uninterrupted, tmp_path):
    proc = start(train_cmd(voc, tmp_path))
    wait_for_epoch_1(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130                       # a deliberate stop: not an error
    assert "--resume" in stderr and "Traceback" not in stderr and "error" not in stderr
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["step"] > 0 or saved["epoch"] >= 2    # stopped inside an epoch (or right at its end)
    # The README's plain --resume: data, crop, batch, lr, schedule, epochs and seed come from the checkpoint.
    result = run_script("my_train.py", "--resume", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "note: resuming" not in result.stdout       # nothing changed
    assert "crop=[32, 32] (checkpoint)" in result.stdout
    # Same weights as the uninterrupted run; the history matches except the interrupted epoch's train loss and
    # accuracy, whose running sums were saved with the checkpoint and so match too.
    assert_same_run(uninterrupted, final_state(tmp_path))


def test_sigterm_asks_for_the_same_stop_as_ctrl_c_and_the_handlers_are_restored():
    """A batch system's time limit (Slurm), `timeout` or `kill`: the request the Ctrl-C test above follows to a
    saved, resumable step."""
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with errors.StopOnInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):   # a second signal aborts
            os.kill(os.getpid(), signal.SIGINT)
    assert {number: signal.getsignal(number) for number in before} == before


def test_a_flag_given_with_resume_is_said_and_epochs_extends_the_run(voc, tmp_path):
    proc = start(train_cmd(voc, tmp_path))
    wait_for_epoch_1(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(tmp_path / "last.pt", weights_only=True)["epoch"]
    result = run_script("my_train.py", "--resume", "--out", str(tmp_path), "--epochs", "4", "--lr", "1e-4")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("note: resuming")]
    assert said == [f"note: resuming {tmp_path / 'last.pt'} with other settings than it started with: --lr 0.0001 "
                    f"(was 0.0003), --epochs 4 (was 3)"]
    history = torch.load(tmp_path / "last.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # poly over 4 epochs from the new lr, from the first epoch the resumed run trains
    assert history[done]["lr"] == pytest.approx(1e-4 * (1 - done / 4) ** 0.9)


def test_crash_between_temp_write_and_replace_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint(path, {"model": "fcn", "state_dict": {"w": torch.ones(2)}, "epoch": 1})

    def crash(src, dst):
        raise OSError("simulated crash")
    monkeypatch.setattr(sd.os, "replace", crash)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(path, {"model": "fcn", "state_dict": {"w": torch.zeros(2)}, "epoch": 2})
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]     # no temporary file left behind


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": "fcn", "state_dict": {}, "payload": Evil(str(marker))}, evil)
    with pytest.raises(sd.UsageError, match="refused"):
        checkpoints.load_checkpoint(evil)
    result = run_script("origin_predict.py", "--checkpoint", str(evil), "--demo", "--figure", str(tmp_path / "f.png"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {evil}") and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "f.png").exists()


def test_checkpoint_of_another_architecture_says_what_it_holds(tmp_path):
    fcn = sd.build_model("fcn", 21)
    path = tmp_path / "fcn.pt"
    checkpoints.save_checkpoint(path, checkpoints.make_checkpoint(fcn, "unet", sd.VOC_CLASSES, sd.VOC_COLORMAP, {}))  # mislabelled
    with pytest.raises(sd.UsageError, match="do not fit a unet with 21 classes"):
        checkpoints.restore_model(checkpoints.load_checkpoint(path), path)
    checkpoints.save_checkpoint(path, checkpoints.make_checkpoint(fcn, "fcn", sd.VOC_CLASSES, sd.VOC_COLORMAP, {}))
    with pytest.raises(sd.UsageError, match="holds a fcn with 21 classes, but this run asks for a unet with 3"):
        checkpoints.check_checkpoint_matches(checkpoints.load_checkpoint(path), "unet", ["a", "b", "c"], path)


def test_diverging_loss_stops_with_advice(voc, tmp_path):
    result = run_script("origin_train.py", "--voc-dir", str(voc), "--out", str(tmp_path), "--epochs", "2",
                        *RUN, "--lr", "1e12")   # the last --lr wins
    assert result.returncode == 2
    assert "the loss became" in result.stderr and "try a lower --lr" in result.stderr
    assert "Traceback" not in result.stderr


def one_line_error(args: list[str], expected: str) -> None:
    result = run_script(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]


def break_file(voc: Path, how: str) -> str:
    """Damage the first train example in one way; return the text the error must contain."""
    name = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    jpg, png = voc / "JPEGImages" / f"{name}.jpg", voc / "SegmentationClass" / f"{name}.png"
    if how == "missing image":
        jpg.unlink()
        return f"{jpg}: file not found"
    if how == "missing label":
        png.unlink()
        return f"{png}: label file not found"
    if how == "corrupt jpeg":
        jpg.write_bytes(b"not a jpeg at all")
        return f"{jpg}: cannot read the image"
    if how == "truncated png":
        png.write_bytes(png.read_bytes()[:60])
        return f"{png}: cannot read the label"
    if how == "size mismatch":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(png)
        return f"{png}: label is (10, 12) but its image is (64, 64)"
    if how == "empty split":
        (voc / "ImageSets/Segmentation/train.txt").write_text("\n")
        return f"{voc / 'ImageSets/Segmentation/train.txt'}: the split is empty"
    if how == "missing split":
        (voc / "ImageSets/Segmentation/val.txt").unlink()
        return f"{voc / 'ImageSets/Segmentation/val.txt'}: split file not found"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing image", "missing label", "corrupt jpeg", "truncated png", "size mismatch",
                                 "empty split", "missing split"])
def test_bad_dataset_files_give_one_line(how, tmp_path):
    voc = make_voc_tree(tmp_path, [(64, 64)] * 4, [(64, 64)] * 2)
    expected = break_file(voc, how)
    with pytest.raises(sd.UsageError, match="^" + re.escape(expected)):
        data.read_split(voc, "train", sd.VOC_COLORMAP)
        data.read_split(voc, "val", sd.VOC_COLORMAP)


def test_a_bad_file_stops_the_script_and_skip_bad_skips_it(tmp_path):
    voc = make_voc_tree(tmp_path / "d", [(64, 64)] * 5, [(64, 64)] * 2)
    expected = break_file(voc, "corrupt jpeg")
    out = tmp_path / "out"
    one_line_error(["origin_train.py", "--voc-dir", str(voc), "--out", str(out), "--epochs", "1", *RUN], expected)
    assert not (out / "last.pt").exists()
    result = run_script("origin_train.py", "--voc-dir", str(voc), "--out", str(out), "--epochs", "1", *RUN,
                        "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "--skip-bad left out 1 of 5 examples of the train split" in result.stderr
    assert "read 4 training and 2 validation examples" in result.stdout


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16"])
def test_unusual_image_modes_become_rgb(mode, tmp_path):
    data = {"L": np.full((5, 7), 90, np.uint8), "RGBA": np.full((5, 7, 4), 90, np.uint8),
            "CMYK": np.zeros((5, 7, 4), np.uint8), "I;16": np.full((5, 7), 90 * 256, np.uint16)}[mode]
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    (Image.fromarray(data) if mode == "I;16" else Image.fromarray(data, mode=mode)).save(path)
    image = sd.read_image(path)
    assert image.shape == (3, 5, 7) and image.dtype == torch.uint8
    assert int(image[0, 0, 0]) == (255 if mode == "CMYK" else 90)


def test_bad_flags_and_outputs(tmp_path, tiny_voc):
    base = ["origin_train.py", "--voc-dir", str(tiny_voc), "--pretrained", "none", "--device", "cpu"]
    one_line_error([*base, "--lr", "-1"], "--lr must be positive")
    one_line_error([*base, "--batch-size", "0"], "--batch-size must be at least 1")
    one_line_error([*base, "--crop", "100", "64"], "multiples of 32")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_line_error([*base, "--out", str(blocker / "sub")], f"--out {blocker / 'sub'}: cannot create")
    one_line_error([*base, "--out", str(tmp_path / "o"), "--resume"], "nothing to resume")
    assert not (tmp_path / "o").exists()


def test_a_failed_training_run_leaves_no_folder_it_made(tmp_path, tiny_voc):
    base = ["origin_train.py", "--voc-dir", str(tiny_voc), "--device", "cpu", "--crop", "32", "32"]
    out = tmp_path / "new" / "out"
    one_line_error([*base, "--out", str(out), "--pretrained", str(tmp_path / "missing.pth")], "--pretrained")
    one_line_error([*base, "--out", str(out), "--pretrained", "none", "--ignore-index", "6", "--classes",
                    str(tmp_path / "missing.txt")], "missing.txt")
    assert not (tmp_path / "new").exists()


def test_a_finished_run_keeps_weights_only_and_says_so_on_resume(voc, tmp_path):
    result = run_script(*train_cmd(voc, tmp_path, "--epochs", "2"))
    assert result.returncode == 0, result.stderr
    best, last = (torch.load(tmp_path / name, weights_only=True) for name in ("best.pt", "last.pt"))
    for checkpoint in (best, last):   # weights, config and classes; no optimizer, scaler or RNG state
        assert {"state_dict", "config", "class_names", "colormap", "model", "history"} <= set(checkpoint)
        assert not {"optimizer", "scaler", "rng"} & set(checkpoint)
    history = last["history"]
    best_epoch = max(history, key=lambda h: h["val_miou"])["epoch"]
    assert best["epoch"] == best_epoch and last["epoch"] == 2
    if best_epoch == 2:   # the same weights are one file on disk
        assert (tmp_path / "best.pt").stat().st_ino == (tmp_path / "last.pt").stat().st_ino
    one_line_error(train_cmd(voc, tmp_path, "--epochs", "2", "--resume"), "that run finished at epoch 2")
    total = sum((tmp_path / name).stat().st_size for name in ("best.pt", "last.pt"))
    assert total <= 2.1 * sum(v.numel() * v.element_size() for v in last["state_dict"].values())
